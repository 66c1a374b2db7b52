"""The workers: one thread per device, each taking a job from the broker only when it is free.

torch runs ONLY on the worker threads. A worker reports through its Lease (started, progress, the end);
where the job came from and where its events go is the broker's business (stylize.server.broker).
Cancellation sets the lease's threading.Event; the engine checks it every iteration and raises Cancelled.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import grpc
from PIL import Image

from stylize.api.options import OptionsError
from stylize.server.engine.records import Cancelled, NonFiniteLoss, Progress, Result, Started
from stylize.v1 import stylize_pb2 as pb

from . import convert
from .broker import Broker, BrokerUnavailable, Lease
from .codec import encode_image, fit_within
from .convert import JobRequest
from .errors import JobStatus
from .estimate import JobKind, RunTimeEstimator, network_depth
from .metrics import ServiceMetrics, size_class

log = logging.getLogger(__name__)
audit_log = logging.getLogger("stylize.audit")

# After the grace period, how long cancelled jobs get to stop: one iteration, which at the largest sizes on
# a CPU takes seconds.
CANCEL_WAIT_SECONDS = 10.0
# How long a free worker waits in one take() before it looks again whether the server is stopping.
TAKE_SECONDS = 1.0
# Pause after the broker could not be reached, before a free worker asks again.
BROKER_RETRY_SECONDS = 1.0
OUTPUT_QUALITY = 95
STATE_STATUS = {
    pb.JOB_STATE_SUCCEEDED: "succeeded",
    pb.JOB_STATE_CANCELLED: "cancelled",
    pb.JOB_STATE_FAILED: "failed",
}


def outcome_status(state: int, status: JobStatus | None) -> str:
    """The stylize_jobs `status` label of a job that ended in `state`: a job stopped because its caller's
    deadline passed is "deadline_exceeded" (the server did not finish in time), not "cancelled" (the
    caller's choice), whatever state its watchers see."""
    if status is not None and status.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "deadline_exceeded"
    return STATE_STATUS.get(state, "failed")


def trim_heap() -> None:
    """Hand the C allocator's free memory back to the system (glibc's malloc_trim; nothing elsewhere): the
    images and tensors of a finished job are freed into the worker's heap, which otherwise keeps the
    process's RSS near the job's peak."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.malloc_trim(0)


class Executor(Protocol):
    """What the workers need from the runtime: a device per worker and a way to run the engine."""

    def device_name(self, worker: int) -> str: ...

    def run(
        self, request: JobRequest, cancel: threading.Event, worker: int
    ) -> tuple[str, Iterator[Started | Progress | Result]]:
        """(targets backend, the engine's records); torch work happens while iterating."""
        ...

    def to_image(self, tensor: object) -> Image.Image: ...

    def release_memory(self, worker: int) -> None:
        """Called after an out-of-memory failure, before the worker takes the next job."""
        ...


def is_out_of_memory(error: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError is a RuntimeError; CPU allocators raise RuntimeError or MemoryError."""
    return isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )


@dataclass(frozen=True)
class QueueSnapshot:
    depth: int
    capacity: int
    running: int
    workers: int
    draining: bool


@dataclass
class _Outcome:
    state: int
    status: JobStatus | None = None
    completed: pb.JobEvent | None = None


def audit(lease: Lease, status: str, reason: str, seconds: float) -> None:
    """The one log line per job that says who ran what (never image bytes or tokens)."""
    options = lease.request.options
    audit_log.info(
        "%s",
        json.dumps(
            {
                "job": lease.job_id,
                "tenant": lease.tenant,
                "client_tag": lease.request.client_tag,
                "size": options.size,
                "iterations": options.initial_iterations,
                "attempt": lease.attempt,
                "outcome": status,
                "reason": reason,
                "queue_seconds": round(lease.queue_seconds, 3),
                "run_seconds": round(seconds, 3),
            }
        ),
    )


class JobManager:
    """The worker threads of this server, and the broker they take jobs from."""

    def __init__(self, executor: Executor, metrics: ServiceMetrics, broker: Broker, *, workers: int):
        self._executor = executor
        self._metrics = metrics
        self.broker = broker
        self._workers = workers
        self._running = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._grace_cut = asyncio.Event()
        # Seconds per iteration, measured by the workers: what a job's run time is estimated from.
        self.run_time = RunTimeEstimator()
        metrics.workers.set(workers)
        metrics.queue_capacity.set_function(lambda: broker.figures().capacity)
        metrics.queue_depth.set_function(lambda: broker.figures().depth)
        metrics.fleet_queue_depth.set_function(lambda: broker.figures().depth)
        metrics.queue_oldest_wait.set_function(lambda: broker.figures().oldest_wait_seconds)

    @property
    def draining(self) -> bool:
        return self.broker.draining

    def start(self) -> None:
        for worker in range(self._workers):
            thread = threading.Thread(
                target=self._work, args=(worker,), name=f"stylize-worker-{worker}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def snapshot(self) -> QueueSnapshot:
        figures = self.broker.figures()
        with self._lock:
            running = self._running
        return QueueSnapshot(figures.depth, figures.capacity, running, self._workers, self.draining)

    async def drain(self, grace_seconds: float, cancel_wait_seconds: float = CANCEL_WAIT_SECONDS) -> None:
        """Refuse new jobs, let what this server holds finish for `grace_seconds` (or until end_grace()),
        then let the broker cancel or hand back the rest, and stop the workers."""
        self.broker.start_draining()
        idle = asyncio.ensure_future(self.broker.wait_idle())
        cut = asyncio.ensure_future(self._grace_cut.wait())
        await asyncio.wait((idle, cut), timeout=grace_seconds, return_when=asyncio.FIRST_COMPLETED)
        cut.cancel()
        if not idle.done():
            given_up = await self.broker.abandon()
            log.warning("grace period of %.0f s over: %s", grace_seconds, given_up)
            try:
                await asyncio.wait_for(idle, cancel_wait_seconds)
            except TimeoutError:
                log.error("workers did not stop within %.0f s of cancellation", cancel_wait_seconds)
        self._stopping.set()
        await asyncio.to_thread(self._join, TAKE_SECONDS + 1)

    def _join(self, timeout: float) -> None:
        for thread in self._threads:
            thread.join(timeout)

    def end_grace(self) -> None:
        """Cut a running drain's grace period short (a second SIGTERM)."""
        self._grace_cut.set()

    # ------------------------------------------------------------ worker side

    def _work(self, worker: int) -> None:
        waiting_for_broker = False
        # Whether a job ran since the heap was last trimmed: trimmed once the worker finds no job, by when
        # the loop has dropped the finished job's images too.
        untrimmed = False
        while not self._stopping.is_set():
            try:
                lease = self.broker.take(worker, TAKE_SECONDS)
            except BrokerUnavailable as error:
                if not waiting_for_broker:
                    log.warning(
                        "worker %d: %s; asking again every %.0f s", worker, error, BROKER_RETRY_SECONDS
                    )
                waiting_for_broker = True
                self._stopping.wait(BROKER_RETRY_SECONDS)
                continue
            except Exception:  # a worker that died would leave its device idle for good
                log.exception("worker %d: taking a job failed; asking again", worker)
                self._stopping.wait(BROKER_RETRY_SECONDS)
                continue
            waiting_for_broker = False
            if lease is None:
                if untrimmed:
                    trim_heap()
                    untrimmed = False
                continue
            untrimmed = True
            with self._lock:
                self._running += 1
            began = time.monotonic()
            try:
                outcome = self._run(lease, worker)
            except Exception:  # outside the engine (releasing memory, metrics): the job must still end
                log.exception("job %s: the worker failed around it", lease.job_id)
                message = f"job {lease.job_id} failed: internal error (see the log)"
                outcome = _Outcome(pb.JOB_STATE_FAILED, JobStatus(grpc.StatusCode.INTERNAL, message))
            finally:
                with self._lock:
                    self._running -= 1
            status = outcome_status(outcome.state, outcome.status)
            reason = "ok" if outcome.status is None else outcome.status.outcome_reason
            self._metrics.jobs.labels(status, reason, lease.request.options.backbone.value).inc()
            audit(lease, status, reason, time.monotonic() - began)
            # The result goes out only after the metrics count the job as done, so a scrape taken when
            # the caller has its result never still shows the job in progress.
            lease.finish(outcome.state, outcome.status, outcome.completed)

    def _run(self, lease: Lease, worker: int) -> _Outcome:
        """Run one job on this worker thread."""
        started = time.monotonic()
        self._metrics.queue_wait.observe(lease.queue_seconds)
        self._metrics.in_progress.inc()
        try:
            if lease.cancel.is_set():
                raise Cancelled()
            return _Outcome(pb.JOB_STATE_SUCCEEDED, None, self._execute(lease, worker))
        except Cancelled:
            status = lease.cancel_status() or JobStatus(grpc.StatusCode.CANCELLED, "cancelled")
            return _Outcome(pb.JOB_STATE_CANCELLED, status)
        except OptionsError as error:
            return _Outcome(pb.JOB_STATE_FAILED, JobStatus.invalid(error))
        except NonFiniteLoss as error:
            # Valid options whose numbers left fp32's range on these images: nothing to retry as it is.
            log.warning("job %s: %s", lease.job_id, error)
            return _Outcome(
                pb.JOB_STATE_FAILED,
                JobStatus(grpc.StatusCode.FAILED_PRECONDITION, str(error), reason="non_finite"),
            )
        except Exception as error:
            device = self._executor.device_name(worker)
            if is_out_of_memory(error):
                log.warning("job %s ran out of memory on %s: %s", lease.job_id, device, error)
                self._executor.release_memory(worker)
                message = f"out of memory on {device}; try a smaller size"
                return _Outcome(
                    pb.JOB_STATE_FAILED,
                    JobStatus(grpc.StatusCode.RESOURCE_EXHAUSTED, message, reason="oom"),
                )
            # The exception's text stays in the log: it can hold paths and internals, not for callers.
            log.exception("job %s failed", lease.job_id)
            message = f"job {lease.job_id} failed: internal error (see the log)"
            return _Outcome(pb.JOB_STATE_FAILED, JobStatus(grpc.StatusCode.INTERNAL, message))
        finally:
            self._metrics.in_progress.dec()
            self._metrics.job_duration.labels(size_class(lease.request.options.size)).observe(
                time.monotonic() - started
            )

    def _execute(self, lease: Lease, worker: int) -> pb.JobEvent:
        """Run the engine, publishing started and progress events; returns the completed event."""
        request = lease.request
        sized = size_class(request.options.size)
        began = time.monotonic()
        backend, records = self._executor.run(request, lease.cancel, worker)
        previous = 0.0
        first_progress = True
        kind: JobKind | None = None
        # The previous progress record: (its scale, its iteration, its elapsed seconds).
        last: tuple[int, int, float] | None = None
        for record in records:
            if isinstance(record, Started):
                kind = JobKind(
                    str(request.options.backbone), record.precision, network_depth(request.options)
                )
                device = self._executor.device_name(worker)
                self._metrics.job_precision.labels(device, record.precision).inc()
                for warning in record.warnings:
                    log.warning("job %s: %s", lease.job_id, warning)
                lease.publish(convert.started_event(device, record, backend, lease.attempt))
            elif isinstance(record, Progress):
                if first_progress:
                    self._metrics.time_to_first_progress.observe(time.monotonic() - began)
                    first_progress = False
                self._metrics.iteration.labels(sized).observe(record.elapsed_seconds - previous)
                self._metrics.pixel_iterations.inc(record.width * record.height)
                previous = record.elapsed_seconds
                # The first record of a scale also holds its targets: only later ones time iterations.
                if kind is not None and last is not None and last[0] == record.scale:
                    self.run_time.record(
                        kind,
                        record.width * record.height,
                        (record.elapsed_seconds - last[2]) / (record.iteration - last[1]),
                    )
                last = (record.scale, record.iteration, record.elapsed_seconds)
                preview = None
                if record.image is not None:
                    shown = request.preview
                    preview = self._encode(record.image, shown.format, shown.quality, shown.max_size)
                lease.publish(convert.progress_event(record, preview))
            elif isinstance(record, Result):
                if lease.cancel.is_set():  # cancelled during the last iteration: CancelJob said CANCELLED
                    raise Cancelled()
                encoding = time.monotonic()
                image = self._encode(record.image, request.output_encoding, OUTPUT_QUALITY, max_size=0)
                encode_seconds = time.monotonic() - encoding
                self._metrics.job_phase.labels("targets").observe(record.target_seconds)
                self._metrics.job_phase.labels("optimize").observe(
                    max(0.0, record.elapsed_seconds - record.target_seconds)
                )
                self._metrics.job_phase.labels("encode").observe(encode_seconds)
                return convert.completed_event(
                    image,
                    record.losses,
                    record.iterations,
                    time.monotonic() - began,
                    lease.queue_seconds,
                )
        raise RuntimeError("the engine ended without a result")

    def _encode(self, tensor: object, encoding: str, quality: int, max_size: int) -> pb.EncodedImage:
        image = fit_within(self._executor.to_image(tensor), max_size)
        data = encode_image(image, encoding, quality=quality)
        return convert.encoded_image(data, encoding, image.width, image.height)
