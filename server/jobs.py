"""Jobs, their watchers, the bounded queue and the worker threads.

Threading model: torch runs ONLY on the worker threads (one per device). Everything else about a job (its
state, event history and subscribers) is owned by the asyncio loop; workers hand events over with
`loop.call_soon_threadsafe`, so the loop never blocks on torch and never needs a lock for job state. The
queue itself is shared and guarded by one condition variable, held only for list operations.

Cancellation sets the job's threading.Event; the engine checks it every iteration and raises Cancelled.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import grpc
from PIL import Image

from stylize.api import schedule
from stylize.api.options import OptionsError
from stylize.server.engine.records import Cancelled, NonFiniteLoss, Progress, Result, Started
from stylize.v1 import stylize_pb2 as pb

from . import convert
from .codec import encode_image, fit_within
from .convert import JobRequest
from .errors import JobStatus
from .metrics import ServiceMetrics

log = logging.getLogger(__name__)

# Events a slow watcher may have pending before its oldest pending progress events are dropped (it sees
# the gap in `sequence`); queued/started/completed are never dropped.
SUBSCRIBER_BACKLOG = 64
# Weight of the newest iteration in the running seconds-per-pixel-iteration figure.
SPEED_SMOOTHING = 0.2
FINAL_STATES = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)

SHUTDOWN = JobStatus(grpc.StatusCode.UNAVAILABLE, "server shutting down")
# After the grace period, how long cancelled jobs get to stop: one iteration, which at the largest sizes on
# a CPU takes seconds.
CANCEL_WAIT_SECONDS = 10.0


class Rejected(Exception):
    """The job was not accepted; carries the status to answer with."""

    def __init__(self, status: JobStatus):
        super().__init__(status.message)
        self.status = status


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


class Subscription:
    """One watcher's view of a job: a bounded backlog of events, then the end (and maybe a failure status)."""

    def __init__(self, job: Job):
        self.job = job
        self._pending: collections.deque[pb.JobEvent] = collections.deque()
        self._wake = asyncio.Event()
        self._closed = False
        self.dropped = 0

    def put(self, event: pb.JobEvent) -> None:
        self._pending.append(event)
        if len(self._pending) > SUBSCRIBER_BACKLOG:
            oldest_progress = next((e for e in self._pending if e.HasField("progress")), None)
            if oldest_progress is not None:
                self._pending.remove(oldest_progress)
                self.dropped += 1
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    async def events(self) -> AsyncIterator[pb.JobEvent]:
        while True:
            while self._pending:
                yield self._pending.popleft()
            if self._closed:
                return
            self._wake.clear()
            await self._wake.wait()


class Job:
    """A job's state and history; touched only on the event loop (except `cancel`, a threading.Event)."""

    def __init__(self, request: JobRequest, *, owned_by_call: bool):
        self.id = uuid.uuid4().hex
        self.request = request
        # A Stylize job belongs to its call: it is cancelled when the caller leaves and nobody else watches.
        self.owned_by_call = owned_by_call
        self.state = pb.JOB_STATE_QUEUED
        self.accepted_at = time.monotonic()
        self.finished_at: float | None = None
        self._done = asyncio.Event()
        self.cancel = threading.Event()
        self.cancel_status: JobStatus | None = None
        # Set when the job failed or was cancelled: how watchers' streams end.
        self.status: JobStatus | None = None
        self._sequence = 0
        # The history a late watcher replays: first events, the latest preview, the latest progress, the end.
        self._queued: pb.JobEvent | None = None
        self._started: pb.JobEvent | None = None
        self._latest_preview: pb.JobEvent | None = None
        self._latest_progress: pb.JobEvent | None = None
        self._completed: pb.JobEvent | None = None
        self._subscriptions: set[Subscription] = set()

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def watchers(self) -> int:
        return len(self._subscriptions)

    def publish(self, event: pb.JobEvent) -> None:
        self._sequence += 1
        event.job_id = self.id
        event.sequence = self._sequence
        event.elapsed_seconds = time.monotonic() - self.accepted_at
        event.client_tag = self.request.client_tag
        kind = event.WhichOneof("event")
        if kind == "queued":
            self._queued = event
        elif kind == "started":
            self.state = pb.JOB_STATE_RUNNING
            self._started = event
        elif kind == "progress":
            self._latest_progress = event
            if event.progress.HasField("preview"):
                self._latest_preview = event
        elif kind == "completed":
            self._completed = event
        for subscription in self._subscriptions:
            subscription.put(event)

    def finish(self, state: int, status: JobStatus | None) -> None:
        if self.finished:
            return
        self.state = state
        self.status = status
        self.finished_at = time.monotonic()
        for subscription in self._subscriptions:
            subscription.close()
        self._subscriptions.clear()
        self._done.set()

    async def wait_finished(self) -> int:
        """The final state, once the job has one."""
        await self._done.wait()
        return self.state

    def subscribe(self) -> Subscription:
        """A watcher starting from the current state: the history so far, then live events."""
        subscription = Subscription(self)
        replay = [self._queued, self._started, self._latest_preview]
        if self._latest_progress is not self._latest_preview:
            replay.append(self._latest_progress)
        replay.append(self._completed)
        for event in replay:
            if event is not None:
                subscription.put(event)
        if self.finished:
            subscription.close()
        else:
            self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)


@dataclass(frozen=True)
class QueueSnapshot:
    depth: int
    capacity: int
    running: int
    workers: int
    draining: bool


class JobManager:
    """Accepts jobs into a bounded queue and runs them on one worker thread per device."""

    def __init__(
        self,
        executor: Executor,
        metrics: ServiceMetrics,
        *,
        workers: int,
        max_queue: int,
        finished_job_ttl: float,
        loop: asyncio.AbstractEventLoop,
    ):
        self._executor = executor
        self._metrics = metrics
        self._workers = workers
        self._max_queue = max_queue
        self._ttl = finished_job_ttl
        self._loop = loop
        self._jobs: dict[str, Job] = {}
        self._waiting: collections.deque[Job] = collections.deque()
        self._running = 0
        self._condition = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self._grace_cut = asyncio.Event()
        self.draining = False
        # Seconds per output pixel per iteration, measured by the workers (None until the first iteration).
        self.seconds_per_pixel_iteration: float | None = None

    # ------------------------------------------------------------ loop side

    def start(self) -> None:
        for worker in range(self._workers):
            thread = threading.Thread(
                target=self._work, args=(worker,), name=f"stylize-worker-{worker}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def admission(self) -> JobStatus | None:
        """Why a job would be refused now (shutting down, queue full), or None. The service asks before it
        decodes a request, so a refusal costs no decoding; submit() asks again under the queue's lock."""
        with self._condition:
            return self._refusal()

    def _refusal(self) -> JobStatus | None:
        if self.draining:
            return SHUTDOWN
        if len(self._waiting) >= self._max_queue:
            return JobStatus(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"queue full: {len(self._waiting)} jobs waiting (capacity {self._max_queue})",
            )
        return None

    def submit(self, request: JobRequest, *, owned_by_call: bool) -> tuple[Job, int]:
        """Queue a job; returns it and the number of jobs waiting ahead of it. Raises Rejected."""
        job = Job(request, owned_by_call=owned_by_call)
        with self._condition:
            refusal = self._refusal()
            if refusal is not None:
                raise Rejected(refusal)
            position = len(self._waiting)
            self._waiting.append(job)
            self._metrics.queue_depth.set(len(self._waiting))
            self._idle.clear()
            self._condition.notify()
        self._jobs[job.id] = job
        job.publish(convert.queued_event(position))
        return job, position

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def cancel(self, job: Job, status: JobStatus) -> None:
        """Cancel a queued job at once, or a running one within one iteration. Idempotent."""
        if job.finished or job.cancel.is_set():
            return
        job.cancel_status = status
        job.cancel.set()
        with self._condition:
            was_waiting = job in self._waiting
            if was_waiting:
                self._waiting.remove(job)
                self._metrics.queue_depth.set(len(self._waiting))
        if was_waiting:
            self._metrics.jobs.labels("cancelled").inc()
            self._finish(job, pb.JOB_STATE_CANCELLED, status)

    def snapshot(self) -> QueueSnapshot:
        with self._condition:
            return QueueSnapshot(
                len(self._waiting), self._max_queue, self._running, self._workers, self.draining
            )

    def estimate_run_seconds(self, request: JobRequest) -> float | None:
        """Expected run time from the measured speed (None before the first iteration was measured)."""
        speed = self.seconds_per_pixel_iteration
        if speed is None:
            return None
        options = request.options
        scales = schedule.plan_for(options, request.content.size)
        return speed * sum(scale.pixels * scale.iterations for scale in scales)

    async def drain(self, grace_seconds: float, cancel_wait_seconds: float = CANCEL_WAIT_SECONDS) -> None:
        """Refuse new jobs, let queued and running ones finish for `grace_seconds` (or until end_grace()),
        then cancel the rest."""
        self.draining = True
        waits = [asyncio.ensure_future(self._idle.wait()), asyncio.ensure_future(self._grace_cut.wait())]
        await asyncio.wait(waits, timeout=grace_seconds, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()
        if not self._idle.is_set():
            busy = [job for job in self._jobs.values() if not job.finished]
            log.warning("grace period of %.0f s over: cancelling %d job(s)", grace_seconds, len(busy))
            for job in busy:
                self.cancel(job, SHUTDOWN)
            try:
                await asyncio.wait_for(self._idle.wait(), cancel_wait_seconds)
            except TimeoutError:
                log.error("workers did not stop within %.0f s of cancellation", cancel_wait_seconds)
        with self._condition:
            self._stopping = True
            self._condition.notify_all()

    def end_grace(self) -> None:
        """Cut a running drain's grace period short (a second SIGTERM)."""
        self._grace_cut.set()

    def _finish(self, job: Job, state: int, status: JobStatus | None) -> None:
        job.finish(state, status)
        self._loop.call_later(self._ttl, self._jobs.pop, job.id, None)
        with self._condition:
            idle = not self._waiting and self._running == 0
        if idle:
            self._idle.set()

    def _call_soon(self, callback: Callable[..., object], *args: object) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            if not self._loop.is_closed():
                raise
            # The loop closed under us during shutdown; nobody is listening any more.

    # ------------------------------------------------------------ worker side

    def _work(self, worker: int) -> None:
        while True:
            with self._condition:
                while not self._waiting and not self._stopping:
                    self._condition.wait()
                if not self._waiting:
                    return
                job = self._waiting.popleft()
                self._running += 1
                self._metrics.queue_depth.set(len(self._waiting))
            try:
                state, status, completed = self._run(job, worker)
            finally:
                with self._condition:
                    self._running -= 1
            self._metrics.jobs.labels(
                {pb.JOB_STATE_SUCCEEDED: "succeeded", pb.JOB_STATE_CANCELLED: "cancelled"}.get(
                    state, "failed"
                )
            ).inc()
            # The result goes out only after the metrics count the job as done, so a scrape taken when
            # the caller has its result never still shows the job in progress.
            if completed is not None:
                self._call_soon(job.publish, completed)
            self._call_soon(self._finish, job, state, status)

    def _run(self, job: Job, worker: int) -> tuple[int, JobStatus | None, pb.JobEvent | None]:
        """Run one job on this worker thread; returns its final state, unless it succeeded a status, and if
        it did its completed event (not yet published)."""
        started = time.monotonic()
        queue_seconds = started - job.accepted_at
        self._metrics.queue_wait.observe(queue_seconds)
        self._metrics.in_progress.inc()
        try:
            if job.cancel.is_set():
                raise Cancelled()
            return pb.JOB_STATE_SUCCEEDED, None, self._execute(job, worker, queue_seconds)
        except Cancelled:
            return (
                pb.JOB_STATE_CANCELLED,
                job.cancel_status or JobStatus(grpc.StatusCode.CANCELLED, "cancelled"),
                None,
            )
        except OptionsError as error:
            return pb.JOB_STATE_FAILED, JobStatus.invalid(error), None
        except NonFiniteLoss as error:
            # Valid options whose numbers left fp32's range on these images: nothing to retry as it is.
            log.warning("job %s: %s", job.id, error)
            return pb.JOB_STATE_FAILED, JobStatus(grpc.StatusCode.FAILED_PRECONDITION, str(error)), None
        except Exception as error:
            if is_out_of_memory(error):
                log.warning(
                    "job %s ran out of memory on %s: %s", job.id, self._executor.device_name(worker), error
                )
                self._executor.release_memory(worker)
                return (
                    pb.JOB_STATE_FAILED,
                    JobStatus(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"out of memory on {self._executor.device_name(worker)}; try a smaller size",
                    ),
                    None,
                )
            # The exception's text stays in the log: it can hold paths and internals, not for callers.
            log.exception("job %s failed", job.id)
            status = JobStatus(grpc.StatusCode.INTERNAL, f"job {job.id} failed: internal error (see the log)")
            return pb.JOB_STATE_FAILED, status, None
        finally:
            self._metrics.in_progress.dec()
            self._metrics.job_duration.observe(time.monotonic() - started)

    def _execute(self, job: Job, worker: int, queue_seconds: float) -> pb.JobEvent:
        """Run the engine, publishing started and progress events; returns the completed event."""
        request = job.request
        backend, records = self._executor.run(request, job.cancel, worker)
        started = time.monotonic()
        previous = 0.0
        for record in records:
            if isinstance(record, Started):
                device = self._executor.device_name(worker)
                self._metrics.job_precision.labels(device, record.precision).inc()
                for warning in record.warnings:
                    log.warning("job %s: %s", job.id, warning)
                self._call_soon(job.publish, convert.started_event(device, record, backend))
            elif isinstance(record, Progress):
                self._account_iteration(record, record.elapsed_seconds - previous)
                previous = record.elapsed_seconds
                preview = None
                if record.image is not None:
                    preview = self._encode(
                        record.image,
                        request.preview.format,
                        request.preview.quality,
                        request.preview.max_size,
                    )
                self._call_soon(job.publish, convert.progress_event(record, preview))
            elif isinstance(record, Result):
                if (
                    job.cancel.is_set()
                ):  # cancelled during the last iteration: CancelJob already said CANCELLED
                    raise Cancelled()
                image = self._encode(record.image, request.output_encoding, quality=95, max_size=0)
                return convert.completed_event(
                    image, record.losses, record.iterations, time.monotonic() - started, queue_seconds
                )
        raise RuntimeError("the engine ended without a result")

    def _account_iteration(self, progress: Progress, seconds: float) -> None:
        pixels = progress.width * progress.height
        self._metrics.iteration.observe(seconds)
        self._metrics.pixel_iterations.inc(pixels)
        speed = seconds / pixels
        current = self.seconds_per_pixel_iteration
        self.seconds_per_pixel_iteration = (
            speed if current is None else (1 - SPEED_SMOOTHING) * current + SPEED_SMOOTHING * speed
        )

    def _encode(self, tensor: object, encoding: str, quality: int, max_size: int) -> pb.EncodedImage:
        image = fit_within(self._executor.to_image(tensor), max_size)
        data = encode_image(image, encoding, quality=quality)
        return convert.encoded_image(data, encoding, image.width, image.height)
