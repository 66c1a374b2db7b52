"""The Redis broker: one queue, one event log per job and one cancellation channel for the whole fleet.

Keys (Redis 7.0 or newer, for XAUTOCLAIM):
- `stylize:jobs`: a stream of job ids, read by the consumer group `workers`. A replica's worker reads the
  next entry only when it is free (XREADGROUP COUNT 1), so work goes to idle devices. An entry stays in the
  group's pending list while its job runs; the worker renews it (XCLAIM JUSTID resets its idle time). An
  entry idle for longer than the lease is claimed by the next free worker anywhere (XAUTOCLAIM) and its job
  runs again, as long as it has attempts left.
- `stylize:queued`: a sorted set of the waiting jobs (score: acceptance time): the fleet's queue depth and
  its oldest wait, and the admission check, atomic with the submission.
- `stylize:job:<id>`: a hash: the request as sent (StylizeRequest bytes; removed when the job ends), state,
  attempt, lease token, cancellation, the events a late watcher replays, and the end. It expires
  QUEUED_JOB_TTL after submission (renewed while the job runs) and `finished_job_ttl` after the end.
- `stylize:job:<id>:events`: the job's events, in order (capped at EVENTS_MAXLEN), then an `end` entry.
  Any replica's watcher tails it with XREAD.
- `stylize:tenant:<name>:jobs` and `:queued`: a tenant's unfinished and waiting jobs (sorted by expiry
  time, so a job whose key expired stops counting), and `:work:<window>`: the pixel-iterations it was
  granted in that minute; the per-tenant limits are checked in the submission's script.
- `stylize:cancel`: a pub/sub channel of job ids; the replica running the job sets its cancel event.
  The lease renewal also reads the cancellation, so a lost message delays it by one renewal at most.

Every change of a job's state is one Lua script, so replicas never see half of one. Writes by a worker
carry its lease token; a worker whose job was claimed by another (it stalled past its lease) is refused
and stops, so each attempt's events are written by one worker only.

Guarantees: a job runs at least once and, while it has attempts left, until it ends (at-least-once
execution); each job's events are in order; a watcher may miss progress events that the cap trimmed (it
sees the gap in `sequence`), never the first events, the latest preview or the end.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from stylize.api.options import FieldViolation, Limits, OptionsError
from stylize.server import convert
from stylize.server.auth import TenantLimits
from stylize.server.convert import JobRequest
from stylize.server.errors import JobStatus
from stylize.v1 import stylize_pb2 as pb

from . import (
    SHUTDOWN,
    WORK_WINDOW_SECONDS,
    BrokerUnavailable,
    JobEnd,
    JobOwner,
    QueueFigures,
    Rejected,
    call_soon_threadsafe,
    over_tenant_limit,
    work_window,
)
from .memory import queue_full

log = logging.getLogger(__name__)

JOBS = "stylize:jobs"
GROUP = "workers"
QUEUED = "stylize:queued"
CANCEL_CHANNEL = "stylize:cancel"
# A waiting job is dropped after this long (its watchers are told); a running one's key is renewed.
QUEUED_JOB_TTL = 24 * 3600
EVENTS_MAXLEN = 512
# A down Redis must fail calls fast: connection attempts and replies each get this long, with no retries.
CONNECT_TIMEOUT_SECONDS = 1.0
SOCKET_TIMEOUT_SECONDS = 2.0
# Blocking reads (XREAD/XREADGROUP) wait at most this long, well within the socket timeout.
BLOCK_MILLISECONDS = 1000
# Reachability check, queue figures, lease renewal and cancellation checks: once per tick.
TICK_SECONDS = 0.5
# A worker's events waiting for a Redis that does not answer: beyond this, the oldest progress goes.
OUTBOX_BACKLOG = 64
RETRY_SECONDS = 0.5
# The hash fields a late watcher replays, in this order.
REPLAY_FIELDS = tuple(
    f"ev:{slot}" for slot in ("queued", "retrying", "started", "preview", "progress", "completed")
)

# Appends Queued{position} to a serialized JobEvent: protobuf parsing merges concatenated fields, so the
# position the script counted is the one the event carries.
_QUEUED_FIELD = """
local function varint(n)
  local s = ''
  while n >= 128 do s = s .. string.char(n % 128 + 128); n = math.floor(n / 128) end
  return s .. string.char(n)
end
local function queued_field(position)
  local inner = string.char(8) .. varint(position)
  return string.char(82) .. varint(#inner) .. inner
end
"""

# KEYS: job, events, jobs, queued, the tenant's unfinished jobs, its waiting jobs, its work this window.
# ARGV: capacity, id, request, now, owned, event (without queued), ttl, maxlen, tenant, watch token digest,
# max in flight, max queued, work, max work, window ttl. The tenant sets are sorted by expiry time, so a job
# whose key expired stops counting. Returns {position, depth}, or {-1, depth} for a full queue, or
# {-2, value, limit name} for a tenant limit.
SUBMIT = (
    _QUEUED_FIELD
    + """
local now = tonumber(ARGV[4])
local depth = redis.call('ZCARD', KEYS[4])
if depth >= tonumber(ARGV[1]) then return {-1, depth} end
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now)
local in_flight = redis.call('ZCARD', KEYS[5])
if tonumber(ARGV[11]) > 0 and in_flight >= tonumber(ARGV[11]) then
  return {-2, in_flight, 'max_jobs_in_flight'}
end
local queued = redis.call('ZCARD', KEYS[6])
if tonumber(ARGV[12]) > 0 and queued >= tonumber(ARGV[12]) then return {-2, queued, 'max_queued'} end
local work = tonumber(redis.call('GET', KEYS[7]) or '0') + tonumber(ARGV[13])
if tonumber(ARGV[14]) > 0 and work > tonumber(ARGV[14]) then
  return {-2, work, 'max_pixel_iterations_per_minute'}
end
redis.call('SET', KEYS[7], work, 'EX', ARGV[15])
local expiry = now + tonumber(ARGV[7])
redis.call('ZADD', KEYS[5], expiry, ARGV[2])
redis.call('ZADD', KEYS[6], expiry, ARGV[2])
local event = ARGV[6] .. queued_field(depth)
redis.call('ZADD', KEYS[4], now, ARGV[2])
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', 'e', event)
redis.call('HSET', KEYS[1], 'request', ARGV[3], 'state', 1, 'accepted_at', ARGV[4], 'owned', ARGV[5],
  'attempt', 0, 'seq', 1, 'watchers', 0, 'ev:queued', event, 'last', id, 'tenant', ARGV[9],
  'watch', ARGV[10])
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('EXPIRE', KEYS[2], ARGV[7])
redis.call('XADD', KEYS[3], '*', 'job', ARGV[2])
return {depth, depth}
"""
)

# The tenant's sorted sets of a job, named from the job's hash (one Redis, not a Cluster: a script may
# derive key names).
_TENANT = """
local function tenant_key(kind)
  return 'stylize:tenant:' .. (redis.call('HGET', KEYS[1], 'tenant') or '') .. ':' .. kind
end
"""

# KEYS: job, jobs, queued. ARGV: token, entry, max attempts, group, id, consumer.
TAKE = (
    _TENANT
    + """
local function drop()
  redis.call('XACK', KEYS[2], ARGV[4], ARGV[2])
  redis.call('XDEL', KEYS[2], ARGV[2])
  redis.call('ZREM', KEYS[3], ARGV[5])
end
local state = tonumber(redis.call('HGET', KEYS[1], 'state') or '0')
if state ~= 1 and state ~= 2 then drop(); return {'gone'} end
redis.call('ZREM', KEYS[3], ARGV[5])
redis.call('ZREM', tenant_key('queued'), ARGV[5])
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'lease', ARGV[1], 'entry', ARGV[2], 'consumer', ARGV[6])
local f = redis.call('HMGET', KEYS[1], 'request', 'seq', 'accepted_at', 'cancel', 'retry_reason', 'tenant')
redis.call('HDEL', KEYS[1], 'retry_reason')
if attempt > tonumber(ARGV[3]) then return {'exhausted', attempt - 1, f[2], f[3]} end
return {'run', attempt, f[2], f[3], f[1], f[4] or '', f[5] or '', f[6] or ''}
"""
)

# KEYS: job, events. ARGV: token, seq, event, maxlen, slot, second slot, 1 to forget the last attempt.
PUBLISH = """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
-- A retry of a write that Redis ran although its reply was lost: already there.
if tonumber(ARGV[2]) <= tonumber(redis.call('HGET', KEYS[1], 'seq') or '0') then return 1 end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'e', ARGV[3])
redis.call('HSET', KEYS[1], 'seq', ARGV[2], 'last', id)
if ARGV[7] == '1' then redis.call('HDEL', KEYS[1], 'ev:started', 'ev:preview', 'ev:progress') end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'ev:' .. ARGV[5], ARGV[3]) end
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'ev:' .. ARGV[6], ARGV[3]) end
if ARGV[5] == 'started' then redis.call('HSET', KEYS[1], 'state', 2) end
return 1
"""

# The end of a job; shared by FINISH (a worker) and CANCEL (a queued job nobody holds).
_END = (
    _TENANT
    + """
local function finish(state, ending, ttl, job_id)
  redis.call('ZREM', tenant_key('jobs'), job_id)
  redis.call('ZREM', tenant_key('queued'), job_id)
  local id = redis.call('XADD', KEYS[2], '*', 'end', ending)
  redis.call('HSET', KEYS[1], 'state', state, 'end', ending, 'last', id)
  redis.call('HDEL', KEYS[1], 'request', 'lease')
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
"""
)

# KEYS: job, events, jobs. ARGV: token, state, end, completed event or '', seq, ttl, group, maxlen, id.
FINISH = (
    _END
    + """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
local entry = redis.call('HGET', KEYS[1], 'entry')
if ARGV[4] ~= '' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', 'e', ARGV[4])
  redis.call('HSET', KEYS[1], 'ev:completed', ARGV[4], 'seq', ARGV[5])
end
finish(ARGV[2], ARGV[3], ARGV[6], ARGV[9])
redis.call('XACK', KEYS[3], ARGV[7], entry)
redis.call('XDEL', KEYS[3], entry)
return 1
"""
)

# KEYS: job, events, queued. ARGV: cancellation, end, ttl, id. Returns -1 unknown, 0 already ended,
# 1 ended here (it was waiting), 2 the worker holding it is told.
CANCEL = (
    _END
    + """
local state = tonumber(redis.call('HGET', KEYS[1], 'state') or '0')
if state == 0 then return -1 end
if state ~= 1 and state ~= 2 then return 0 end
redis.call('HSET', KEYS[1], 'cancel', ARGV[1])
if state == 1 and not redis.call('HGET', KEYS[1], 'lease') then
  redis.call('ZREM', KEYS[3], ARGV[4])
  finish(5, ARGV[2], ARGV[3], ARGV[4])
  return 1
end
return 2
"""
)

# KEYS: job, events, jobs. ARGV: token, group, consumer, ttl. Returns {1, cancellation} or {0}: lost.
RENEW = """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return {0} end
redis.call('XCLAIM', KEYS[3], ARGV[2], ARGV[3], 0, redis.call('HGET', KEYS[1], 'entry'), 'JUSTID')
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return {1, redis.call('HGET', KEYS[1], 'cancel') or ''}
"""

# KEYS: job, jobs, queued. ARGV: token, group, id, reason, expiry. Hands a job back to the queue
# (shutdown).
RELEASE = (
    _TENANT
    + """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
local entry = redis.call('HGET', KEYS[1], 'entry')
redis.call('XACK', KEYS[2], ARGV[2], entry)
redis.call('XDEL', KEYS[2], entry)
redis.call('HDEL', KEYS[1], 'lease', 'entry', 'consumer')
redis.call('HSET', KEYS[1], 'state', 1, 'retry_reason', ARGV[4])
redis.call('ZADD', KEYS[3], redis.call('HGET', KEYS[1], 'accepted_at'), ARGV[3])
redis.call('ZADD', tenant_key('queued'), ARGV[5], ARGV[3])
redis.call('XADD', KEYS[2], '*', 'job', ARGV[3])
return 1
"""
)

# KEYS: job. ARGV: +1 or -1. A watcher count only for a job that exists.
WATCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
return redis.call('HINCRBY', KEYS[1], 'watchers', ARGV[1])
"""


def job_key(job_id: str) -> str:
    return f"stylize:job:{job_id}"


def events_key(job_id: str) -> str:
    return f"stylize:job:{job_id}:events"


def status_to_json(status: JobStatus | None) -> str:
    if status is None:
        return ""
    return json.dumps(
        {
            "code": status.code.name,
            "message": status.message,
            "reason": status.reason,
            "violations": [[v.field, v.description] for v in status.violations],
        }
    )


def status_from_json(text: bytes | str | None) -> JobStatus | None:
    if not text:
        return None
    data = json.loads(text)
    return JobStatus(
        grpc.StatusCode[data["code"]],
        data["message"],
        tuple(FieldViolation(field, description) for field, description in data["violations"]),
        reason=data["reason"],
    )


def end_to_json(state: int, status: JobStatus | None) -> str:
    return json.dumps({"state": state, "status": status_to_json(status)})


def end_from_json(text: bytes) -> JobEnd:
    data = json.loads(text)
    return JobEnd(data["state"], status_from_json(data["status"]))


def display_name(url: str) -> str:
    """The URL without a password, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port}{parts.path}"


@dataclass(frozen=True)
class _Event:
    kind: str
    data: bytes
    sequence: int
    has_preview: bool


@dataclass(frozen=True)
class _Finish:
    state: int
    status: JobStatus | None
    completed: bytes
    sequence: int


class RedisLease:
    """A job this replica's worker runs. Its events go out in order through one task on the loop, which
    retries while Redis does not answer; the worker never waits for Redis."""

    def __init__(
        self,
        broker: RedisBroker,
        job_id: str,
        token: str,
        request: JobRequest,
        *,
        tenant: str,
        attempt: int,
        sequence: int,
        accepted_at: float,
    ):
        self._broker = broker
        self.job_id = job_id
        self.token = token
        self.request = request
        self.tenant = tenant
        self.attempt = attempt
        self._sequence = sequence
        self._accepted_at = accepted_at
        self.queue_seconds = max(0.0, time.time() - accepted_at)
        self.cancel = threading.Event()
        self._cancel_status: JobStatus | None = None
        # Set at the end of a shutdown's grace period: the job goes back to the queue, not to CANCELLED.
        self.hand_back = False
        # Set when another worker holds the job now: this one's writes would be refused.
        self.lost = False
        self._outbox: collections.deque[_Event | _Finish] = collections.deque()
        self._wake = asyncio.Event()

    def cancel_status(self) -> JobStatus | None:
        return self._cancel_status

    def stop(self, status: JobStatus) -> None:
        if not self.cancel.is_set():
            self._cancel_status = status
            self.cancel.set()

    # Worker thread side.
    def publish(self, event: pb.JobEvent) -> None:
        self._broker.call_soon(self._put_event, event)

    def finish(self, state: int, status: JobStatus | None, completed: pb.JobEvent | None) -> None:
        self._broker.call_soon(self._put_finish, state, status, completed)

    # Loop side.
    def _stamp(self, event: pb.JobEvent) -> bytes:
        self._sequence += 1
        event.job_id = self.job_id
        event.sequence = self._sequence
        event.elapsed_seconds = max(0.0, time.time() - self._accepted_at)
        event.client_tag = self.request.client_tag
        return event.SerializeToString()

    def _put_event(self, event: pb.JobEvent) -> None:
        kind = event.WhichOneof("event") or ""
        has_preview = kind == "progress" and event.progress.HasField("preview")
        self._outbox.append(_Event(kind, self._stamp(event), self._sequence, has_preview))
        if len(self._outbox) > OUTBOX_BACKLOG:
            oldest = next((e for e in self._outbox if isinstance(e, _Event) and e.kind == "progress"), None)
            if oldest is not None:
                self._outbox.remove(oldest)
        self._wake.set()

    def _put_finish(self, state: int, status: JobStatus | None, completed: pb.JobEvent | None) -> None:
        data = self._stamp(completed) if completed is not None else b""
        self._outbox.append(_Finish(state, status, data, self._sequence))
        self._wake.set()

    async def send(self) -> None:
        """Write the outbox to Redis in order until the attempt's end is written (or the lease is lost)."""
        while True:
            while not self._outbox:
                self._wake.clear()
                await self._wake.wait()
            try:
                ended = await self._broker.write(self, self._outbox[0])
            except RedisError as error:
                self._broker.mark_down(error)
                await asyncio.sleep(RETRY_SECONDS)
                continue
            self._outbox.popleft()
            if ended:
                return


class RedisBroker:
    """The fleet's broker on one Redis."""

    def __init__(
        self,
        url: str,
        *,
        loop: asyncio.AbstractEventLoop,
        limits: Limits,
        max_queue: int,
        finished_job_ttl: float,
        lease_seconds: float,
        max_attempts: int,
    ):
        self.name = display_name(url)
        self._loop = loop
        self._limits = limits
        self._max_queue = max_queue
        self._finished_ttl = max(1, round(finished_job_ttl))
        self._lease_ms = max(1, round(lease_seconds * 1000))
        self._renew_seconds = min(TICK_SECONDS, lease_seconds / 3)
        self._max_attempts = max_attempts
        self._redis = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
            socket_timeout=SOCKET_TIMEOUT_SECONDS,
            retry=Retry(NoBackoff(), 0),
        )
        self._consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._submit = self._redis.register_script(SUBMIT)
        self._take = self._redis.register_script(TAKE)
        self._publish = self._redis.register_script(PUBLISH)
        self._finish = self._redis.register_script(FINISH)
        self._cancel = self._redis.register_script(CANCEL)
        self._renew = self._redis.register_script(RENEW)
        self._release = self._redis.register_script(RELEASE)
        self._watch = self._redis.register_script(WATCH)
        self._available = False
        self._group_ready = False
        # When Redis last became reachable from here (monotonic); reclaiming waits a lease period after it.
        self._reachable_since = time.monotonic()
        # Where the next XAUTOCLAIM scan of the pending entries starts ("0-0" after a full pass).
        self._claim_cursor: bytes | str = "0-0"
        self._figures = QueueFigures(0, max_queue, 0.0)
        self._leases: dict[str, RedisLease] = {}
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[None]] = set()
        # Watchers of this replica being counted out, by job id.
        self._unwatching: dict[str, set[asyncio.Future[None]]] = collections.defaultdict(set)

    @property
    def available(self) -> bool:
        return self._available

    @property
    def draining(self) -> bool:
        return self._draining

    def figures(self) -> QueueFigures:
        return self._figures

    def held_pixels(self) -> int:
        return 0

    def call_soon(self, callback: Callable[..., object], *args: object) -> None:
        call_soon_threadsafe(self._loop, callback, *args)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def mark_down(self, error: RedisError) -> None:
        """After a call failed: a connection problem marks the broker down for every call (they then fail
        fast); a refused command is that call's error only."""
        if not isinstance(error, RedisConnectionError | RedisTimeoutError):
            return
        if self._available:
            log.error("job broker %s unavailable: %s", self.name, error)
        self._available = False

    def _unavailable(self, error: RedisError) -> BrokerUnavailable:
        """The error for a call that Redis did not answer."""
        self.mark_down(error)
        return BrokerUnavailable(self.name, str(error) or type(error).__name__)

    async def start(self) -> None:
        await self._tick()
        if not self._available:
            log.error("job broker %s not reachable at start-up; NOT_SERVING until it is", self.name)
        self._spawn(self._keep_up())
        self._spawn(self._listen_for_cancellations())

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if not self._leases:
            # Nothing of this replica is pending any more: drop its consumer from the group. (With a
            # lease still held, the entry must stay pending so that another worker reclaims it.)
            try:
                await self._redis.xgroup_delconsumer(JOBS, GROUP, self._consumer)
            except RedisError as error:
                log.warning("could not remove consumer %s from the group: %s", self._consumer, error)
        await self._redis.aclose()

    # ------------------------------------------------------------ upkeep

    async def _keep_up(self) -> None:
        while True:
            await asyncio.sleep(self._renew_seconds)
            await self._tick()

    async def _tick(self) -> None:
        """Reachability, the fleet's queue figures, lease renewal and cancellation of local jobs."""
        try:
            if not self._group_ready:
                try:
                    await self._redis.xgroup_create(JOBS, GROUP, id="0", mkstream=True)
                except ResponseError as error:
                    if "BUSYGROUP" not in str(error):
                        raise
                self._group_ready = True
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zcard(QUEUED)
                pipe.zrange(QUEUED, 0, 0, withscores=True)
                depth, oldest = await pipe.execute()
            wait = time.time() - oldest[0][1] if oldest else 0.0
            self._figures = QueueFigures(depth, self._max_queue, max(0.0, wait))
            for lease in list(self._leases.values()):
                renewed = await self._renew(
                    keys=[job_key(lease.job_id), events_key(lease.job_id), JOBS],
                    args=[lease.token, GROUP, self._consumer, QUEUED_JOB_TTL],
                )
                if not renewed[0]:
                    self._lose(lease)
                elif renewed[1]:
                    lease.stop(_cancellation(renewed[1]))
        except RedisError as error:
            self.mark_down(error)
            self._group_ready = False
            return
        if not self._available:
            log.warning("job broker %s reachable", self.name)
            self._reachable_since = time.monotonic()
        self._available = True

    async def _listen_for_cancellations(self) -> None:
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(CANCEL_CHANNEL)
                    while True:
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if message is None:
                            continue
                        lease = self._leases.get(message["data"].decode())
                        if lease is not None:
                            lease.stop(_cancellation(await self._redis.hget(job_key(lease.job_id), "cancel")))
            except RedisError:
                await asyncio.sleep(RETRY_SECONDS)

    # ------------------------------------------------------------ loop side

    def admission(self) -> JobStatus | None:
        if self._draining:
            return SHUTDOWN
        if not self._available:
            return BrokerUnavailable(self.name, "not answering").status
        if self._figures.depth >= self._max_queue:
            return queue_full(self._figures.depth, self._max_queue)
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
        if self._draining:
            raise Rejected(SHUTDOWN)
        job_id = uuid.uuid4().hex
        event = pb.JobEvent(job_id=job_id, sequence=1, client_tag=request.client_tag).SerializeToString()
        now = time.time()
        window, retry_after = work_window(now)
        tenant = f"stylize:tenant:{owner.tenant}"
        try:
            outcome = await self._submit(
                keys=[
                    job_key(job_id),
                    events_key(job_id),
                    JOBS,
                    QUEUED,
                    f"{tenant}:jobs",
                    f"{tenant}:queued",
                    f"{tenant}:work:{window}",
                ],
                args=[
                    self._max_queue,
                    job_id,
                    message.SerializeToString(),
                    repr(now),
                    int(owned_by_call),
                    event,
                    QUEUED_JOB_TTL,
                    EVENTS_MAXLEN,
                    owner.tenant,
                    owner.watch_token_sha256,
                    limits.max_jobs_in_flight,
                    limits.max_queued,
                    work,
                    limits.max_pixel_iterations_per_minute,
                    2 * WORK_WINDOW_SECONDS,
                ],
            )
        except RedisError as error:
            raise self._unavailable(error) from None
        if outcome[0] == -1:
            raise Rejected(queue_full(outcome[1], self._max_queue))
        if outcome[0] == -2:
            limit = outcome[2].decode()
            maximum = getattr(limits, limit)
            wait = retry_after if limit == "max_pixel_iterations_per_minute" else 1.0
            raise Rejected(over_tenant_limit(owner.tenant, limit, outcome[1], maximum, wait))
        return job_id, outcome[0]

    async def owner(self, job_id: str) -> JobOwner | None:
        try:
            state, tenant, watch = await self._redis.hmget(job_key(job_id), ["state", "tenant", "watch"])
        except RedisError as error:
            raise self._unavailable(error) from None
        if state is None:
            return None
        return JobOwner((tenant or b"").decode(), (watch or b"").decode())

    async def follow(self, job_id: str) -> AsyncIterator[pb.JobEvent | JobEnd]:
        key = job_key(job_id)
        try:
            if await self._watch(keys=[key], args=[1]) < 0:
                yield JobEnd(pb.JOB_STATE_FAILED, _expired(job_id))
                return
        except RedisError as error:
            raise self._unavailable(error) from None
        try:
            try:
                fields = await self._redis.hmget(key, [*REPLAY_FIELDS, "end", "last"])
            except RedisError as error:
                raise self._unavailable(error) from None
            *replay, end, last = fields
            seen: set[bytes] = set()
            for data in replay:
                if data is not None and data not in seen:
                    seen.add(data)
                    yield pb.JobEvent.FromString(data)
            if end is not None:
                yield end_from_json(end)
                return
            async for item in self._tail(job_id, last or b"0-0"):
                yield item
        finally:
            # A task: this generator may be closing because its call was cancelled. watchers() waits for
            # it, so a caller that asks right after its own watcher left is not counted.
            unwatch = asyncio.ensure_future(self._unwatch(key))
            self._unwatching[job_id].add(unwatch)
            unwatch.add_done_callback(lambda done: self._forget_unwatch(job_id, done))

    def _forget_unwatch(self, job_id: str, done: asyncio.Future[None]) -> None:
        leaving = self._unwatching.get(job_id)
        if leaving is not None:
            leaving.discard(done)
            if not leaving:
                del self._unwatching[job_id]

    async def _unwatch(self, key: str) -> None:
        try:
            await self._watch(keys=[key], args=[-1])
        except RedisError as error:
            log.warning("could not count a watcher out of %s: %s", key, error)

    async def _tail(self, job_id: str, last: bytes) -> AsyncIterator[pb.JobEvent | JobEnd]:
        """The job's events after stream id `last`, up to and including its end."""
        stream = events_key(job_id)
        while True:
            try:
                response = await self._redis.xread({stream: last}, count=64, block=BLOCK_MILLISECONDS)
                if not response and not await self._redis.exists(job_key(job_id)):
                    yield JobEnd(pb.JOB_STATE_FAILED, _expired(job_id))
                    return
            except RedisError as error:
                raise self._unavailable(error) from None
            for _, entries in response:
                for entry_id, fields in entries:
                    last = entry_id
                    if b"end" in fields:
                        yield end_from_json(fields[b"end"])
                        return
                    yield pb.JobEvent.FromString(fields[b"e"])

    async def watchers(self, job_id: str) -> int:
        leaving = self._unwatching.get(job_id)
        if leaving:
            await asyncio.shield(asyncio.gather(*leaving, return_exceptions=True))
        try:
            return int(await self._redis.hget(job_key(job_id), "watchers") or 0)
        except RedisError as error:
            raise self._unavailable(error) from None

    async def cancel(self, job_id: str, status: JobStatus) -> bool:
        try:
            outcome = await self._cancel(
                keys=[job_key(job_id), events_key(job_id), QUEUED],
                args=[
                    status_to_json(status),
                    end_to_json(pb.JOB_STATE_CANCELLED, status),
                    self._finished_ttl,
                    job_id,
                ],
            )
            if outcome == 2:
                await self._redis.publish(CANCEL_CHANNEL, job_id)
        except RedisError as error:
            raise self._unavailable(error) from None
        return bool(outcome == 1)

    async def wait_finished(self, job_id: str) -> int:
        try:
            state, end, last = await self._redis.hmget(job_key(job_id), ["state", "end", "last"])
        except RedisError as error:
            raise self._unavailable(error) from None
        if end is not None:
            return end_from_json(end).state
        if state is None:
            return pb.JOB_STATE_FAILED
        async for item in self._tail(job_id, last or b"0-0"):
            if isinstance(item, JobEnd):
                return item.state
        raise AssertionError("unreachable: _tail ends with a JobEnd")

    def start_draining(self) -> None:
        self._draining = True

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def abandon(self) -> str:
        for lease in self._leases.values():
            lease.hand_back = True
            lease.stop(SHUTDOWN)
        return f"handing {len(self._leases)} job(s) back to the queue"

    # ------------------------------------------------------------ worker side

    def take(self, worker: int, timeout: float) -> RedisLease | None:
        if self._draining:
            time.sleep(min(timeout, RETRY_SECONDS))
            return None
        if not self._available:
            raise BrokerUnavailable(self.name, "not answering")
        claimed = asyncio.run_coroutine_threadsafe(self._claim(timeout), self._loop).result()
        if claimed is None:
            return None
        job_id, token, fields = claimed
        attempt, sequence, accepted_at = int(fields[1]), int(fields[2]), float(fields[3])
        if fields[0] == b"exhausted":
            status = JobStatus(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"job {job_id} gave up after {attempt} attempts: each time its worker stopped before the "
                "job ended (the job may be what stops them)",
                reason="attempts_exhausted",
            )
            self._end_unrun(job_id, token, status)
            return None
        try:
            request = convert.request_from_proto(pb.StylizeRequest.FromString(fields[4]), self._limits)
        except OptionsError as error:
            self._end_unrun(job_id, token, JobStatus.invalid(error))
            return None
        lease = RedisLease(
            self,
            job_id,
            token,
            request,
            tenant=fields[7].decode(),
            attempt=attempt,
            sequence=sequence,
            accepted_at=accepted_at,
        )
        asyncio.run_coroutine_threadsafe(self._hold(lease, fields[5], fields[6]), self._loop).result()
        return lease

    def _end_unrun(self, job_id: str, token: str, status: JobStatus) -> None:
        """End a job that was taken but will not run (no attempts left, a request this server refuses)."""
        log.warning("job %s: %s", job_id, status.message)
        try:
            asyncio.run_coroutine_threadsafe(
                self._end(job_id, token, pb.JOB_STATE_FAILED, status), self._loop
            ).result()
        except RedisError as error:
            # The job stays pending: taken again after its lease, it ends then.
            raise BrokerUnavailable(self.name, str(error)) from None

    async def _claim(self, timeout: float) -> tuple[str, str, list[bytes]] | None:
        try:
            # A job whose worker stopped renewing its lease comes first: it has waited longest.
            entries = []
            # After an outage every lease looks old: their workers get one lease period to renew first.
            if time.monotonic() - self._reachable_since >= self._lease_ms / 1000:
                # XAUTOCLAIM looks at COUNT x 10 pending entries per call: the cursor carries on from there.
                self._claim_cursor, entries, _ = await self._redis.xautoclaim(
                    JOBS,
                    GROUP,
                    self._consumer,
                    min_idle_time=self._lease_ms,
                    start_id=self._claim_cursor,
                    count=1,
                )
            if not entries:
                response = await self._redis.xreadgroup(
                    GROUP, self._consumer, {JOBS: ">"}, count=1, block=round(timeout * 1000)
                )
                entries = response[0][1] if response else []
            if not entries:
                return None
            entry_id, fields = entries[0]
            job_id = fields[b"job"].decode()
            token = uuid.uuid4().hex
            taken = await self._take(
                keys=[job_key(job_id), JOBS, QUEUED],
                args=[token, entry_id, self._max_attempts, GROUP, job_id, self._consumer],
            )
        except RedisError as error:
            if "NOGROUP" in str(error):
                self._group_ready = False
            raise self._unavailable(error) from None
        if taken[0] == b"gone":
            return None
        if self._draining:
            # Draining began while this worker waited for the entry: give it back untouched.
            await self._release(
                keys=[job_key(job_id), JOBS, QUEUED],
                args=[
                    token,
                    GROUP,
                    job_id,
                    "the server that took it shut down",
                    repr(time.time() + QUEUED_JOB_TTL),
                ],
            )
            return None
        return job_id, token, taken

    async def _hold(self, lease: RedisLease, cancellation: bytes, retry_reason: bytes) -> None:
        """Start the lease's writer; tell watchers when this is a retry; apply a cancellation made while
        the job waited."""
        self._leases[lease.job_id] = lease
        self._idle.clear()
        if lease.attempt > 1:
            reason = retry_reason.decode() or "the worker running it stopped renewing its lease"
            lease.publish(convert.retrying_event(lease.attempt, self._max_attempts, reason))
        if cancellation:
            lease.stop(_cancellation(cancellation))
        self._spawn(self._run_writer(lease))

    async def _run_writer(self, lease: RedisLease) -> None:
        try:
            await lease.send()
        finally:
            self._leases.pop(lease.job_id, None)
            if not self._leases:
                self._idle.set()

    async def write(self, lease: RedisLease, item: _Event | _Finish) -> bool:
        """One outbox item to Redis; True when it ended the attempt here. Raises RedisError."""
        keys = [job_key(lease.job_id), events_key(lease.job_id)]
        if lease.lost:
            return isinstance(item, _Finish)
        if isinstance(item, _Event):
            written = await self._publish(
                keys=keys,
                args=[
                    lease.token,
                    item.sequence,
                    item.data,
                    EVENTS_MAXLEN,
                    item.kind,
                    "preview" if item.has_preview else "",
                    int(item.kind == "retrying"),
                ],
            )
            if not written:
                self._lose(lease)
            return False
        if lease.hand_back and item.state == pb.JOB_STATE_CANCELLED and lease.cancel_status() is SHUTDOWN:
            # Stopped by the end of the grace period: the job goes back to the queue. An attempt that
            # ended otherwise (succeeded, failed, cancelled by a caller) is finished as it ended.
            released = await self._release(
                keys=[job_key(lease.job_id), JOBS, QUEUED],
                args=[
                    lease.token,
                    GROUP,
                    lease.job_id,
                    "the server running it shut down",
                    repr(time.time() + QUEUED_JOB_TTL),
                ],
            )
            if released:
                log.info("job %s handed back to the queue", lease.job_id)
            return True
        await self._end(lease.job_id, lease.token, item.state, item.status, item.completed, item.sequence)
        return True

    async def _end(
        self,
        job_id: str,
        token: str,
        state: int,
        status: JobStatus | None,
        completed: bytes = b"",
        sequence: int = 0,
    ) -> None:
        await self._finish(
            keys=[job_key(job_id), events_key(job_id), JOBS],
            args=[
                token,
                state,
                end_to_json(state, status),
                completed,
                sequence,
                self._finished_ttl,
                GROUP,
                EVENTS_MAXLEN,
                job_id,
            ],
        )

    @staticmethod
    def _lose(lease: RedisLease) -> None:
        log.warning("job %s: another worker holds it now; stopping here", lease.job_id)
        lease.lost = True
        lease.stop(JobStatus(grpc.StatusCode.ABORTED, "the job moved to another worker"))


def _expired(job_id: str) -> JobStatus:
    return JobStatus(grpc.StatusCode.NOT_FOUND, f"job {job_id} expired before it ended")


def _cancellation(text: bytes | None) -> JobStatus:
    return status_from_json(text) or JobStatus(grpc.StatusCode.CANCELLED, "cancelled")
