"""The gRPC service end to end: a real stylize-server subprocess (CPU, random weights, 64 px) and a real
channel. Jobs, watchers, cancellation, bad input, server info and metrics."""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from collections.abc import Iterator

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image
from serverproc import (
    LONG,
    LONG_ITERATIONS,
    SMALL,
    StreamReader,
    collect,
    final_iteration,
    png_bytes,
    sample,
    scrape,
    stylize_request,
    wait_until,
)

from stylize.client.errors import field_violations
from stylize.v1 import stylize_pb2 as pb
from stylize.v1 import stylize_pb2_grpc

CALL_TIMEOUT = 120


@pytest.fixture()
def stub(server) -> Iterator[stylize_pb2_grpc.StyleTransferStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield stylize_pb2_grpc.StyleTransferStub(channel)


def kinds(events: list[pb.JobEvent]) -> list[str]:
    return [event.WhichOneof("event") for event in events]


def decode(image: pb.EncodedImage) -> Image.Image:
    decoded = Image.open(io.BytesIO(image.data))
    decoded.load()
    assert decoded.size == (image.width, image.height)
    return decoded


def test_stylize_streams_queued_started_progress_previews_and_a_decodable_result(stub) -> None:
    request = stylize_request(
        SMALL,
        preview=pb.PreviewOptions(every=2, max_size=32, format=pb.IMAGE_FORMAT_JPEG, quality=80),
        client_tag="stream-test",
    )
    events, code = collect(stub.Stylize(request, timeout=CALL_TIMEOUT))

    assert code == grpc.StatusCode.OK
    assert kinds(events) == ["queued", "started"] + ["progress"] * 6 + ["completed"]
    assert [event.sequence for event in events] == list(range(1, len(events) + 1))
    assert len({event.job_id for event in events}) == 1 and events[0].job_id
    assert all(event.client_tag == "stream-test" for event in events)
    elapsed = [event.elapsed_seconds for event in events]
    assert elapsed == sorted(elapsed)
    started = events[1].started
    assert started.device == "cpu" and started.iterations_total == 6
    assert [(s.width, s.height) for s in started.scales] == [(64, 64)]
    assert started.targets_backend == "onnxruntime:CPUExecutionProvider"
    # The request leaves precision at AUTO: what it resolved to on this CPU, never "auto" itself.
    assert started.precision in ("fp32", "bf16") and started.precision_reason and not started.warnings
    progress = [event.progress for event in events[2:-1]]
    assert [p.iteration for p in progress] == [1, 2, 3, 4, 5, 6]
    assert all(p.iterations_total == 6 and p.scales == 1 and p.losses.total > 0 for p in progress)
    assert [p.iteration for p in progress if p.HasField("preview")] == [2, 4, 6]
    for p in progress:
        if p.HasField("preview"):
            assert p.preview.format == pb.IMAGE_FORMAT_JPEG
            assert decode(p.preview).format == "JPEG" and max(decode(p.preview).size) == 32
    completed = events[-1].completed
    assert completed.iterations == 6 and completed.image.format == pb.IMAGE_FORMAT_PNG
    final = decode(completed.image)
    assert final.format == "PNG" and final.size == (64, 64)
    assert completed.run_seconds > 0 and completed.queue_seconds >= 0


def test_two_watchers_of_a_submitted_job_receive_the_same_events(server, stub) -> None:
    blocker = stub.SubmitJob(stylize_request(LONG), timeout=CALL_TIMEOUT)
    try:
        blocker_reader = StreamReader(stub.WatchJob(pb.WatchJobRequest(job_id=blocker.job_id), timeout=60))
        blocker_reader.wait_for_iteration(1)  # the only worker is busy now
        submitted = stub.SubmitJob(
            stylize_request(SMALL, preview=pb.PreviewOptions(every=3)), timeout=CALL_TIMEOUT
        )
        assert submitted.job_id and submitted.queue_position == 0
        results: dict[int, tuple[list[pb.JobEvent], grpc.StatusCode]] = {}

        def watch(index: int) -> None:
            results[index] = collect(stub.WatchJob(pb.WatchJobRequest(job_id=submitted.job_id), timeout=60))

        watchers = [threading.Thread(target=watch, args=(i,)) for i in range(2)]
        for thread in watchers:
            thread.start()
        # Both watchers follow the job while it waits in the queue (the blocker's reader is the third).
        wait_until(lambda: sample(scrape(server.metrics_url), "stylize_watchers") == 3, timeout=30)
    finally:
        stub.CancelJob(pb.CancelJobRequest(job_id=blocker.job_id), timeout=10)
    for thread in watchers:
        thread.join(60)
    (first, first_code), (second, second_code) = results[0], results[1]
    assert first_code == second_code == grpc.StatusCode.OK
    assert kinds(first) == ["queued", "started"] + ["progress"] * 6 + ["completed"]
    assert [e.SerializeToString() for e in first] == [e.SerializeToString() for e in second]
    blocker_reader.join(30)
    assert blocker_reader.code == grpc.StatusCode.CANCELLED


def test_a_late_watcher_gets_the_latest_preview_first_then_the_result(stub) -> None:
    submitted = stub.SubmitJob(stylize_request(SMALL, preview=pb.PreviewOptions(every=4)), timeout=10)
    live, _ = collect(stub.WatchJob(pb.WatchJobRequest(job_id=submitted.job_id), timeout=CALL_TIMEOUT))
    assert live[-1].HasField("completed")

    late, code = collect(stub.WatchJob(pb.WatchJobRequest(job_id=submitted.job_id), timeout=CALL_TIMEOUT))
    assert code == grpc.StatusCode.OK
    assert kinds(late) == ["queued", "started", "progress", "progress", "completed"]
    preview, latest = late[2].progress, late[3].progress
    assert preview.iteration == 4 and preview.HasField("preview")
    assert latest.iteration == 6 and not latest.HasField("preview")
    assert late[-1].SerializeToString() == live[-1].SerializeToString()


def test_cancel_job_stops_it_within_an_iteration_and_frees_the_worker(stub) -> None:
    long_job = stub.SubmitJob(stylize_request(LONG), timeout=10)
    reader = StreamReader(stub.WatchJob(pb.WatchJobRequest(job_id=long_job.job_id), timeout=CALL_TIMEOUT))
    reader.wait_for_iteration(3)
    next_job = stub.SubmitJob(stylize_request(SMALL), timeout=10)

    seen = reader.latest
    response = stub.CancelJob(pb.CancelJobRequest(job_id=long_job.job_id), timeout=10)
    assert response.state == pb.JOB_STATE_CANCELLED
    reader.join(30)
    assert reader.code == grpc.StatusCode.CANCELLED
    last, code = final_iteration(stub, long_job.job_id)
    assert code == grpc.StatusCode.CANCELLED and seen <= last < LONG_ITERATIONS

    events, code = collect(stub.WatchJob(pb.WatchJobRequest(job_id=next_job.job_id), timeout=CALL_TIMEOUT))
    assert code == grpc.StatusCode.OK and "started" in kinds(events) and events[-1].HasField("completed")
    again = stub.CancelJob(pb.CancelJobRequest(job_id=long_job.job_id), timeout=10)
    assert again.state == pb.JOB_STATE_CANCELLED  # idempotent
    done = stub.CancelJob(pb.CancelJobRequest(job_id=next_job.job_id), timeout=10)
    assert done.state == pb.JOB_STATE_SUCCEEDED  # a finished job keeps its state


def test_a_caller_that_cancels_its_stream_cancels_the_job(stub) -> None:
    call = stub.Stylize(stylize_request(LONG))  # no deadline: the server would refuse one this short
    for event in call:
        if event.HasField("progress") and event.progress.iteration >= 3:
            break
    seen = event.progress.iteration
    call.cancel()
    # A watcher that subscribed before the server saw the caller leave would keep the job alive (a job
    # with watchers is not cancelled), so watch only once the worker is free.
    wait_until(lambda: stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).queue.running == 0, 60)
    last, code = final_iteration(stub, event.job_id)
    assert code == grpc.StatusCode.CANCELLED and seen <= last < LONG_ITERATIONS
    follow_up, code = collect(stub.Stylize(stylize_request(SMALL), timeout=CALL_TIMEOUT))
    assert code == grpc.StatusCode.OK and follow_up[-1].HasField("completed")


def test_a_deadline_too_short_for_the_work_is_refused_up_front(stub) -> None:
    collect(stub.Stylize(stylize_request(SMALL), timeout=CALL_TIMEOUT))  # the server has measured its speed
    huge = {"size": 1024, "min_size": 1024, "initial_iterations": 5000, "optimizer": pb.OPTIMIZER_ADAM}
    began = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Stylize(stylize_request(huge), timeout=20))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline too short" in caught.value.details()
    assert time.monotonic() - began < 10


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb needs no more to be refused)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


TRUNCATED_PNG = png_bytes(3)[:300]
BAD_REQUESTS = {
    "no content": (lambda r: r.ClearField("content_image"), "content_image"),
    "content not an image": (lambda r: setattr(r, "content_image", b"GIF89a" + b"\0" * 50), "content_image"),
    "truncated content": (lambda r: setattr(r, "content_image", TRUNCATED_PNG), "content_image"),
    "decompression bomb": (
        lambda r: setattr(r.styles[0], "image", _png_header_only(50_000, 50_000)),
        "styles[0].image",
    ),
    "image over the byte limit": (
        lambda r: setattr(r, "content_image", b"\x89PNG" + b"\0" * (33 << 20)),
        "content_image",
    ),
    "no styles": (lambda r: r.ClearField("styles"), "styles"),
    "too many styles": (lambda r: r.styles.extend([r.styles[0]] * 8), "styles"),
    "negative style weight": (lambda r: setattr(r.styles[0], "weight", -1.0), "styles[0].weight"),
    "absurd style weight": (lambda r: setattr(r.styles[0], "weight", 1e12), "styles[0].weight"),
    "zero size": (lambda r: setattr(r.options, "size", 0), "options.size"),
    "huge size": (lambda r: setattr(r.options, "size", 100_000), "options.size"),
    "unknown layer": (
        lambda r: r.options.style_layers.extend([pb.LayerWeight(layer=n) for n in ("relu1_1", "relu9_9")]),
        "options.style_layers[1].layer",
    ),
    "negative content weight": (
        lambda r: setattr(r.options, "content_weight", -2.0),
        "options.content_weight",
    ),
    "absurd iterations": (lambda r: setattr(r.options, "initial_iterations", 10**9), "options.iterations"),
    "unknown enum value": (lambda r: setattr(r.options, "pooling", 42), "options.pooling"),
    "preview quality": (lambda r: setattr(r.preview, "quality", 0), "preview.quality"),
    "client tag too long": (lambda r: setattr(r, "client_tag", "x" * 129), "client_tag"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
@pytest.mark.parametrize("method", ["Stylize", "SubmitJob"])
def test_bad_input_gets_invalid_argument_naming_the_field(stub, case: str, method: str) -> None:
    mutate, field = BAD_REQUESTS[case]
    request = stylize_request(SMALL)
    mutate(request)
    with pytest.raises(grpc.RpcError) as caught:
        response = getattr(stub, method)(request, timeout=60)
        if method == "Stylize":
            list(response)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    fields = [violation.field for violation in field_violations(caught.value)]
    assert field in fields, (fields, caught.value.details())
    assert field in caught.value.details()


@pytest.mark.parametrize("method", ["Stylize", "SubmitJob", "WatchJob", "CancelJob"])
def test_bytes_that_are_not_the_request_message_get_invalid_argument(server, method: str) -> None:
    corrupt = b"\x0a\xff\xff\xff\xff\x0f"  # field 1 with a length far beyond the message
    path = f"/stylize.v1.StyleTransfer/{method}"
    with grpc.insecure_channel(server.address) as channel:
        if method in ("Stylize", "WatchJob"):
            _, code = collect(channel.unary_stream(path)(corrupt, timeout=30))
        else:
            with pytest.raises(grpc.RpcError) as caught:
                channel.unary_unary(path)(corrupt, timeout=30)
            code = caught.value.code()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "Traceback" not in server.log()


def test_unknown_and_missing_job_ids(stub) -> None:
    for rpc in (
        lambda r: list(stub.WatchJob(pb.WatchJobRequest(job_id=r), timeout=10)),
        lambda r: stub.CancelJob(pb.CancelJobRequest(job_id=r), timeout=10),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            rpc("no-such-job")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as caught:
            rpc("")
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in field_violations(caught.value)] == ["job_id"]


def test_server_info_reports_model_providers_parity_limits_queue_and_defaults(stub, model_dir) -> None:
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    assert info.version and info.device == "cpu"
    assert list(info.providers) == ["CPUExecutionProvider"]
    assert info.model.arch == "vgg19" and info.model.weights == "random"
    assert len(info.model.weights_sha256) == 64 and len(info.model.onnx_sha256) == 64
    assert list(info.model.layers) == ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu4_2", "relu5_1"]
    assert '"weights": "random"' in info.model.manifest_json
    assert info.parity.passed and info.parity.targets_backend == "onnxruntime"
    assert len(info.parity.layers) == 12
    assert all(0 < row.relative_error < info.parity.tolerance for row in info.parity.layers)
    assert info.limits.max_size == 2048 and info.limits.max_queue == 16 and info.limits.max_styles == 8
    assert info.queue.capacity == 16 and info.queue.workers == 1 and not info.queue.draining
    assert info.default_options.size == 512 and info.default_options.HasField("iterations")
    assert info.default_options.optimizer == pb.OPTIMIZER_LBFGS
    assert info.default_options.style_layers[0].layer == "relu1_1"
    assert "conv3_1" in info.available_layers
    [device] = info.devices
    assert device.device == "cpu" and device.auto_precision in ("fp32", "bf16")
    assert "probe" in device.auto_precision_reason or "no bf16 hardware" in device.auto_precision_reason


def test_metrics_after_a_job_show_jobs_queue_iterations_parity_and_grpc(server, stub) -> None:
    collect(stub.Stylize(stylize_request(SMALL, preview=pb.PreviewOptions(every=2)), timeout=CALL_TIMEOUT))
    with pytest.raises(grpc.RpcError):
        stub.SubmitJob(stylize_request({"size": 0}), timeout=10)
    samples = scrape(server.metrics_url)

    assert sample(samples, "stylize_jobs_total", status="succeeded") >= 1
    assert sample(samples, "stylize_jobs_total", status="rejected") >= 1
    assert sample(samples, "stylize_queue_wait_seconds_count") >= 1
    assert sample(samples, "stylize_job_duration_seconds_sum") > 0
    assert sample(samples, "stylize_iteration_seconds_count") >= 6
    assert sample(samples, "stylize_iteration_seconds_bucket", le="+Inf") >= 6
    assert sample(samples, "stylize_pixel_iterations_total") >= 6 * 64 * 64
    assert sample(samples, "stylize_previews_sent_total") >= 3
    assert sample(samples, "stylize_queue_depth") is not None
    assert sample(samples, "stylize_jobs_in_progress") is not None
    parity = sample(samples, "stylize_parity_relative_error", layer="relu5_1", quantity="gram")
    assert parity is not None and 0 < parity < 1e-3
    assert sample(samples, "stylize_parity_passed") == 1
    assert sample(samples, "stylize_serving") == 1
    assert sample(samples, "stylize_build_info") == 1
    auto = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).devices[0].auto_precision
    assert sample(samples, "stylize_device_info", device="cpu", auto_precision=auto) == 1
    assert sample(samples, "stylize_job_precision_total", device="cpu", precision=auto) >= 1
    assert (
        sample(
            samples, "stylize_model_info", weights="random", providers="CPUExecutionProvider", device="cpu"
        )
        == 1
    )
    labels = {"grpc_service": "stylize.v1.StyleTransfer"}
    assert (
        sample(
            samples, "grpc_server_started_total", grpc_method="Stylize", grpc_type="server_stream", **labels
        )
        >= 1
    )
    assert sample(samples, "grpc_server_handled_total", grpc_method="Stylize", grpc_code="OK", **labels) >= 1
    assert (
        sample(samples, "grpc_server_handled_total", grpc_method="SubmitJob", grpc_code="InvalidArgument")
        >= 1
    )
    assert sample(samples, "grpc_server_msg_sent_total", grpc_method="Stylize", **labels) >= 9
    assert sample(samples, "grpc_server_msg_received_total", grpc_method="Stylize", **labels) >= 1
    assert sample(samples, "grpc_server_handling_seconds_sum", grpc_method="Stylize", **labels) > 0
    if not _nvml_sees_a_gpu():
        assert not any(name.startswith("stylize_gpu_") for name, _ in samples)


def _nvml_sees_a_gpu() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount() > 0
    except Exception:
        return False


def test_reflection_lists_the_services(server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"stylize.v1.StyleTransfer", "grpc.health.v1.Health"} <= services


def test_health_reports_serving_for_the_server_and_the_service(server) -> None:
    assert server.health("") == "SERVING"
    assert server.health("stylize.v1.StyleTransfer") == "SERVING"


def test_a_job_is_counted_done_before_its_result_reaches_the_caller(server, stub) -> None:
    before = sample(scrape(server.metrics_url), "stylize_jobs_total", status="succeeded") or 0
    events, code = collect(stub.Stylize(stylize_request(SMALL), timeout=CALL_TIMEOUT))
    assert code == grpc.StatusCode.OK and events[-1].HasField("completed")
    samples = scrape(server.metrics_url)  # at once: no polling
    assert sample(samples, "stylize_jobs_total", status="succeeded") == before + 1
    assert sample(samples, "stylize_jobs_in_progress") == 0
