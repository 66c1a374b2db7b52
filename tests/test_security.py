"""Security against real servers on 127.0.0.1 with certificates made at test time (tests/certs.py):

- TLS: calls work through it, plaintext does not, and a rotated certificate (from another CA) is served
  without a restart;
- mutual TLS: no client certificate, or one from another CA, is refused; the certificate's common name
  names the tenant (--tenant-from-client-cert);
- tokens: none, a wrong one, an empty bearer or a revoked one (the file rewritten) is UNAUTHENTICATED;
  tenant B neither watches nor cancels tenant A's job (NOT_FOUND, as for an unknown id); a watch token
  lets a third service watch but not cancel; per-tenant limits answer RESOURCE_EXHAUSTED naming the
  limit, with a retry-after hint, while another tenant's job runs;
- a fuzz pass over the metadata (huge, many, non-ASCII, binary headers): never INTERNAL, still healthy;
- exposure: reflection off where tokens are set, /metrics serves /metrics only, and idle connections to
  it start no threads; the open-server warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from certs import CertificateAuthority, Pem
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from procstatus import process_status
from serverproc import LONG, SERVICE_NAME, SMALL, ServerProcess, StreamReader, stylize_request, wait_until

from stylize.client import StylizeClient, Unauthenticated, tls_credentials
from stylize.v1 import stylize_pb2 as pb
from stylize.v1 import stylize_pb2_grpc

CLI = str(Path(sys.executable).with_name("stylize"))
TOKENS = {"acme": "acme-secret-token", "beta": "beta-secret-token", "limited": "limited-secret-token"}
# The token file's reload check runs at most once a second.
RELOAD_SECONDS = 1.5


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def write_tokens(path: Path, tokens: dict[str, str]) -> None:
    tenants: dict[str, dict[str, object]] = {
        name: {"token_sha256": [digest(t)]} for name, t in tokens.items()
    }
    if "limited" in tenants:
        tenants["limited"]["max_jobs_in_flight"] = 1
    path.write_text(json.dumps({"tenants": tenants}))


def bearer(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[tenant]}"),)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("pki")
    ca, other_ca = CertificateAuthority(folder, "ca"), CertificateAuthority(folder, "other-ca")
    return {
        "folder": folder,
        "ca": ca,
        "other_ca": other_ca,
        "server": ca.issue("stylize", server=True, stem="served"),
        "acme": ca.issue("acme", server=False),
        "beta": ca.issue("beta", server=False),
        "stranger": other_ca.issue("acme", server=False),
    }


@pytest.fixture(scope="module")
def tls_server(
    model_dir: Path, pki: dict, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    tokens = tmp_path_factory.mktemp("tokens") / "tokens.json"
    write_tokens(tokens, TOKENS)
    server_pem: Pem = pki["server"]
    args = (
        "--device", "cpu", "--workers", "1", "--health-port", "0", "--token-file", str(tokens),
        "--tls-cert", str(server_pem.cert), "--tls-key", str(server_pem.key),
    )  # fmt: skip
    with ServerProcess(model_dir, *args) as server:
        server.token_file = tokens  # type: ignore[attr-defined]
        yield server


def tls_stub(server: ServerProcess, ca: Path, pem: Pem | None = None) -> stylize_pb2_grpc.StyleTransferStub:
    credentials = tls_credentials(ca, pem.cert if pem else None, pem.key if pem else None)
    return stylize_pb2_grpc.StyleTransferStub(grpc.secure_channel(server.address, credentials))


def code_of(call) -> grpc.StatusCode:
    try:
        result = call()
        if not isinstance(result, pb.SubmitJobResponse | pb.ServerInfo | pb.CancelJobResponse):
            list(result)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


# ---------------------------------------------------------------- TLS


def test_tls_serves_calls_and_refuses_plaintext(tls_server: ServerProcess, pki: dict) -> None:
    stub = tls_stub(tls_server, pki["ca"].cert_path)
    events = list(stub.Stylize(stylize_request(), metadata=bearer("acme"), timeout=120))
    assert events[-1].HasField("completed")
    plain = stylize_pb2_grpc.StyleTransferStub(grpc.insecure_channel(tls_server.address))
    assert code_of(
        lambda: plain.GetServerInfo(pb.GetServerInfoRequest(), metadata=bearer("acme"), timeout=5)
    ) == (grpc.StatusCode.UNAVAILABLE)
    # The client library and its token setting, over TLS.
    with StylizeClient(
        tls_server.address, credentials=tls_credentials(pki["ca"].cert_path), token=TOKENS["beta"]
    ) as client:
        assert client.server_info().version
    with (
        StylizeClient(
            tls_server.address, credentials=tls_credentials(pki["ca"].cert_path), token=""
        ) as client,
        pytest.raises(Unauthenticated),
    ):
        client.server_info()


def served_certificate(port: int) -> bytes:
    """The DER certificate a fresh TLS handshake (ALPN h2, as gRPC requires) gets from the port."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, context.wrap_socket(raw) as tls:
        return tls.getpeercert(binary_form=True)


def test_a_rotated_certificate_is_served_without_a_restart(tls_server: ServerProcess, pki: dict) -> None:
    before = served_certificate(tls_server.port)
    pid = tls_server.process.pid
    rotated = pki["other_ca"].issue("stylize", server=True, stem="rotated")
    served: Pem = pki["server"]
    original = (served.cert.read_bytes(), served.key.read_bytes())
    try:
        served.key.write_bytes(rotated.key.read_bytes())
        served.cert.write_bytes(rotated.cert.read_bytes())
        wait_until(lambda: served_certificate(tls_server.port) != before, 15, poll=0.2)
        new_ca_stub = tls_stub(tls_server, pki["other_ca"].cert_path)
        info = new_ca_stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=bearer("acme"), timeout=10)
        assert info.version
        old_ca_stub = tls_stub(tls_server, pki["ca"].cert_path)
        assert code_of(
            lambda: old_ca_stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=bearer("acme"), timeout=5)
        ) == (grpc.StatusCode.UNAVAILABLE)
    finally:
        served.key.write_bytes(original[1])
        served.cert.write_bytes(original[0])
        wait_until(lambda: served_certificate(tls_server.port) == before, 15, poll=0.2)
    assert tls_server.process.pid == pid and tls_server.process.poll() is None


def test_the_cli_reaches_a_tls_server_with_a_token_and_says_so_in_one_line_without(
    tls_server: ServerProcess, pki: dict
) -> None:
    command = [CLI, "--server", tls_server.address, "--tls-ca", str(pki["ca"].cert_path), "--info", "--json"]
    environ = {**os.environ, "STYLIZE_TOKEN": TOKENS["acme"]}
    answer = subprocess.run(command, capture_output=True, text=True, timeout=60, env=environ)
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout)["version"]
    refused = subprocess.run([*command, "--token", "wrong"], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "bearer token" in refused.stderr


def test_the_log_holds_no_token_and_no_image_bytes(tls_server: ServerProcess, pki: dict) -> None:
    stub = tls_stub(tls_server, pki["ca"].cert_path)
    list(stub.Stylize(stylize_request(), metadata=bearer("acme"), timeout=120))
    wait_until(lambda: '"tenant": "acme"' in tls_server.log(), 10)
    log = tls_server.log()
    assert '"tenant": "acme"' in log  # the audit lines are there
    assert not [name for name, token in TOKENS.items() if token in log]
    assert "iVBORw0KGgo" not in log and "\\x89PNG" not in log  # a PNG, base64 or as bytes


# ---------------------------------------------------------------- mutual TLS


def test_mutual_tls_refuses_clients_without_a_good_certificate_and_names_tenants_by_it(
    model_dir: Path, pki: dict
) -> None:
    server_pem: Pem = pki["server"]
    args = (
        "--device", "cpu", "--workers", "1", "--health-port", "0", "--tenant-from-client-cert",
        "--tls-cert", str(server_pem.cert), "--tls-key", str(server_pem.key),
        "--tls-client-ca", str(pki["ca"].cert_path),
    )  # fmt: skip
    ca = pki["ca"].cert_path
    with ServerProcess(model_dir, *args) as server:
        info = pb.GetServerInfoRequest()
        assert (
            code_of(lambda: tls_stub(server, ca).GetServerInfo(info, timeout=5))
            == grpc.StatusCode.UNAVAILABLE
        )
        stranger = tls_stub(server, ca, pki["stranger"])
        assert code_of(lambda: stranger.GetServerInfo(info, timeout=5)) == grpc.StatusCode.UNAVAILABLE
        acme, beta = tls_stub(server, ca, pki["acme"]), tls_stub(server, ca, pki["beta"])
        job_id = acme.SubmitJob(stylize_request(), timeout=30).job_id
        assert code_of(lambda: beta.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=10)) == (
            grpc.StatusCode.NOT_FOUND
        )
        events = list(acme.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=120))
        assert events[-1].HasField("completed")
        assert '"tenant": "acme"' in server.log()  # the audit line names the certificate's tenant


# ---------------------------------------------------------------- tokens and tenants


def test_missing_wrong_empty_and_revoked_tokens_are_unauthenticated(
    tls_server: ServerProcess, pki: dict
) -> None:
    stub = tls_stub(tls_server, pki["ca"].cert_path)
    info = pb.GetServerInfoRequest()
    for metadata in (
        (),
        (("authorization", "Bearer wrong"),),
        (("authorization", "Bearer "),),
        (("authorization", "Basic x"),),
    ):
        assert code_of(lambda m=metadata: stub.GetServerInfo(info, metadata=m, timeout=5)) == (
            grpc.StatusCode.UNAUTHENTICATED
        ), metadata
    assert code_of(lambda: stub.GetServerInfo(info, metadata=bearer("beta"), timeout=5)) == grpc.StatusCode.OK

    token_file: Path = tls_server.token_file  # type: ignore[attr-defined]
    write_tokens(token_file, {name: t for name, t in TOKENS.items() if name != "beta"})
    try:
        wait_until(
            lambda: (
                code_of(lambda: stub.GetServerInfo(info, metadata=bearer("beta"), timeout=5))
                == grpc.StatusCode.UNAUTHENTICATED
            ),
            RELOAD_SECONDS + 10,
            poll=0.2,
        )
        assert (
            code_of(lambda: stub.GetServerInfo(info, metadata=bearer("acme"), timeout=5))
            == grpc.StatusCode.OK
        )
    finally:
        write_tokens(token_file, TOKENS)
    wait_until(
        lambda: (
            code_of(lambda: stub.GetServerInfo(info, metadata=bearer("beta"), timeout=5))
            == grpc.StatusCode.OK
        ),
        RELOAD_SECONDS + 10,
        poll=0.2,
    )


def test_a_tenant_sees_only_its_own_jobs_and_a_watch_token_lets_another_watch_but_not_cancel(
    tls_server: ServerProcess, pki: dict
) -> None:
    stub = tls_stub(tls_server, pki["ca"].cert_path)
    submitted = stub.SubmitJob(stylize_request(LONG), metadata=bearer("acme"), timeout=30)
    job_id, watch_token = submitted.job_id, submitted.watch_token
    assert len(watch_token) >= 22  # 128 random bits
    try:
        for call in (
            lambda: stub.WatchJob(pb.WatchJobRequest(job_id=job_id), metadata=bearer("beta"), timeout=5),
            lambda: stub.CancelJob(pb.CancelJobRequest(job_id=job_id), metadata=bearer("beta"), timeout=5),
            lambda: stub.WatchJob(
                pb.WatchJobRequest(job_id=job_id, watch_token="not-it"), metadata=bearer("beta"), timeout=5
            ),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                code_of_raising(call)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            # Exactly what an unknown id gets, so ids cannot be probed.
            assert caught.value.details().startswith(f"no job '{job_id}'")

        watcher = StreamReader(
            stub.WatchJob(pb.WatchJobRequest(job_id=job_id, watch_token=watch_token), metadata=bearer("beta"))
        )
        wait_until(lambda: watcher.latest >= 1, 60)
        assert code_of(
            lambda: stub.CancelJob(pb.CancelJobRequest(job_id=job_id), metadata=bearer("beta"), timeout=5)
        ) == (grpc.StatusCode.NOT_FOUND)  # watching, not cancelling
    finally:
        state = stub.CancelJob(pb.CancelJobRequest(job_id=job_id), metadata=bearer("acme"), timeout=30).state
    watcher.join(30)
    assert state == pb.JOB_STATE_CANCELLED and watcher.code == grpc.StatusCode.CANCELLED


def code_of_raising(call) -> None:
    result = call()
    if not isinstance(result, pb.CancelJobResponse):
        list(result)


def test_a_tenant_over_its_limit_is_refused_with_a_retry_hint_while_another_tenant_runs(
    tls_server: ServerProcess, pki: dict
) -> None:
    stub = tls_stub(tls_server, pki["ca"].cert_path)
    first = stub.SubmitJob(stylize_request(LONG), metadata=bearer("limited"), timeout=30).job_id
    try:
        with pytest.raises(grpc.RpcError) as caught:
            stub.SubmitJob(stylize_request(SMALL), metadata=bearer("limited"), timeout=30)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_jobs_in_flight 1" in caught.value.details()
        status = rpc_status.from_call(caught.value)
        [detail] = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
        retry = error_details_pb2.RetryInfo()
        detail.Unpack(retry)
        assert retry.retry_delay.ToTimedelta().total_seconds() > 0
        # Another tenant's job is accepted and runs (it waits behind `first` on the one worker).
        other = stub.SubmitJob(stylize_request(SMALL), metadata=bearer("acme"), timeout=30).job_id
    finally:
        stub.CancelJob(pb.CancelJobRequest(job_id=first), metadata=bearer("limited"), timeout=30)
    events = list(stub.WatchJob(pb.WatchJobRequest(job_id=other), metadata=bearer("acme"), timeout=120))
    assert events[-1].HasField("completed")


# ---------------------------------------------------------------- metadata fuzz


@pytest.mark.parametrize(
    "metadata",
    [
        (("authorization", "Bearer " + "x" * 6000),),
        (("authorization", "Bearer " + "y" * 60_000),),
        tuple((f"x-junk-{i}", "v" * 100) for i in range(200)),
        # gRPC carries non-ASCII and control characters only in -bin headers: its clients refuse them in
        # text headers before sending, so the server never sees them there.
        (("authorization-bin", "Bearer \u00e9\u00e8\u4e2d".encode()),),
        (("authorization-bin", b"\x00\xff\xfe"),),
        (("authorization", "Bearer"),),
        (("authorization", "Bearer wrong"), ("authorization", "Bearer " + TOKENS["acme"])),
        (("authorization", " "),),
    ],
    ids=[
        "long-token",
        "huge-token",
        "many-headers",
        "non-ascii",
        "binary",
        "bearer-only",
        "two",
        "blank",
    ],
)
def test_hostile_metadata_is_refused_never_internal_and_the_server_stays_healthy(
    tls_server: ServerProcess, pki: dict, metadata
) -> None:
    stub = tls_stub(tls_server, pki["ca"].cert_path)
    code = code_of(lambda: stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=metadata, timeout=10))
    # The first authorization header counts; headers over gRPC's metadata size limit never reach a handler.
    assert code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED), code
    assert tls_server.health(SERVICE_NAME) == "SERVING"
    assert code_of(
        lambda: stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=bearer("acme"), timeout=10)
    ) == (grpc.StatusCode.OK)


# ---------------------------------------------------------------- exposure


def test_reflection_is_off_where_tokens_are_set(tls_server: ServerProcess, pki: dict) -> None:
    channel = grpc.secure_channel(tls_server.address, tls_credentials(pki["ca"].cert_path))
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([request]), metadata=bearer("acme"), timeout=5
    )
    with pytest.raises(grpc.RpcError) as caught:
        list(responses)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_metrics_serve_only_metrics_and_idle_connections_start_no_threads(tls_server: ServerProcess) -> None:
    base = f"http://127.0.0.1:{tls_server.metrics_port}"
    for path in ("/anything/../etc/passwd", "/", "/metrics/../x"):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(base + path, timeout=5)
        assert caught.value.code == 404
    with urllib.request.urlopen(base + "/metrics", timeout=5) as response:
        assert b"stylize_serving 1.0" in response.read()
    threads_before = process_status(tls_server.process.pid).threads
    idle = [socket.create_connection(("127.0.0.1", tls_server.metrics_port)) for _ in range(40)]
    try:
        time.sleep(0.5)
        threads_during = process_status(tls_server.process.pid).threads
        with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
            assert response.status == 200  # still answering: idle connections do not block it
    finally:
        for connection in idle:
            connection.close()
    assert threads_during <= threads_before + 1, (threads_before, threads_during)


def test_an_open_server_warns_loudly_at_start_up(server: ServerProcess) -> None:
    assert "OPEN SERVER: no --token-file" in server.log()
