"""The service's pieces in-process: the job manager (with a fake engine: out-of-memory, failures,
cancellation, slow watchers), configuration, request conversion and metrics naming."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import redis
import torch
from PIL import Image
from prometheus_client import generate_latest
from redisproc import RedisProcess
from serverproc import png_bytes, stylize_request
from test_reliability_fuzz import png_claiming

from stylize.api import wire
from stylize.api.options import DEFAULT_LIMITS, DEFAULTS, FieldViolation, Optimizer, OptionsError, Pooling
from stylize.server import convert, jobs
from stylize.server.auth import Tenant, TenantLimits
from stylize.server.broker import Broker, BrokerUnavailable, JobEnd, JobOwner, Rejected
from stylize.server.broker.memory import SUBSCRIBER_BACKLOG, Job, MemoryBroker
from stylize.server.broker.redis import RedisBroker
from stylize.server.codec import decode_image
from stylize.server.config import ENV_PREFIX, ServerConfig, build_parser, parse_config
from stylize.server.engine.imageio import tensor_to_pil
from stylize.server.engine.records import Cancelled, Losses, NonFiniteLoss, Progress, Result, Started
from stylize.server.errors import InternalErrorInterceptor, JobStatus
from stylize.server.main import server_options
from stylize.server.metrics import (
    GrpcMetrics,
    GrpcMetricsInterceptor,
    ServiceMetrics,
    _CallRecorder,
    go_code_name,
    new_registry,
)
from stylize.server.service import DecodeSlots, PixelBudget
from stylize.v1 import stylize_pb2 as pb

ORIENTATION = 0x0112  # the EXIF tag
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


def a_message() -> pb.StylizeRequest:
    return stylize_request({"size": 64, "min_size": 64, "initial_iterations": 3})


def a_request() -> convert.JobRequest:
    return convert.request_from_proto(a_message(), DEFAULT_LIMITS)


def memory_broker(max_queue: int = 4, finished_job_ttl: float = 60.0) -> Broker:
    return MemoryBroker(
        max_queue=max_queue, finished_job_ttl=finished_job_ttl, loop=asyncio.get_running_loop()
    )


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisProcess]:
    with RedisProcess() as server:
        yield server


BrokerFactory = Callable[..., Broker]
ANYONE = JobOwner()
UNLIMITED = TenantLimits()


@pytest.fixture(params=["memory", "redis"])
def make_broker(request: pytest.FixtureRequest) -> BrokerFactory:
    """Builds the broker under test on the running loop; the redis one on a real, emptied redis-server."""
    if request.param == "memory":
        return memory_broker
    server = request.getfixturevalue("redis_server")
    redis.Redis.from_url(server.url).flushall()
    return lambda max_queue=4, finished_job_ttl=60.0: RedisBroker(
        server.url,
        loop=asyncio.get_running_loop(),
        limits=DEFAULT_LIMITS,
        max_queue=max_queue,
        finished_job_ttl=finished_job_ttl,
        lease_seconds=5.0,
        max_attempts=2,
    )


async def start_manager(
    engine: FakeEngine, make_broker: BrokerFactory, metrics: ServiceMetrics | None = None, **broker_options
) -> jobs.JobManager:
    broker = make_broker(**broker_options)
    await broker.start()
    manager = jobs.JobManager(engine, metrics or ServiceMetrics(new_registry()), broker, workers=1)
    manager.start()
    return manager


async def stop_manager(manager: jobs.JobManager) -> None:
    await manager.drain(1.0)
    await manager.broker.close()


async def submit(
    manager: jobs.JobManager,
    owner: JobOwner = ANYONE,
    limits: TenantLimits = UNLIMITED,
    work: int = 1,
) -> tuple[str, int]:
    return await manager.broker.submit(
        a_message(), a_request(), owned_by_call=False, owner=owner, limits=limits, work=work
    )


async def follow(manager: jobs.JobManager, job_id: str) -> tuple[list[pb.JobEvent], JobEnd]:
    events: list[pb.JobEvent] = []
    async for item in manager.broker.follow(job_id):
        if isinstance(item, JobEnd):
            return events, item
        events.append(item)
    raise AssertionError("follow ended without a JobEnd")


async def run_jobs(
    engine: FakeEngine, make_broker: BrokerFactory, count: int
) -> tuple[list[tuple[str, JobEnd]], ServiceMetrics]:
    metrics = ServiceMetrics(new_registry())
    manager = await start_manager(engine, make_broker, metrics)
    submitted = [(await submit(manager))[0] for _ in range(count)]
    ends = [(job_id, (await follow(manager, job_id))[1]) for job_id in submitted]
    await stop_manager(manager)
    return ends, metrics


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
        first, _ = await run_jobs(engine, memory_broker, 1)
        engine.fail_at = None
        second, metrics = await run_jobs(engine, memory_broker, 1)
        return first[0][1], second[0][1], metrics

    failed, succeeded, _ = asyncio.run(scenario())
    assert failed.state == pb.JOB_STATE_FAILED
    assert (
        failed.status.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "out of memory" in failed.status.message
    )
    assert engine.released == 1
    assert succeeded.state == pb.JOB_STATE_SUCCEEDED and succeeded.status is None


def test_an_unexpected_engine_error_fails_the_job_with_internal(make_broker) -> None:
    [(job_id, end)], metrics = asyncio.run(
        run_jobs(FakeEngine(fail_at=1, error=ValueError("boom")), make_broker, 1)
    )
    assert end.state == pb.JOB_STATE_FAILED and end.status.code == grpc.StatusCode.INTERNAL
    # The exception's text goes to the log only; the caller gets the job id to quote.
    assert "boom" not in end.status.message and job_id in end.status.message
    text = generate_latest(metrics.registry).decode()
    assert 'stylize_jobs_total{arch="vgg19",reason="internal",status="failed"} 1.0' in text


def test_a_non_finite_loss_fails_the_job_with_failed_precondition_naming_the_options(make_broker) -> None:
    [(_, end)], metrics = asyncio.run(
        run_jobs(FakeEngine(fail_at=2, error=NonFiniteLoss("style", 2)), make_broker, 1)
    )
    assert end.state == pb.JOB_STATE_FAILED and end.status.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "style loss is not finite at iteration 2" in end.status.message
    assert "style_weight" in end.status.message
    text = generate_latest(metrics.registry).decode()
    assert 'stylize_jobs_total{arch="vgg19",reason="non_finite",status="failed"} 1.0' in text


def test_a_succeeded_job_is_timed_by_phase_size_class_and_first_progress() -> None:
    _, metrics = asyncio.run(run_jobs(FakeEngine(iterations=3), memory_broker, 1))
    text = generate_latest(metrics.registry).decode()
    assert 'stylize_jobs_total{arch="vgg19",reason="ok",status="succeeded"} 1.0' in text
    for phase in ("targets", "optimize", "encode"):
        assert f'stylize_job_phase_seconds_count{{phase="{phase}"}} 1.0' in text
    assert 'stylize_iteration_seconds_count{size_class="small"} 3.0' in text
    assert 'stylize_job_duration_seconds_count{size_class="small"} 1.0' in text
    assert "stylize_time_to_first_progress_seconds_count 1.0" in text
    assert 'stylize_queue_wait_seconds_bucket{le="0.005"}' in text


def test_events_reach_every_subscriber_in_order_and_a_late_one_gets_a_replay(make_broker) -> None:
    async def scenario():
        manager = await start_manager(FakeEngine(iterations=4), make_broker, max_queue=2)
        job_id, position = await submit(manager)
        early, _ = await follow(manager, job_id)
        late, end = await follow(manager, job_id)
        await stop_manager(manager)
        return position, early, late, end

    position, early, late, end = asyncio.run(scenario())
    assert position == 0 and end.state == pb.JOB_STATE_SUCCEEDED and end.status is None
    assert [e.WhichOneof("event") for e in early] == ["queued", "started", *["progress"] * 4, "completed"]
    assert [e.sequence for e in early] == list(range(1, 8))
    assert early[0].queued.position == 0 and early[1].started.attempt == 1
    assert [e.SerializeToString() for e in late] == [
        e.SerializeToString() for e in (early[0], early[1], early[-2], early[-1])
    ]  # queued, started, the latest progress (it carries the latest preview), completed


def test_a_slow_watcher_loses_old_progress_events_but_never_the_end() -> None:
    async def scenario():
        job = Job(a_request(), owned_by_call=False, owner=JobOwner())
        subscription = job.subscribe()
        job.publish(convert.queued_event(0))
        for iteration in range(1, SUBSCRIBER_BACKLOG + 20):
            progress = Progress(iteration, 999, 0, 1, 8, 8, LOSSES, 0.0, 0.0)
            job.publish(convert.progress_event(progress, None))
        job.finish(pb.JOB_STATE_CANCELLED, None)
        return [event async for event in subscription.events()], subscription.dropped

    events, dropped = asyncio.run(scenario())
    assert len(events) == SUBSCRIBER_BACKLOG and dropped == 20
    assert events[0].HasField("queued")
    assert events[-1].progress.iteration == SUBSCRIBER_BACKLOG + 19


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


def test_a_cancel_past_the_last_iteration_reports_the_completion_the_watchers_see(make_broker) -> None:
    async def scenario():
        engine = EncodeGate()
        manager = await start_manager(engine, make_broker, max_queue=1)
        job_id, _ = await submit(manager)
        watcher = asyncio.ensure_future(follow(manager, job_id))
        await asyncio.to_thread(engine.encoding.wait, 10)
        await manager.broker.cancel(job_id, JobStatus(grpc.StatusCode.CANCELLED, "test"))
        answer = asyncio.ensure_future(manager.broker.wait_finished(job_id))
        await asyncio.sleep(0.05)
        answered_early = answer.done()
        engine.release.set()
        state = await answer
        events, _ = await watcher
        await stop_manager(manager)
        return answered_early, state, events

    answered_early, state, events = asyncio.run(scenario())
    assert not answered_early  # no answer while the job's outcome is still open
    assert state == pb.JOB_STATE_SUCCEEDED and events[-1].HasField("completed")


def test_a_running_job_is_cancelled_within_an_iteration(make_broker) -> None:
    async def scenario():
        engine = FakeEngine(iterations=1000)
        manager = await start_manager(engine, make_broker)
        job_id, _ = await submit(manager)
        async for item in manager.broker.follow(job_id):
            if isinstance(item, pb.JobEvent) and item.HasField("progress"):
                break
        ended_here = await manager.broker.cancel(job_id, JobStatus(grpc.StatusCode.CANCELLED, "test"))
        state = await asyncio.wait_for(manager.broker.wait_finished(job_id), 10)
        _, end = await follow(manager, job_id)
        await stop_manager(manager)
        return ended_here, state, end

    ended_here, state, end = asyncio.run(scenario())
    assert not ended_here and state == pb.JOB_STATE_CANCELLED
    assert end.status.code == grpc.StatusCode.CANCELLED and end.status.message == "test"


def test_a_job_stopped_by_its_callers_deadline_counts_as_deadline_exceeded_not_cancelled(make_broker) -> None:
    async def scenario():
        metrics = ServiceMetrics(new_registry())
        manager = await start_manager(FakeEngine(iterations=1000), make_broker, metrics)
        job_id, _ = await submit(manager)
        async for item in manager.broker.follow(job_id):
            if isinstance(item, pb.JobEvent) and item.HasField("progress"):
                break
        passed = JobStatus(
            grpc.StatusCode.DEADLINE_EXCEEDED, "the caller's deadline passed", reason="deadline"
        )
        await manager.broker.cancel(job_id, passed)
        state = await asyncio.wait_for(manager.broker.wait_finished(job_id), 10)
        await stop_manager(manager)
        return state, generate_latest(metrics.registry).decode()

    state, text = asyncio.run(scenario())
    assert state == pb.JOB_STATE_CANCELLED  # what watchers see: the job was stopped
    assert 'stylize_jobs_total{arch="vgg19",reason="deadline",status="deadline_exceeded"} 1.0' in text
    assert 'status="cancelled"' not in text


def test_the_memory_broker_counts_the_decoded_pixels_of_waiting_jobs_only(make_broker) -> None:
    async def scenario():
        engine = FakeEngine(iterations=2)
        engine.step.clear()  # the worker blocks inside the first job
        manager = await start_manager(engine, make_broker, max_queue=3)
        held = [manager.broker.held_pixels()]
        await submit(manager)
        while manager.snapshot().running == 0:
            await asyncio.sleep(0.01)
        held.append(manager.broker.held_pixels())  # the running job's images are no longer waiting
        waiting = [(await submit(manager))[0] for _ in range(2)]
        held.append(manager.broker.held_pixels())
        await manager.broker.cancel(waiting[0], JobStatus(grpc.StatusCode.CANCELLED, "test"))
        held.append(manager.broker.held_pixels())
        engine.step.set()
        await follow(manager, waiting[1])
        held.append(manager.broker.held_pixels())
        await stop_manager(manager)
        return held

    pixels = a_request().pixels
    assert pixels == 64 * 64 + 48 * 64
    expected = [0, 0, 2 * pixels, pixels, 0] if make_broker is memory_broker else [0] * 5
    assert asyncio.run(scenario()) == expected


def test_a_finished_job_keeps_its_events_but_not_its_decoded_images() -> None:
    """The memory broker keeps a finished job watchable for finished_job_ttl; its images (up to 9 x 40 Mpx)
    must not stay with it."""

    async def scenario():
        manager = await start_manager(FakeEngine(iterations=1), memory_broker)
        job_id, _ = await submit(manager)
        await follow(manager, job_id)
        job = manager.broker._jobs[job_id]
        late, end = await follow(manager, job_id)
        await stop_manager(manager)
        return job, late, end

    job, late, end = asyncio.run(scenario())
    assert job.request is None and end.state == pb.JOB_STATE_SUCCEEDED
    assert late[-1].HasField("completed") and late[-1].client_tag == job.client_tag


def test_cancelling_a_queued_job_frees_its_place_at_once(make_broker) -> None:
    async def scenario():
        engine = FakeEngine(iterations=2)
        engine.step.clear()  # the worker blocks inside the first job
        manager = await start_manager(engine, make_broker, max_queue=1)
        running, _ = await submit(manager)
        while manager.snapshot().running == 0:
            await asyncio.sleep(0.01)
        queued, _ = await submit(manager)
        # The figures the metrics and GetServerInfo report (Redis: polled, a tick late at most).
        async with asyncio.timeout(5):
            while (figures := manager.broker.figures()).depth != 1:
                await asyncio.sleep(0.05)
        assert figures.capacity == 1 and 0 <= figures.oldest_wait_seconds < 5
        with pytest.raises(Rejected) as caught:
            await submit(manager)
        assert caught.value.status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        ended_here = await manager.broker.cancel(queued, JobStatus(grpc.StatusCode.CANCELLED, "test"))
        replacement, _ = await submit(manager)
        engine.step.set()
        ends = [(await follow(manager, job_id))[1] for job_id in (queued, running, replacement)]
        manager.broker.start_draining()
        with pytest.raises(Rejected) as draining:
            await submit(manager)
        await stop_manager(manager)
        return ended_here, ends, draining.value.status

    ended_here, (queued, running, replacement), draining = asyncio.run(scenario())
    assert ended_here and queued.state == pb.JOB_STATE_CANCELLED
    assert running.state == replacement.state == pb.JOB_STATE_SUCCEEDED
    assert draining.code == grpc.StatusCode.UNAVAILABLE and draining.message == "server shutting down"


def test_tenant_limits_refuse_that_tenant_with_the_limit_named_while_another_tenant_runs(make_broker) -> None:
    async def scenario():
        engine = FakeEngine(iterations=2)
        engine.step.clear()  # the first job holds the only worker
        manager = await start_manager(engine, make_broker, max_queue=8)
        acme, other = JobOwner("acme", "ab" * 32), JobOwner("other")
        one_job = TenantLimits(max_jobs_in_flight=1)
        first, _ = await submit(manager, acme, one_job)
        refusals = []
        with pytest.raises(Rejected) as caught:
            await submit(manager, acme, one_job)
        refusals.append(caught.value.status)
        budget = TenantLimits(max_pixel_iterations_per_minute=1000)
        await submit(manager, other, budget, work=600)
        with pytest.raises(Rejected) as caught:
            await submit(manager, other, budget, work=600)
        refusals.append(caught.value.status)
        queued = TenantLimits(max_queued=1)
        with pytest.raises(Rejected) as caught:
            await submit(manager, other, queued)  # other's first job is still waiting
        refusals.append(caught.value.status)
        owners = (await manager.broker.owner(first), await manager.broker.owner("0" * 32))
        engine.step.set()
        await follow(manager, first)
        second, _ = await submit(manager, acme, one_job)  # acme's first job ended: room again
        await follow(manager, second)
        await stop_manager(manager)
        return refusals, owners

    refusals, (owner, unknown) = asyncio.run(scenario())
    assert [status.code for status in refusals] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
    assert "'acme'" in refusals[0].message and "max_jobs_in_flight 1" in refusals[0].message
    assert "max_pixel_iterations_per_minute 1000 (now 1200)" in refusals[1].message
    assert 0 < refusals[1].retry_after_seconds <= 60
    assert "max_queued 1" in refusals[2].message and refusals[2].reason == "tenant_limit"
    assert owner == JobOwner("acme", "ab" * 32) and unknown is None


def test_a_finished_job_is_forgotten_after_its_ttl(make_broker) -> None:
    async def scenario():
        manager = await start_manager(FakeEngine(iterations=1), make_broker, max_queue=1, finished_job_ttl=1)
        job_id, _ = await submit(manager)
        await follow(manager, job_id)
        kept = await manager.broker.owner(job_id) is not None
        await asyncio.sleep(1.6)
        forgotten = await manager.broker.owner(job_id) is None
        await stop_manager(manager)
        return kept, forgotten

    assert asyncio.run(scenario()) == (True, True)


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
        ({}, ["--model-dir", "m", "--broker", "redis://localhost/0"], "redis://HOST:PORT/DB"),
        ({f"{ENV_PREFIX}BROKER": "rediss://h:1/0"}, ["--model-dir", "m"], "STYLIZE_BROKER='rediss://h:1/0'"),
        ({}, ["--model-dir", "m", "--broker", "redis://h:1/zero"], "--broker"),
        ({}, ["--model-dir", "m", "--lease-seconds", "0"], "--lease-seconds"),
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
    message = wire.options_to_proto(DEFAULTS)
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


def test_every_header_is_checked_before_any_pixel_is_decoded(monkeypatch) -> None:
    """A request whose last style is a decompression bomb costs no decoding of the images before it, and
    its decoded pixels are known from the headers alone."""
    loaded: list[str] = []
    monkeypatch.setattr(convert, "load_image", lambda image, field: loaded.append(field) or image)
    request = stylize_request()
    request.styles.add(image=png_claiming(50_000, 50_000))
    with pytest.raises(OptionsError) as caught:
        convert.request_from_proto(request, DEFAULT_LIMITS)
    assert [v.field for v in caught.value.violations] == ["styles[1].image"]
    with pytest.raises(OptionsError):
        convert.input_pixels(request, DEFAULT_LIMITS)
    assert loaded == []
    del request.styles[1]
    assert convert.input_pixels(request, DEFAULT_LIMITS) == 64 * 64 + 48 * 64
    assert loaded == []
    convert.request_from_proto(request, DEFAULT_LIMITS)
    assert loaded == ["content_image", "styles[0].image"]


def test_style_weights_default_to_one_and_images_are_kept_upright() -> None:
    request = stylize_request()
    request.styles.add(image=png_bytes(6, (32, 40)), weight=3.0)
    job = convert.request_from_proto(request, DEFAULT_LIMITS)
    assert [weight for _, weight in job.styles] == [1.0, 3.0]
    assert job.content.size == (64, 64) and job.styles[1][0].size == (32, 40)
    assert job.output_encoding == "png" and job.preview.every == 0


def test_a_photo_with_an_exif_orientation_is_decoded_upright() -> None:
    """Orientation 6 (the camera was turned 90 degrees clockwise): the decoded image is turned back, its
    width and height swapped, and the tag gone so nothing turns it twice."""
    photo = Image.new("RGB", (40, 32), (255, 0, 0))
    photo.paste((0, 0, 255), (0, 0, 20, 32))  # the left half blue
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    decoded = decode_image(buffer.getvalue(), "content_image", max_bytes=1 << 20, max_pixels=1 << 20)
    assert decoded.size == (32, 40) and ORIENTATION not in decoded.getexif()
    top, bottom = decoded.getpixel((16, 2)), decoded.getpixel((16, 37))
    assert top[2] > 200 and top[0] < 60  # the left (blue) half is on top once turned back
    assert bottom[0] > 200 and bottom[2] < 60


def wire_bytes(status: JobStatus) -> int:
    """What the status's trailers take on the wire: grpc-message percent-encoded (gRPC keeps printable
    ASCII but '%'), grpc-status-details-bin in base64."""
    message = sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in status.message.encode())
    details = dict(status.to_rpc_status().trailing_metadata)["grpc-status-details-bin"]
    return message + len(base64.b64encode(details))


@pytest.mark.parametrize("name", ["ascii", "non-ascii"])
def test_an_invalid_argument_fits_the_clients_metadata_limit_however_many_violations(name) -> None:
    """gRPC clients refuse trailers over 8 KiB (their soft limit): the violations that fit are sent, the
    rest are counted in the message. 37 unknown layers used to make 15.5 KiB."""
    value = "nope" if name == "ascii" else "層%" * 6
    violations = [
        FieldViolation(f"options.style_layers[{i}].layer", f"unknown vgg19 layer '{value}{i}'; valid: ...")
        for i in range(1000)
    ]
    status = JobStatus.invalid(OptionsError(violations))
    assert wire_bytes(status) < 8192
    kept = len(status.violations)
    assert 10 < kept < 1000 and status.violations == tuple(violations[:kept])
    assert status.message.endswith(f" ({1000 - kept} more violations not listed)")
    few = JobStatus.invalid(OptionsError(violations[:3]))
    assert len(few.violations) == 3 and few.message == str(OptionsError(violations[:3]))


# ---------------------------------------------------------------- metrics


def test_grpc_codes_are_named_as_go_grpc_prometheus_names_them() -> None:
    assert go_code_name(grpc.StatusCode.OK) == "OK"
    assert go_code_name(grpc.StatusCode.CANCELLED) == "Canceled"
    assert go_code_name(grpc.StatusCode.INVALID_ARGUMENT) == "InvalidArgument"
    assert go_code_name(grpc.StatusCode.RESOURCE_EXHAUSTED) == "ResourceExhausted"
    assert go_code_name(grpc.StatusCode.DEADLINE_EXCEEDED) == "DeadlineExceeded"


class EndedContext:
    """What _CallRecorder reads of a call whose handler was cancelled: no code set, the time left."""

    def __init__(self, remaining: float | None):
        self.remaining = remaining

    def code(self) -> None:
        return None

    def time_remaining(self) -> float | None:
        return self.remaining


@pytest.mark.parametrize(
    ("remaining", "expected"),
    [(None, "Canceled"), (30.0, "Canceled"), (0.2, "DeadlineExceeded"), (-0.1, "DeadlineExceeded")],
)
def test_a_cancelled_call_at_its_deadline_is_counted_deadline_exceeded(remaining, expected) -> None:
    registry = new_registry()
    recorder = _CallRecorder(GrpcMetrics(registry), ("server_stream", "stylize.v1.StyleTransfer", "Stylize"))
    recorder.finish(EndedContext(remaining), asyncio.CancelledError())
    text = generate_latest(registry).decode()
    assert f'grpc_server_handled_total{{grpc_code="{expected}",grpc_method="Stylize"' in text


def test_the_queued_pixel_cap_is_one_default_that_the_flag_and_the_readme_state() -> None:
    default = ServerConfig(model_dir=Path("m")).max_queued_pixels
    assert parse_config(["--model-dir", "m"], {}).max_queued_pixels == default
    assert (
        parse_config(["--model-dir", "m"], {f"{ENV_PREFIX}MAX_QUEUED_PIXELS": "1000"}).max_queued_pixels
        == 1000
    )
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f"`--max-queued-pixels` (decoded\n  width x height, default {default:,}" in readme


def test_the_broker_flag_takes_memory_or_a_redis_url() -> None:
    assert parse_config(["--model-dir", "m"], {}).broker == "memory"
    config = parse_config(["--model-dir", "m"], {f"{ENV_PREFIX}BROKER": "redis://redis.stylize:6379/2"})
    assert config.broker == "redis://redis.stylize:6379/2"


def test_connections_rotate_after_the_configured_age_with_no_limit_on_a_running_stream() -> None:
    options = dict(
        server_options(parse_config(["--model-dir", "m", "--max-connection-age-seconds", "120"], {}))
    )
    assert options["grpc.max_connection_age_ms"] == 120_000
    assert "grpc.max_connection_age_grace_ms" not in options  # gRPC's default: no limit
    assert (
        dict(server_options(parse_config(["--model-dir", "m"], {})))["grpc.max_connection_age_ms"] == 300_000
    )


def test_every_grpc_method_and_code_is_exported_from_zero_before_the_first_call() -> None:
    registry = new_registry()
    GrpcMetricsInterceptor(registry).initialize([pb.DESCRIPTOR.services_by_name["StyleTransfer"]])
    text = generate_latest(registry).decode()
    for method, kind in (("Stylize", "server_stream"), ("SubmitJob", "unary"), ("CancelJob", "unary")):
        labels = f'grpc_method="{method}",grpc_service="stylize.v1.StyleTransfer",grpc_type="{kind}"'
        assert f"grpc_server_started_total{{{labels}}} 0.0" in text
        for code in ("OK", "Canceled", "DeadlineExceeded", "Unavailable"):
            assert f'grpc_server_handled_total{{grpc_code="{code}",{labels}}} 0.0' in text


def test_every_rejection_reason_is_exported_from_zero() -> None:
    text = generate_latest(ServiceMetrics(new_registry()).registry).decode()
    for reason in ("invalid_argument", "queue_full", "deadline_too_short", "shutdown", "unavailable"):
        assert f'stylize_jobs_total{{arch="",reason="{reason}",status="rejected"}} 0.0' in text


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


# ---------------------------------------------------------------- errors and limits


def test_an_unexpected_handler_exception_is_internal_with_a_request_id_and_no_text(caplog) -> None:
    async def scenario() -> grpc.aio.AioRpcError:
        async def broken(request: bytes, context) -> bytes:
            raise ValueError("secret path /etc/stylize/internal")

        handler = grpc.method_handlers_generic_handler(
            "test.Broken", {"Call": grpc.unary_unary_rpc_method_handler(broken)}
        )
        server = grpc.aio.server(interceptors=[InternalErrorInterceptor()])
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await channel.unary_unary("/test.Broken/Call")(b"", timeout=10)
        finally:
            await server.stop(0)
        return caught.value

    error = asyncio.run(scenario())
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in error.details() and "ValueError" not in error.details()
    request_id = error.details().split("request id ")[1].split(";")[0]
    assert len(request_id) == 16 and request_id in caplog.text and "secret path" in caplog.text


def test_a_tenant_gets_only_its_concurrent_decodes() -> None:
    slots = DecodeSlots()
    limited, other = Tenant("acme", TenantLimits(max_concurrent_decodes=1)), Tenant("other")
    with slots.slot(limited) as first, slots.slot(other) as unlimited, slots.slot(limited) as second:
        assert first is None and unlimited is None
        assert second is not None and second.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_concurrent_decodes 1" in second.message and second.retry_after_seconds == 1.0
    with slots.slot(limited) as again:
        assert again is None  # the slot was given back


def test_the_pixel_budget_counts_decoding_and_waiting_requests_and_admits_one_alone() -> None:
    budget = PixelBudget(1000)
    assert budget.refusal(5000, queued=0) is None  # alone: admitted, however large
    assert budget.refusal(600, queued=400) is None
    refused = budget.refusal(601, queued=400)
    assert refused is not None and refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.outcome_reason == "queued_pixels" and "--max-queued-pixels" in refused.message
    with budget.holding(700):
        assert budget.refusal(301, queued=0) is not None  # a request being decoded counts
        assert budget.refusal(300, queued=0) is None
    assert budget.decoding == 0 and budget.refusal(301, queued=0) is None


# ---------------------------------------------------------------- the Redis broker's edge cases


def redis_broker(server: RedisProcess) -> RedisBroker:
    redis.Redis.from_url(server.url).flushall()
    return RedisBroker(
        server.url,
        loop=asyncio.get_running_loop(),
        limits=DEFAULT_LIMITS,
        max_queue=4,
        finished_job_ttl=60.0,
        lease_seconds=5.0,
        max_attempts=2,
    )


def test_a_job_that_succeeded_as_the_grace_period_ended_is_finished_not_handed_back(redis_server) -> None:
    async def scenario():
        engine = EncodeGate()
        manager = await start_manager(engine, lambda **_: redis_broker(redis_server))
        job_id, _ = await submit(manager)
        await asyncio.to_thread(engine.encoding.wait, 10)  # past the last cancellation check
        manager.broker.start_draining()
        await manager.broker.abandon()
        engine.release.set()
        events, end = await follow(manager, job_id)
        await stop_manager(manager)
        return events, end

    events, end = asyncio.run(scenario())
    assert end.state == pb.JOB_STATE_SUCCEEDED and events[-1].HasField("completed")
    assert not any(event.HasField("retrying") for event in events)


def test_a_crafted_job_id_is_refused_by_redis_alone_and_does_not_mark_the_broker_down(redis_server) -> None:
    async def scenario():
        manager = await start_manager(FakeEngine(), lambda **_: redis_broker(redis_server))
        job_id, _ = await submit(manager)
        with pytest.raises(BrokerUnavailable):  # WRONGTYPE: that call's error only
            await manager.broker.owner(job_id + ":events")
        available = manager.broker.available
        await follow(manager, job_id)
        await stop_manager(manager)
        return available

    assert asyncio.run(scenario()) is True
