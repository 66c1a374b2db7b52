"""The in-process broker: a bounded queue and each job's history in this server's memory.

Threading: a job's state, history and subscribers are touched only on the event loop; workers hand events
over with `loop.call_soon_threadsafe`, so the loop never blocks on torch and job state needs no lock. The
queue is shared with the worker threads and guarded by one condition variable, held only for list
operations.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable

import grpc

from stylize.server import convert
from stylize.server.auth import TenantLimits
from stylize.server.convert import JobRequest
from stylize.server.errors import JobStatus
from stylize.v1 import stylize_pb2 as pb

from . import (
    FINAL_STATES,
    SHUTDOWN,
    JobEnd,
    JobOwner,
    QueueFigures,
    Rejected,
    call_soon_threadsafe,
    over_tenant_limit,
    work_window,
)

# Events a slow watcher may have pending before its oldest pending progress events are dropped (it sees
# the gap in `sequence`); queued/started/completed are never dropped.
SUBSCRIBER_BACKLOG = 64


def queue_full(depth: int, capacity: int) -> JobStatus:
    return JobStatus(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"queue full: {depth} jobs waiting (capacity {capacity})",
        reason="queue_full",
    )


class Subscription:
    """One watcher's view of a job: a bounded backlog of events, then the end."""

    def __init__(self) -> None:
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

    def __init__(self, request: JobRequest, *, owned_by_call: bool, owner: JobOwner):
        self.id = uuid.uuid4().hex
        # Dropped when the job finishes: its decoded images must not outlive it for the finished-job TTL.
        self.request: JobRequest | None = request
        self.client_tag = request.client_tag
        self.pixels = request.pixels
        self.owner = owner
        self.owned_by_call = owned_by_call
        self.state = pb.JOB_STATE_QUEUED
        self.accepted_at = time.monotonic()
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
        event.client_tag = self.client_tag
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
        self.request = None
        for subscription in self._subscriptions:
            subscription.close()
        self._subscriptions.clear()
        self._done.set()

    async def wait_finished(self) -> int:
        await self._done.wait()
        return self.state

    def subscribe(self) -> Subscription:
        """A watcher starting from the current state: the history so far, then live events."""
        subscription = Subscription()
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


class MemoryLease:
    """A job of this process, held by one worker thread; reports to the loop without waiting."""

    def __init__(self, broker: MemoryBroker, job: Job):
        self._broker = broker
        self._job = job
        self.job_id = job.id
        assert job.request is not None  # a job leaves the queue before it can finish
        self.request = job.request
        self.tenant = job.owner.tenant
        self.attempt = 1
        self.queue_seconds = time.monotonic() - job.accepted_at
        self.cancel = job.cancel

    def cancel_status(self) -> JobStatus | None:
        return self._job.cancel_status

    def publish(self, event: pb.JobEvent) -> None:
        self._broker.call_soon(self._job.publish, event)

    def finish(self, state: int, status: JobStatus | None, completed: pb.JobEvent | None) -> None:
        if completed is not None:
            self._broker.call_soon(self._job.publish, completed)
        self._broker.call_soon(self._broker.finish_running, self._job, state, status)


class MemoryBroker:
    """Jobs in this process: a bounded queue and the history of every job for `finished_job_ttl`."""

    name = "memory"

    def __init__(self, *, max_queue: int, finished_job_ttl: float, loop: asyncio.AbstractEventLoop):
        self._max_queue = max_queue
        self._ttl = finished_job_ttl
        self._loop = loop
        self._jobs: dict[str, Job] = {}
        self._waiting: collections.deque[Job] = collections.deque()
        # The decoded input pixels of the waiting jobs' images.
        self._held_pixels = 0
        self._running: set[Job] = set()
        self._condition = threading.Condition()
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        # Pixel-iterations accepted per tenant in the current window: (window, amount).
        self._work: dict[str, tuple[int, int]] = {}

    @property
    def available(self) -> bool:
        return True

    @property
    def draining(self) -> bool:
        return self._draining

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def call_soon(self, callback: Callable[..., object], *args: object) -> None:
        call_soon_threadsafe(self._loop, callback, *args)

    # ------------------------------------------------------------ loop side

    def admission(self) -> JobStatus | None:
        with self._condition:
            return self._refusal()

    def _refusal(self) -> JobStatus | None:
        if self._draining:
            return SHUTDOWN
        if len(self._waiting) >= self._max_queue:
            return queue_full(len(self._waiting), self._max_queue)
        return None

    async def submit(
        self,
        message: pb.StylizeRequest,
        request: JobRequest,
        *,
        owned_by_call: bool,
        owner: JobOwner,
        limits: TenantLimits,
        work: int,
    ) -> tuple[str, int]:
        job = Job(request, owned_by_call=owned_by_call, owner=owner)
        with self._condition:
            refusal = self._refusal() or self._over_limit(owner.tenant, limits, work)
            if refusal is not None:
                raise Rejected(refusal)
            self._charge(owner.tenant, work)
            position = len(self._waiting)
            self._waiting.append(job)
            self._held_pixels += request.pixels
            self._idle.clear()
            self._condition.notify()
        self._jobs[job.id] = job
        job.publish(convert.queued_event(position))
        return job.id, position

    def _over_limit(self, tenant: str, limits: TenantLimits, work: int) -> JobStatus | None:
        """Called under the condition's lock."""
        window, retry_after = work_window(time.time())
        if limits.max_jobs_in_flight:
            in_flight = sum(1 for j in self._jobs.values() if j.owner.tenant == tenant and not j.finished)
            if in_flight >= limits.max_jobs_in_flight:
                return over_tenant_limit(
                    tenant, "max_jobs_in_flight", in_flight, limits.max_jobs_in_flight, retry_after=1.0
                )
        if limits.max_queued:
            queued = sum(1 for j in self._waiting if j.owner.tenant == tenant)
            if queued >= limits.max_queued:
                return over_tenant_limit(tenant, "max_queued", queued, limits.max_queued, retry_after=1.0)
        if limits.max_pixel_iterations_per_minute:
            used = self._work[tenant][1] if self._work.get(tenant, (None, 0))[0] == window else 0
            if used + work > limits.max_pixel_iterations_per_minute:
                return over_tenant_limit(
                    tenant,
                    "max_pixel_iterations_per_minute",
                    used + work,
                    limits.max_pixel_iterations_per_minute,
                    retry_after,
                )
        return None

    def _charge(self, tenant: str, work: int) -> None:
        window, _ = work_window(time.time())
        previous_window, used = self._work.get(tenant, (window, 0))
        self._work[tenant] = (window, (used if previous_window == window else 0) + work)

    async def owner(self, job_id: str) -> JobOwner | None:
        job = self._jobs.get(job_id)
        return job.owner if job is not None else None

    async def follow(self, job_id: str) -> AsyncIterator[pb.JobEvent | JobEnd]:
        job = self._jobs[job_id]
        subscription = job.subscribe()
        try:
            async for event in subscription.events():
                yield event
        finally:
            job.unsubscribe(subscription)
        yield JobEnd(job.state, job.status)

    async def watchers(self, job_id: str) -> int:
        job = self._jobs.get(job_id)
        return job.watchers if job is not None else 0

    async def cancel(self, job_id: str, status: JobStatus) -> bool:
        job = self._jobs.get(job_id)
        if job is None or job.finished or job.cancel.is_set():
            return False
        job.cancel_status = status
        job.cancel.set()
        with self._condition:
            was_waiting = job in self._waiting
            if was_waiting:
                self._waiting.remove(job)
                self._held_pixels -= job.pixels
        if was_waiting:
            self._finish(job, pb.JOB_STATE_CANCELLED, status)
        return was_waiting

    async def wait_finished(self, job_id: str) -> int:
        return await self._jobs[job_id].wait_finished()

    def figures(self) -> QueueFigures:
        with self._condition:
            oldest = self._waiting[0].accepted_at if self._waiting else None
            depth = len(self._waiting)
        return QueueFigures(depth, self._max_queue, 0.0 if oldest is None else time.monotonic() - oldest)

    def held_pixels(self) -> int:
        with self._condition:
            return self._held_pixels

    def start_draining(self) -> None:
        with self._condition:
            self._draining = True
            self._condition.notify_all()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def abandon(self) -> str:
        busy = [job for job in self._jobs.values() if not job.finished]
        for job in busy:
            await self.cancel(job.id, SHUTDOWN)
        return f"cancelling {len(busy)} job(s)"

    def finish_running(self, job: Job, state: int, status: JobStatus | None) -> None:
        with self._condition:
            self._running.discard(job)
        self._finish(job, state, status)

    def _finish(self, job: Job, state: int, status: JobStatus | None) -> None:
        job.finish(state, status)
        self._loop.call_later(self._ttl, self._jobs.pop, job.id, None)
        with self._condition:
            idle = not self._waiting and not self._running
        if idle:
            self._idle.set()

    # ------------------------------------------------------------ worker side

    def take(self, worker: int, timeout: float) -> MemoryLease | None:
        """Queued jobs still run while draining (they are cancelled only when the grace period ends)."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while not self._waiting:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._condition.wait(remaining)
            job = self._waiting.popleft()
            self._held_pixels -= job.pixels
            self._running.add(job)
        return MemoryLease(self, job)
