"""Server lifecycles, each on its own real server: start-up and the parity gate, tampered artifacts,
start-up errors, a full queue, deadlines, and graceful shutdown on SIGTERM."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from serverproc import (
    LONG,
    LONG_ITERATIONS,
    SERVER_COMMAND,
    SMALL,
    ServerProcess,
    StreamReader,
    collect,
    final_iteration,
    png_bytes,
    sample,
    scrape,
    stylize_request,
    wait_until,
)

from stylize.v1 import stylize_pb2 as pb
from stylize.v1 import stylize_pb2_grpc

TAMPERED_LAYER = "relu3_1"


def stub_for(server: ServerProcess) -> stylize_pb2_grpc.StyleTransferStub:
    return stylize_pb2_grpc.StyleTransferStub(grpc.insecure_channel(server.address))


def copy_model(model_dir: Path, destination: Path) -> Path:
    destination.mkdir()
    for name in ("vgg19.onnx", "vgg19.json"):
        shutil.copy(model_dir / name, destination / name)
    return destination


def scale_one_output(model_path: Path, layer: str, factor: float) -> None:
    """Multiply one graph output by `factor`, leaving the weights (and so the manifest's digest) alone:
    ONNX Runtime now disagrees with torch on exactly that layer."""
    model = onnx.load(str(model_path))
    raw = f"{layer}_untampered"
    for node in model.graph.node:
        node.output[:] = [raw if name == layer else name for name in node.output]
        node.input[:] = [raw if name == layer else name for name in node.input]
    model.graph.initializer.append(
        numpy_helper.from_array(np.array(factor, dtype=np.float32), "tamper_factor")
    )
    model.graph.node.append(helper.make_node("Mul", [raw, "tamper_factor"], [layer], name="tamper"))
    onnx.save(model, str(model_path))


def change_a_weight(model_path: Path) -> None:
    """Change features.0.weight inside the .onnx only: the manifest's weights digest no longer matches."""
    model = onnx.load(str(model_path))
    tensor = next(t for t in model.graph.initializer if t.name == "features.0.weight")
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * 1.01, tensor.name))
    onnx.save(model, str(model_path))


@pytest.fixture(scope="module")
def mismatched_model(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = copy_model(model_dir, tmp_path_factory.mktemp("tampered") / "model")
    scale_one_output(model / "vgg19.onnx", TAMPERED_LAYER, 1.01)
    return model


def test_health_is_serving_only_after_the_parity_probe_and_a_first_deadline_cancels_mid_job(
    model_dir,
) -> None:
    with ServerProcess(model_dir, "--device", "cpu", wait_for=None) as server:
        observed = [server.health()]  # the port is up before the model loads
        server.wait_health("SERVING", 120)
        assert observed == ["NOT_SERVING"]
        log = server.log()
        assert log.index("parity probe passed") < log.index("SERVING after")

        # A fresh server has measured no speed yet, so a deadline is accepted and ends the job mid-way.
        stub = stub_for(server)
        events, code = collect(stub.Stylize(stylize_request(LONG), timeout=4))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        seen = max((e.progress.iteration for e in events if e.HasField("progress")), default=0)
        last, code = final_iteration(stub, events[0].job_id)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and seen <= last < LONG_ITERATIONS
        # Counted as a deadline the server did not meet (what the error-rate alert sees), not as the
        # caller's cancellation.
        samples = scrape(server.metrics_url)
        assert sample(samples, "stylize_jobs_total", status="deadline_exceeded", reason="deadline") == 1
        assert sample(samples, "stylize_jobs_total", status="cancelled") is None

        def handled(code: str) -> float | None:
            return sample(
                scrape(server.metrics_url), "grpc_server_handled_total", grpc_method="Stylize", grpc_code=code
            )

        wait_until(lambda: handled("DeadlineExceeded") == 1, 10)
        assert handled("Canceled") == 0


def test_a_full_queue_refuses_the_next_job_with_resource_exhausted(model_dir) -> None:
    # No grace at the end: the long jobs are left running and would hold the shutdown for the default 30 s.
    # Pixels: each LONG or SMALL request holds 64x64 + 48x64 = 7168 decoded pixels while it waits.
    flags = ("--device", "cpu", "--workers", "1", "--max-queue", "2", "--max-queued-pixels", "20000")
    flags += ("--grace-seconds", "0")
    with ServerProcess(model_dir, *flags) as server:
        stub = stub_for(server)
        running = stub.SubmitJob(stylize_request(LONG), timeout=10)
        StreamReader(stub.WatchJob(pb.WatchJobRequest(job_id=running.job_id))).wait_for_iteration(1)
        queued = [stub.SubmitJob(stylize_request(LONG), timeout=10) for _ in range(2)]
        assert [response.queue_position for response in queued] == [0, 1]
        with pytest.raises(grpc.RpcError) as caught:
            stub.SubmitJob(stylize_request(SMALL), timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue full" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Stylize(stylize_request(SMALL), timeout=30))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Admission comes before decoding: undecodable bytes are refused for the queue, not as bad input.
        garbage = stylize_request(SMALL)
        garbage.content_image = b"not an image"
        with pytest.raises(grpc.RpcError) as caught:
            stub.SubmitJob(garbage, timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue full" in caught.value.details()
        queue = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).queue
        assert (queue.depth, queue.capacity, queue.running, queue.workers) == (2, 2, 1, 1)
        assert sample(scrape(server.metrics_url), "stylize_queue_depth") == 2

        # Cancelling a queued job frees its place at once.
        assert stub.CancelJob(pb.CancelJobRequest(job_id=queued[0].job_id), timeout=10).state == (
            pb.JOB_STATE_CANCELLED
        )
        # One place is free, but a 128x128 content would take the waiting pixels to 7168 + 19456 > 20000.
        larger = stylize_request(SMALL, content_image=png_bytes(1, (128, 128)))
        with pytest.raises(grpc.RpcError) as caught:
            stub.SubmitJob(larger, timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-queued-pixels" in caught.value.details()
        assert stub.SubmitJob(stylize_request(SMALL), timeout=10).queue_position == 1
        samples = scrape(server.metrics_url)
        assert sample(samples, "stylize_jobs_total", status="rejected", reason="queue_full") == 3
        assert sample(samples, "stylize_jobs_total", status="rejected", reason="queued_pixels") == 1


def test_sigterm_lets_jobs_finish_within_the_grace_period_cancels_the_rest_and_exits_0(model_dir) -> None:
    # Generous for a two-iteration job even on a loaded 2-core machine.
    grace = 10
    with ServerProcess(
        model_dir, "--device", "cpu", "--workers", "1", "--grace-seconds", str(grace)
    ) as server:
        stub = stub_for(server)
        short = StreamReader(stub.Stylize(stylize_request({**SMALL, "initial_iterations": 2})))
        short.wait_for_events(1)
        long = StreamReader(stub.Stylize(stylize_request(LONG)))  # queued behind the short one
        long.wait_for_events(1)
        short.wait_for_iteration(1)
        server.signal()
        wait_until(lambda: server.health() == "NOT_SERVING", timeout=30)
        with pytest.raises(grpc.RpcError) as caught:
            stub.SubmitJob(stylize_request(SMALL), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.wait(60) == 0
        for reader in (short, long):
            reader.join(10)
        assert short.code == grpc.StatusCode.OK  # finished within the grace period
        assert long.code == grpc.StatusCode.UNAVAILABLE and long.latest >= 1
        log = server.log()
        assert f"grace period of {grace} s over: cancelling 1 job(s)" in log
        assert "Traceback" not in log


def test_a_second_sigterm_cancels_at_once_instead_of_waiting_out_the_grace_period(model_dir) -> None:
    with ServerProcess(model_dir, "--device", "cpu", "--grace-seconds", "600") as server:
        stream = StreamReader(stub_for(server).Stylize(stylize_request(LONG)))
        stream.wait_for_iteration(1)
        server.signal()
        while "shutting down" not in server.log():
            time.sleep(0.05)
        server.signal()
        assert server.wait(60) == 0  # far sooner than the 600 s grace period
        stream.join(10)
        assert stream.code == grpc.StatusCode.UNAVAILABLE
        assert "second signal" in server.log()


def test_sigint_on_an_idle_server_exits_0(model_dir) -> None:
    with ServerProcess(model_dir, "--device", "cpu") as server:
        server.signal(2)
        assert server.wait(30) == 0


def test_an_onnx_graph_that_disagrees_with_torch_keeps_the_server_not_serving(mismatched_model) -> None:
    with ServerProcess(mismatched_model, "--device", "cpu", wait_for="NOT_SERVING") as server:
        stub = stub_for(server)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Stylize(stylize_request(SMALL), timeout=30))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "parity" in caught.value.details()
        info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        assert not info.parity.passed
        errors = {(row.layer, row.quantity): row.relative_error for row in info.parity.layers}
        assert errors[(TAMPERED_LAYER, "features")] == pytest.approx(0.01, rel=1e-3)
        assert errors[(TAMPERED_LAYER, "gram")] == pytest.approx(1.01**2 - 1, rel=1e-3)
        assert errors[("relu5_1", "features")] < 1e-4  # downstream layers see the untampered value
        samples = scrape(server.metrics_url)
        assert sample(samples, "stylize_parity_passed") == 0 and sample(samples, "stylize_serving") == 0
        assert "FAIL" in server.log() and "NOT_SERVING after" in server.log()


def test_parity_failure_with_the_torch_fallback_serves_with_torch_targets(mismatched_model) -> None:
    with ServerProcess(mismatched_model, "--device", "cpu", "--on-parity-failure", "torch") as server:
        stub = stub_for(server)
        info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        assert not info.parity.passed and info.parity.targets_backend == "torch"
        events, code = collect(stub.Stylize(stylize_request(SMALL), timeout=120))
        assert code == grpc.StatusCode.OK
        assert events[1].started.targets_backend == "torch" and events[-1].HasField("completed")


def run_server(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SERVER_COMMAND, "--port", "0", "--metrics-port", "0", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_weights_changed_in_the_onnx_but_not_the_manifest_refuse_to_start(model_dir, tmp_path) -> None:
    model = copy_model(model_dir, tmp_path / "model")
    change_a_weight(model / "vgg19.onnx")
    result = run_server("--model-dir", str(model), "--device", "cpu")
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(error_lines) == 1 and "digest" in error_lines[0] and "disagrees" in error_lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--model-dir", "/nonexistent/model"), "no such directory"),
        (("--device", "cuda"), "CUDA"),
        (("--providers", "cuda"), "CUDAExecutionProvider"),
        (("--workers", "0"), "--workers"),
        (("--port", "70000"), "--port"),
        (("--expect-weights-sha256", "abc"), "--expect-weights-sha256"),
        (("--expect-weights-sha256", "0" * 64), "not one --expect-weights-sha256 allows"),
    ],
)
def test_start_up_errors_are_one_line_and_exit_2(model_dir, args: tuple[str, ...], message: str) -> None:
    if args[0] != "--model-dir":
        args = ("--model-dir", str(model_dir), *args)
    if "cuda" in args and _torch_sees_cuda():
        pytest.skip("this machine has a GPU")
    result = run_server(*args)
    assert result.returncode == 2, result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert message in last_line and "Traceback" not in result.stderr


def test_the_pinned_weights_digest_serves(model_dir) -> None:
    digest = json.loads((model_dir / "vgg19.json").read_text())["state_dict_sha256"]
    pins = f"{'1' * 64},{digest.upper()}"
    with ServerProcess(model_dir, "--device", "cpu", "--expect-weights-sha256", pins) as server:
        assert stub_for(server).GetServerInfo(pb.GetServerInfoRequest(), timeout=10).model.arch == "vgg19"


def _torch_sees_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_help_documents_every_flag_and_its_variable() -> None:
    result = subprocess.run([*SERVER_COMMAND, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for flag in ("--model-dir", "--metrics-port", "--max-queue", "--providers", "--grace-seconds",
                 "--on-parity-failure", "--finished-job-ttl", "--max-input-pixels", "STYLIZE_"):  # fmt: skip
        assert flag in result.stdout
