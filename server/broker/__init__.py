"""Where jobs wait and where their events go: the broker between the RPCs and the workers.

Two implementations of one interface:
- `memory` (the default): jobs, queue and events in this process; one server needs nothing else.
- `redis`: jobs on a Redis Stream that every replica's workers pull from, events on a per-job stream that
  every replica can read, cancellation that reaches the worker from any replica, and leases so that a job
  whose worker died is run again elsewhere.

The service talks to a Broker on the event loop; the workers (threads) take Leases from it with
`take()` and report through them. Neither knows which broker it has.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

import grpc

from stylize.server.auth import TenantLimits
from stylize.server.convert import JobRequest
from stylize.server.errors import JobStatus
from stylize.v1 import stylize_pb2 as pb

FINAL_STATES = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)
SHUTDOWN = JobStatus(grpc.StatusCode.UNAVAILABLE, "server shutting down")


class Rejected(Exception):
    """The job was not accepted; carries the status to answer with."""

    def __init__(self, status: JobStatus):
        super().__init__(status.message)
        self.status = status


class BrokerUnavailable(Exception):
    """The broker cannot be reached; the call gets UNAVAILABLE naming it."""

    def __init__(self, broker: str, reason: str):
        super().__init__(f"job broker {broker} unavailable: {reason}")
        self.status = JobStatus(grpc.StatusCode.UNAVAILABLE, str(self))


def call_soon_threadsafe(
    loop: asyncio.AbstractEventLoop, callback: Callable[..., object], *args: object
) -> None:
    """Hand `callback` to the loop from a worker thread; nothing happens once the loop has closed
    (shutdown: nobody is listening any more)."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        if not loop.is_closed():
            raise


@dataclass(frozen=True)
class JobOwner:
    """Whose job it is: only its tenant may watch or cancel it, and a holder of its watch token may watch."""

    tenant: str = ""
    # sha256 of the job's read-only watch token; "" when it has none.
    watch_token_sha256: str = ""


# Per-tenant budgets of pixel-iterations are counted in windows of this many seconds (wall clock).
WORK_WINDOW_SECONDS = 60


def over_tenant_limit(tenant: str, limit: str, value: int, maximum: int, retry_after: float) -> JobStatus:
    """RESOURCE_EXHAUSTED naming the tenant's limit, with a retry-after hint."""
    return JobStatus(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"tenant {tenant!r} is at its limit: {limit} {maximum} (now {value})",
        reason="tenant_limit",
        retry_after_seconds=retry_after,
    )


def work_window(now: float) -> tuple[int, float]:
    """(the window's number, seconds until the next one)."""
    return int(now // WORK_WINDOW_SECONDS), WORK_WINDOW_SECONDS - now % WORK_WINDOW_SECONDS


@dataclass(frozen=True)
class JobEnd:
    """The last item a watcher gets: the final state, and the status the stream ends with (None: OK)."""

    state: int
    status: JobStatus | None


@dataclass(frozen=True)
class QueueFigures:
    """What the broker knows about the queue: `depth` is fleet-wide with Redis."""

    depth: int
    capacity: int
    # Seconds the oldest waiting job has waited (0 with none waiting).
    oldest_wait_seconds: float


class Lease(Protocol):
    """A job a worker holds. publish/finish are thread-safe, ordered, and never block on the network."""

    job_id: str
    request: JobRequest
    # The job's owner (JobOwner.tenant).
    tenant: str
    attempt: int
    # Seconds from acceptance to this take.
    queue_seconds: float
    # Set when the job is cancelled (from any replica) or taken away from this worker.
    cancel: threading.Event

    def cancel_status(self) -> JobStatus | None:
        """Why `cancel` was set: the status the job ends with."""
        ...

    def publish(self, event: pb.JobEvent) -> None:
        """Append a started/progress event; the broker stamps job_id, sequence, elapsed_seconds and tag."""
        ...

    def finish(self, state: int, status: JobStatus | None, completed: pb.JobEvent | None) -> None:
        """End the job (or, where the broker handed it back to the queue, end only this attempt)."""
        ...


class Broker(Protocol):
    """The loop side: everything here runs on the server's event loop except `take`."""

    name: str

    @property
    def available(self) -> bool:
        """False while the broker is known to be unreachable (calls then fail fast)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def admission(self) -> JobStatus | None:
        """Why a job would be refused now (draining, queue full), or None; submit() checks again."""
        ...

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
        """Queue a validated job: (job id, jobs ahead of it). `work` (pixel-iterations) counts against the
        tenant's budget. Raises Rejected (queue full, a tenant limit) or BrokerUnavailable."""
        ...

    async def owner(self, job_id: str) -> JobOwner | None:
        """Whose job it is; None for an unknown (or forgotten) job."""
        ...

    def follow(self, job_id: str) -> AsyncIterator[pb.JobEvent | JobEnd]:
        """A watcher from the job's current state: first events, latest preview and progress, then live
        events in order, then one JobEnd. Counts as a watcher while it runs."""
        ...

    async def watchers(self, job_id: str) -> int: ...

    async def cancel(self, job_id: str, status: JobStatus) -> bool:
        """Cancel a queued job at once, a running one (on whichever replica) within one iteration. True
        when the job ended here (it was waiting: no worker will count it)."""
        ...

    async def wait_finished(self, job_id: str) -> int:
        """The job's final state, once it has one."""
        ...

    def figures(self) -> QueueFigures:
        """The queue now (memory), or at the last poll, a second old at most (redis)."""
        ...

    def held_pixels(self) -> int:
        """Decoded input pixels that jobs waiting in this process hold (memory: their images; redis:
        none, its queue holds the encoded requests and a worker decodes its job when it takes it)."""
        ...

    def start_draining(self) -> None:
        """Refuse new jobs from now on, and take no more."""
        ...

    @property
    def draining(self) -> bool: ...

    async def wait_idle(self) -> None:
        """Until nothing this server is responsible for is waiting or running."""
        ...

    async def abandon(self) -> str:
        """At the end of the grace period: cancel (memory) or hand back to the fleet (redis) what this
        server still holds; says what it did, for the log."""
        ...

    def take(self, worker: int, timeout: float) -> Lease | None:
        """Worker thread side: the next job for a free worker, or None after `timeout` seconds (at once
        where the broker hands out no more jobs while draining)."""
        ...
