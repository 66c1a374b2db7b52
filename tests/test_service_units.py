"""The service's pieces in-process: the job manager (with a fake engine: out-of-memory, failures,
cancellation, slow watchers), configuration, request conversion and metrics naming."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import replace

import grpc
import pytest
import torch
from prometheus_client import generate_latest
from serverproc import png_bytes, stylize_request

from stylize.api.options import DEFAULT_LIMITS, DEFAULTS, Optimizer, OptionsError, Pooling
from stylize.server import convert, jobs
from stylize.server.codec import decode_image
from stylize.server.config import ENV_PREFIX, build_parser, parse_config
from stylize.server.engine.imageio import tensor_to_pil
from stylize.server.engine.records import Cancelled, Losses, NonFiniteLoss, Progress, Result, Started
from stylize.server.metrics import ServiceMetrics, go_code_name, new_registry
from stylize.v1 import stylize_pb2 as pb

LOSSES = Losses(total=3.0, content=1.0, style=1.0, total_variation=1.0)


class FakeEngine:
    """A jobs.Executor whose jobs run `iterations` tiny steps, optionally failing at step `fail_at`."""

    def __init__(self, iterations: int = 3, fail_at: int | None = None, error: BaseException | None = None):
        self.iterations = iterations
        self.fail_at = fail_at
        self.error = error
        self.released = 0
        self.step = threading.Event()  # set to let a step run; cleared for a paused engine
        self.step.set()

    def device_name(self, worker: int) -> str:
        return "cpu"

    def run(self, request, cancel, worker) -> tuple[str, Iterator[Started | Progress | Result]]:
        return "fake", self._records(cancel)

    def _records(self, cancel: threading.Event) -> Iterator[Started | Progress | Result]:
        image = torch.full((3, 8, 8), 0.5)
        yield Started(((8, 8),), self.iterations, "fp32", "fake")
        for iteration in range(1, self.iterations + 1):
            self.step.wait(10)
            if cancel.is_set():
                raise Cancelled("cancelled")
            if iteration == self.fail_at:
                raise self.error
            yield Progress(iteration, self.iterations, 0, 1, 8, 8, LOSSES, 0.01 * iteration, 0.0, image)
        yield Result(image, LOSSES, self.iterations, 0.1)

    def to_image(self, tensor):
        return tensor_to_pil(tensor)

    def release_memory(self, worker: int) -> None:
        self.released += 1


def a_request() -> convert.JobRequest:
    return convert.request_from_proto(
        stylize_request({"size": 64, "min_size": 64, "initial_iterations": 3}), DEFAULT_LIMITS
    )


async def run_jobs(
    engine: FakeEngine, count: int, **manager_options
) -> tuple[list[jobs.Job], ServiceMetrics]:
    metrics = ServiceMetrics(new_registry())
    options = {"workers": 1, "max_queue": 4, "finished_job_ttl": 60.0, **manager_options}
    manager = jobs.JobManager(engine, metrics, loop=asyncio.get_running_loop(), **options)
    manager.start()
    submitted = [manager.submit(a_request(), owned_by_call=False)[0] for _ in range(count)]
    for job in submitted:
        async for _ in job.subscribe().events():
            pass
    await manager.drain(1.0)
    return submitted, metrics


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 bytes (out of memory)"),
        MemoryError(),
    ],
)
def test_out_of_memory_fails_that_job_with_resource_exhausted_and_the_next_job_runs(error) -> None:
    engine = FakeEngine(fail_at=2, error=error)

    async def scenario():
        first, _ = await run_jobs(engine, 1)
        engine.fail_at = None
        second, metrics = await run_jobs(engine, 1)
        return first[0], second[0], metrics

    failed, succeeded, _ = asyncio.run(scenario())
    assert failed.state == pb.JOB_STATE_FAILED
    assert (
        failed.status.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "out of memory" in failed.status.message
    )
    assert engine.released == 1
    assert succeeded.state == pb.JOB_STATE_SUCCEEDED and succeeded.status is None


def test_an_unexpected_engine_error_fails_the_job_with_internal() -> None:
    [job], metrics = asyncio.run(run_jobs(FakeEngine(fail_at=1, error=ValueError("boom")), 1))
    assert job.state == pb.JOB_STATE_FAILED and job.status.code == grpc.StatusCode.INTERNAL
    # The exception's text goes to the log only; the caller gets the job id to quote.
    assert "boom" not in job.status.message and job.id in job.status.message
    assert b'stylize_jobs_total{status="failed"} 1.0' in generate_latest(metrics.registry)


def test_a_non_finite_loss_fails_the_job_with_failed_precondition_naming_the_options() -> None:
    [job], metrics = asyncio.run(run_jobs(FakeEngine(fail_at=2, error=NonFiniteLoss("style", 2)), 1))
    assert job.state == pb.JOB_STATE_FAILED and job.status.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "style loss is not finite at iteration 2" in job.status.message
    assert "style_weight" in job.status.message
    assert b'stylize_jobs_total{status="failed"} 1.0' in generate_latest(metrics.registry)


def test_events_reach_every_subscriber_in_order_and_a_late_one_gets_a_replay() -> None:
    async def scenario():
        metrics = ServiceMetrics(new_registry())
        engine = FakeEngine(iterations=4)
        manager = jobs.JobManager(
            engine, metrics, workers=1, max_queue=2, finished_job_ttl=60, loop=asyncio.get_running_loop()
        )
        manager.start()
        job, position = manager.submit(a_request(), owned_by_call=False)
        early = [event async for event in job.subscribe().events()]
        late = [event async for event in job.subscribe().events()]
        await manager.drain(1.0)
        return position, early, late

    position, early, late = asyncio.run(scenario())
    assert position == 0
    assert [e.WhichOneof("event") for e in early] == ["queued", "started", *["progress"] * 4, "completed"]
    assert [e.sequence for e in early] == list(range(1, 8))
    assert [e.SerializeToString() for e in late] == [
        e.SerializeToString() for e in (early[0], early[1], early[-2], early[-1])
    ]  # queued, started, the latest progress (it carries the latest preview), completed


def test_a_slow_watcher_loses_old_progress_events_but_never_the_end() -> None:
    async def scenario():
        job = jobs.Job(a_request(), owned_by_call=False)
        subscription = job.subscribe()
        job.publish(convert.queued_event(0))
        for iteration in range(1, jobs.SUBSCRIBER_BACKLOG + 20):
            progress = Progress(iteration, 999, 0, 1, 8, 8, LOSSES, 0.0, 0.0)
            job.publish(convert.progress_event(progress, None))
        job.finish(pb.JOB_STATE_CANCELLED, None)
        return [event async for event in subscription.events()], subscription.dropped

    events, dropped = asyncio.run(scenario())
    assert len(events) == jobs.SUBSCRIBER_BACKLOG and dropped == 20
    assert events[0].HasField("queued")
    assert events[-1].progress.iteration == jobs.SUBSCRIBER_BACKLOG + 19


class EncodeGate(FakeEngine):
    """Blocks in the final encode (each Progress's image is encoded first), after the last cancel check,
    until `release` is set."""

    def __init__(self) -> None:
        super().__init__(iterations=2)
        self.encodes = 0
        self.encoding = threading.Event()
        self.release = threading.Event()

    def to_image(self, tensor):
        self.encodes += 1
        if self.encodes == self.iterations + 1:
            self.encoding.set()
            self.release.wait(10)
        return super().to_image(tensor)


def test_a_cancel_past_the_last_iteration_reports_the_completion_the_watchers_see() -> None:
    async def scenario():
        engine = EncodeGate()
        manager = jobs.JobManager(
            engine, ServiceMetrics(new_registry()), workers=1, max_queue=1, finished_job_ttl=60,
            loop=asyncio.get_running_loop(),
        )  # fmt: skip
        manager.start()
        job, _ = manager.submit(a_request(), owned_by_call=False)
        watcher = job.subscribe()
        await asyncio.to_thread(engine.encoding.wait, 10)
        manager.cancel(job, jobs.JobStatus(grpc.StatusCode.CANCELLED, "test"))
        answer = asyncio.ensure_future(job.wait_finished())
        await asyncio.sleep(0.05)
        answered_early = answer.done()
        engine.release.set()
        state = await answer
        events = [event async for event in watcher.events()]
        await manager.drain(1.0)
        return answered_early, state, events

    answered_early, state, events = asyncio.run(scenario())
    assert not answered_early  # no answer while the job's outcome is still open
    assert state == pb.JOB_STATE_SUCCEEDED and events[-1].HasField("completed")


def test_cancelling_a_queued_job_frees_its_place_at_once() -> None:
    async def scenario():
        metrics = ServiceMetrics(new_registry())
        engine = FakeEngine(iterations=2)
        engine.step.clear()  # the worker blocks inside the first job
        manager = jobs.JobManager(
            engine, metrics, workers=1, max_queue=1, finished_job_ttl=60, loop=asyncio.get_running_loop()
        )
        manager.start()
        running, _ = manager.submit(a_request(), owned_by_call=False)
        while manager.snapshot().running == 0:
            await asyncio.sleep(0.01)
        queued, _ = manager.submit(a_request(), owned_by_call=False)
        with pytest.raises(jobs.Rejected) as caught:
            manager.submit(a_request(), owned_by_call=False)
        assert caught.value.status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        manager.cancel(queued, jobs.JobStatus(grpc.StatusCode.CANCELLED, "test"))
        depth_after_cancel = manager.snapshot().depth
        replacement, _ = manager.submit(a_request(), owned_by_call=False)
        engine.step.set()
        for job in (running, replacement):
            async for _ in job.subscribe().events():
                pass
        manager.draining = True
        with pytest.raises(jobs.Rejected) as draining:
            manager.submit(a_request(), owned_by_call=False)
        await manager.drain(1.0)
        return queued, depth_after_cancel, running, replacement, draining.value.status

    queued, depth, running, replacement, draining = asyncio.run(scenario())
    assert queued.state == pb.JOB_STATE_CANCELLED and depth == 0
    assert running.state == replacement.state == pb.JOB_STATE_SUCCEEDED
    assert draining.code == grpc.StatusCode.UNAVAILABLE and draining.message == "server shutting down"


def test_a_finished_job_is_forgotten_after_its_ttl() -> None:
    async def scenario():
        metrics = ServiceMetrics(new_registry())
        manager = jobs.JobManager(
            FakeEngine(iterations=1),
            metrics,
            workers=1,
            max_queue=1,
            finished_job_ttl=0.2,
            loop=asyncio.get_running_loop(),
        )
        manager.start()
        job, _ = manager.submit(a_request(), owned_by_call=False)
        async for _ in job.subscribe().events():
            pass
        kept = manager.get(job.id) is job
        await asyncio.sleep(0.5)
        forgotten = manager.get(job.id) is None
        await manager.drain(1.0)
        return kept, forgotten

    assert asyncio.run(scenario()) == (True, True)


# ---------------------------------------------------------------- configuration


def test_flags_beat_environment_variables_which_beat_defaults() -> None:
    environ = {
        f"{ENV_PREFIX}MODEL_DIR": "/models",
        f"{ENV_PREFIX}MAX_QUEUE": "3",
        f"{ENV_PREFIX}PROVIDERS": "cuda,cpu",
    }
    config = parse_config(["--max-queue", "5"], environ)
    assert (
        str(config.model_dir) == "/models" and config.max_queue == 5 and config.providers == ("cuda", "cpu")
    )
    config = parse_config([], environ)
    assert config.max_queue == 3 and config.metrics_port == 9464 and config.limits == DEFAULT_LIMITS


@pytest.mark.parametrize(
    ("environ", "argv", "message"),
    [
        ({f"{ENV_PREFIX}MAX_QUEUE": "lots"}, ["--model-dir", "m"], "STYLIZE_MAX_QUEUE='lots'"),
        ({f"{ENV_PREFIX}ON_PARITY_FAILURE": "ignore"}, ["--model-dir", "m"], "choose from fail, torch"),
        ({}, [], "--model-dir"),
        ({}, ["--model-dir", "m", "--providers", "gpu"], "--providers"),
    ],
)
def test_bad_configuration_exits_2_with_one_line(environ, argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_config(argv, environ)
    assert caught.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_help_documents_every_flag_and_the_environment_variables() -> None:
    parser = build_parser()
    text = parser.format_help()
    flags = [action.option_strings[0] for action in parser._actions if action.option_strings]
    assert len(flags) > 20 and all(flag in text for flag in flags)
    assert f"{ENV_PREFIX}<FLAG>" in text and "9090 is Prometheus's own" in text


# ---------------------------------------------------------------- conversion


def test_unset_options_take_the_engine_defaults_and_set_zeros_stay_zero() -> None:
    assert convert.options_from_proto(pb.StyleOptions()) == DEFAULTS
    options = convert.options_from_proto(pb.StyleOptions(tv_weight=0.0, seed=0, pooling=pb.POOLING_AVERAGE))
    assert options == replace(DEFAULTS, tv_weight=0.0, pooling=Pooling.AVERAGE)


def test_default_options_survive_a_round_trip_through_the_proto() -> None:
    message = convert.options_to_proto(DEFAULTS)
    assert all(message.HasField(f) for f in ("size", "scale_factor", "seed", "lbfgs_history"))
    back = convert.options_from_proto(message)
    assert back.optimizer == Optimizer.LBFGS and back.style_layers == DEFAULTS.style_layers
    # float32 on the wire: sqrt(2) loses digits; numbers with a short decimal (0.02, 0.9) come back exactly.
    assert back.scale_factor == pytest.approx(DEFAULTS.scale_factor, rel=1e-7)
    assert replace(back, scale_factor=DEFAULTS.scale_factor) == DEFAULTS


def test_a_request_with_several_problems_reports_all_of_them() -> None:
    request = stylize_request({"size": 0, "style_layers": [pb.LayerWeight(layer="relu1_1", weight=-1.0)]})
    request.styles.add(image=png_bytes(5), weight=float("nan"))
    request.preview.every = 10**7
    with pytest.raises(OptionsError) as caught:
        convert.request_from_proto(request, DEFAULT_LIMITS)
    fields = {violation.field for violation in caught.value.violations}
    assert {"options.size", "options.style_layers[0].weight", "styles[1].weight", "preview.every"} <= fields


def test_style_weights_are_normalized_and_images_kept_upright() -> None:
    request = stylize_request()
    request.styles.add(image=png_bytes(6, (32, 40)), weight=3.0)
    job = convert.request_from_proto(request, DEFAULT_LIMITS)
    assert [weight for _, weight in job.styles] == [0.25, 0.75]
    assert job.content.size == (64, 64) and job.styles[1][0].size == (32, 40)
    assert job.output_encoding == "png" and job.preview.every == 0


# ---------------------------------------------------------------- metrics


def test_grpc_codes_are_named_as_go_grpc_prometheus_names_them() -> None:
    assert go_code_name(grpc.StatusCode.OK) == "OK"
    assert go_code_name(grpc.StatusCode.CANCELLED) == "Canceled"
    assert go_code_name(grpc.StatusCode.INVALID_ARGUMENT) == "InvalidArgument"
    assert go_code_name(grpc.StatusCode.RESOURCE_EXHAUSTED) == "ResourceExhausted"
    assert go_code_name(grpc.StatusCode.DEADLINE_EXCEEDED) == "DeadlineExceeded"


def test_every_job_status_is_exported_from_zero() -> None:
    text = generate_latest(ServiceMetrics(new_registry()).registry).decode()
    for status in ("succeeded", "failed", "cancelled", "rejected"):
        assert f'stylize_jobs_total{{status="{status}"}} 0.0' in text


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xd8\xff\xda\x00\x03",
        b"RIFF\0\0\0\0WEBPVP8 ",
        b"\x89PNG\r\n\x1a\n\0\0\0\0IHDR",
        png_bytes(7)[:20],
    ],
    ids=["jpeg-scan-without-header", "webp-empty-vp8", "png-empty-ihdr", "png-cut-in-ihdr"],
)
def test_images_that_break_pil_while_opening_name_the_field(data: bytes) -> None:
    with pytest.raises(OptionsError) as caught:
        decode_image(data, "styles[2].image", max_bytes=1 << 20, max_pixels=1 << 20)
    [violation] = caught.value.violations
    assert violation.field == "styles[2].image" and "could not be decoded" in violation.description
