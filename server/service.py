"""The stylize.v1.StyleTransfer servicer on grpc.aio.

Requests are decoded and validated off the event loop (asyncio.to_thread; PIL only, no torch), queued in
the JobManager, and streamed back from the job's events. Ownership of a job:
- Stylize: the call owns its job. When the caller cancels, disconnects or runs past its deadline, the job
  is cancelled (within one iteration) unless other WatchJob watchers still follow it.
- SubmitJob: the job runs whether or not anybody watches; watchers come and go.

Deadlines: a Stylize call whose deadline is shorter than the least time its job can take is refused up front
with DEADLINE_EXCEEDED (stylize.server.estimate: a lower bound from what the workers measured, so that work
that would have fitted is never refused). Before a measurement applies to the job there is no bound and every
deadline is accepted; a call that then runs out of time is cancelled like any other.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hmac
import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import grpc

from stylize.api import __version__, schedule, wire
from stylize.api.options import DEFAULTS, ECHO_CHARACTERS, LAYERS, Backbone, FieldViolation, OptionsError
from stylize.v1 import stylize_pb2 as pb
from stylize.v1 import stylize_pb2_grpc

from . import convert
from .auth import Tenant, current_tenant, token_digest
from .broker import SHUTDOWN, BrokerUnavailable, JobEnd, JobOwner, Rejected, over_tenant_limit
from .config import ServerConfig
from .convert import JobRequest
from .errors import JobStatus, abort, deadline_passed
from .estimate import job_kinds
from .jobs import JobManager, outcome_status
from .metrics import ServiceMetrics
from .runtime import Model, Runtime

log = logging.getLogger(__name__)

WATCH_TOKEN_BYTES = 16
# What a job id looks like (uuid4().hex).
JOB_ID = re.compile(r"[0-9a-f]{32}")


class DecodeSlots:
    """Request decodes in progress per tenant on this server, against the tenant's
    max_concurrent_decodes: a 60 MiB request costs memory before any queue sees it."""

    def __init__(self) -> None:
        self._busy: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def slot(self, tenant: Tenant) -> Iterator[JobStatus | None]:
        """Yields None with a slot held, or the refusal when the tenant has none free."""
        maximum = tenant.limits.max_concurrent_decodes
        if maximum and self._busy[tenant.name] >= maximum:
            yield over_tenant_limit(
                tenant.name, "max_concurrent_decodes", self._busy[tenant.name], maximum, 1.0
            )
            return
        self._busy[tenant.name] += 1
        try:
            yield None
        finally:
            self._busy[tenant.name] -= 1
            if not self._busy[tenant.name]:
                del self._busy[tenant.name]


class PixelBudget:
    """The decoded input pixels this server holds before a worker takes them, against
    --max-queued-pixels: requests being decoded (reserved from their headers before any pixel is) and
    the jobs waiting in the broker (the memory broker queues decoded images)."""

    def __init__(self, maximum: int):
        self._maximum = maximum
        self.decoding = 0

    def refusal(self, pixels: int, queued: int) -> JobStatus | None:
        """Why a request of `pixels` must wait, or None. One alone is always admitted: the budget never
        makes a valid request impossible."""
        held = self.decoding + queued
        if held == 0 or held + pixels <= self._maximum:
            return None
        return JobStatus(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"queue full: waiting and decoding requests hold {held} decoded pixels, this one has {pixels}; "
            f"the limit is {self._maximum} (--max-queued-pixels)",
            reason="queued_pixels",
        )

    @contextlib.contextmanager
    def holding(self, pixels: int) -> Iterator[None]:
        self.decoding += pixels
        try:
            yield
        finally:
            self.decoding -= pixels


class StyleTransferService(stylize_pb2_grpc.StyleTransferServicer):
    def __init__(
        self,
        config: ServerConfig,
        metrics: ServiceMetrics,
        runtime_ready: Callable[[], Runtime | None],
        manager: Callable[[], JobManager | None],
    ):
        self._config = config
        self._metrics = metrics
        # Both appear once start-up finished; until then calls get UNAVAILABLE.
        self._runtime = runtime_ready
        self._manager = manager
        self._decodes = DecodeSlots()
        self._pixels = PixelBudget(config.max_queued_pixels)
        # Cancellations started for callers that left, kept so they are not garbage-collected mid-way.
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ helpers

    async def _require_manager(self, context: grpc.aio.ServicerContext) -> JobManager:
        runtime, manager = self._runtime(), self._manager()
        if runtime is None or manager is None:
            await abort(
                context, JobStatus(grpc.StatusCode.UNAVAILABLE, "server starting: the model is loading")
            )
        if not runtime.ready:
            await abort(
                context,
                JobStatus(
                    grpc.StatusCode.UNAVAILABLE,
                    "not serving: ONNX Runtime disagreed with torch in the start-up parity probe (see log)",
                ),
            )
        if manager.draining:
            await abort(context, SHUTDOWN)
        await self._require_broker(manager, context)
        return manager

    async def _require_broker(self, manager: JobManager, context: grpc.aio.ServicerContext) -> None:
        if not manager.broker.available:
            await abort(context, BrokerUnavailable(manager.broker.name, "not answering").status)

    async def _reject(self, context: grpc.aio.ServicerContext, status: JobStatus) -> None:
        self._metrics.jobs.labels("rejected", status.outcome_reason, "").inc()
        await abort(context, status)

    async def _accept(
        self, request: pb.StylizeRequest, context: grpc.aio.ServicerContext, *, owned_by_call: bool
    ) -> tuple[str, int, str]:
        """Queue the job: (job id, jobs ahead of it, its watch token or "")."""
        manager = await self._require_manager(context)
        tenant = current_tenant.get()
        # Before any image is looked at: a full queue refuses a 60 MiB request as fast as a tiny one.
        refusal = manager.broker.admission()
        if refusal is not None:
            await self._reject(context, refusal)
        with contextlib.ExitStack() as held:
            with self._decodes.slot(tenant) as refusal:
                if refusal is not None:
                    await self._reject(context, refusal)
                # Then the images' headers, before any pixel is decoded: what they hold once decoded.
                try:
                    pixels = await asyncio.to_thread(convert.input_pixels, request, self._config.limits)
                except OptionsError as error:
                    await self._reject(context, JobStatus.invalid(error))
                refusal = self._pixels.refusal(pixels, manager.broker.held_pixels())
                if refusal is not None:
                    await self._reject(context, refusal)
                # Counted from here until the broker holds the job, or the request is refused.
                held.enter_context(self._pixels.holding(pixels))
                job_request = await self._decode(request, context)
            return await self._queue(request, job_request, context, manager, tenant, owned_by_call)

    async def _decode(self, request: pb.StylizeRequest, context: grpc.aio.ServicerContext) -> JobRequest:
        decoding = asyncio.ensure_future(
            asyncio.to_thread(convert.request_from_proto, request, self._config.limits)
        )
        try:
            job_request = await asyncio.shield(decoding)
            self._runtime().check_backbone(job_request.options)
        except OptionsError as error:
            await self._reject(context, JobStatus.invalid(error))
        except asyncio.CancelledError:
            # The caller left, but the decode runs on in its thread: its decode slot and its pixels are
            # held until it ends, so cancelling and sending again gets past neither limit.
            with contextlib.suppress(Exception):
                await decoding
            raise
        return job_request

    async def _queue(
        self,
        request: pb.StylizeRequest,
        job_request: JobRequest,
        context: grpc.aio.ServicerContext,
        manager: JobManager,
        tenant: Tenant,
        owned_by_call: bool,
    ) -> tuple[str, int, str]:
        """The deadline rule, then the hand-over to the broker: (job id, jobs ahead, watch token)."""
        plan = schedule.plan_for(job_request.options, job_request.content.size)
        # Only a Stylize call lives as long as its job; SubmitJob's deadline covers the submission alone.
        remaining = context.time_remaining() if owned_by_call else None
        work = sum(scale.pixels * scale.iterations for scale in plan)
        if remaining is not None:
            auto = {choice.precision.value for choice in self._runtime().auto_precision.values()}
            kinds = job_kinds(job_request.options, auto)
            estimate = manager.run_time.estimate(kinds, plan)
            if estimate is not None and remaining < estimate.lower_seconds:
                await self._reject(
                    context,
                    JobStatus(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"deadline too short: the job needs at least {estimate.lower_seconds:.3g} s (about "
                        f"{estimate.expected_seconds:.3g} s), the call has {remaining:.3g} s",
                        reason="deadline_too_short",
                    ),
                )
        # A Stylize caller has no response to receive a watch token in.
        watch_token = "" if owned_by_call else secrets.token_urlsafe(WATCH_TOKEN_BYTES)
        owner = JobOwner(tenant.name, token_digest(watch_token) if watch_token else "")
        submitting = asyncio.ensure_future(
            manager.broker.submit(
                request,
                job_request,
                owned_by_call=owned_by_call,
                owner=owner,
                limits=tenant.limits,
                work=work,
            )
        )
        try:
            job_id, position = await asyncio.shield(submitting)
        except asyncio.CancelledError:
            # The caller left while its job was being queued: nobody has its id, so it must not run.
            submitting.add_done_callback(self._cancel_orphan)
            raise
        except Rejected as rejected:
            await self._reject(context, rejected.status)
        except BrokerUnavailable as error:
            await self._reject(context, error.status)
        log.info(
            "job %s accepted: tenant %r, client_tag %r, %dx%d, %d iterations",
            job_id,
            tenant.name,
            job_request.client_tag,
            plan[-1].width,
            plan[-1].height,
            sum(scale.iterations for scale in plan),
        )
        return job_id, position, watch_token

    async def _follow(
        self, job_id: str, context: grpc.aio.ServicerContext, *, owner: bool
    ) -> AsyncIterator[pb.JobEvent]:
        """The job's events from its current state; ends with the job's failure status, if any.

        `owner`: this is the Stylize call that owns the job; leaving early cancels it (see _caller_left).
        """
        broker = self._manager().broker
        end: JobEnd | None = None
        self._metrics.watchers.inc()
        try:
            async with contextlib.aclosing(broker.follow(job_id)) as events:
                async for event in events:
                    if isinstance(event, JobEnd):
                        end = event
                        break
                    if event.HasField("progress") and event.progress.HasField("preview"):
                        self._metrics.previews_sent.inc()
                    yield event
        except BrokerUnavailable as error:
            await abort(context, error.status)
        finally:
            self._metrics.watchers.dec()
            if owner and end is None:
                self._caller_left(job_id, context)
        if end is not None and end.status is not None:
            await abort(context, end.status)

    def _caller_left(self, job_id: str, context: grpc.aio.ServicerContext) -> None:
        """A Stylize caller went away before its job finished: cancel it unless others watch. Runs as a
        task of its own: the call's task is being cancelled."""
        if deadline_passed(context):
            status = JobStatus(
                grpc.StatusCode.DEADLINE_EXCEEDED, "the caller's deadline passed", reason="deadline"
            )
        else:
            status = JobStatus(grpc.StatusCode.CANCELLED, "the caller cancelled")
        self._spawn(self._cancel_unwatched(job_id, status))

    def _cancel_orphan(self, submitted: asyncio.Future[tuple[str, int]]) -> None:
        if submitted.cancelled() or submitted.exception() is not None:
            return
        job_id, _ = submitted.result()
        log.info("job %s: its caller left while it was being queued; cancelling", job_id)
        self._spawn(
            self._cancel_unwatched(job_id, JobStatus(grpc.StatusCode.CANCELLED, "the caller cancelled"))
        )

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _cancel_unwatched(self, job_id: str, status: JobStatus) -> None:
        broker = self._manager().broker
        try:
            if await broker.watchers(job_id) > 0:
                return
            log.info("job %s: %s; cancelling", job_id, status.message)
            await self._cancel(job_id, status)
        except BrokerUnavailable as error:
            log.warning("job %s: could not cancel: %s", job_id, error)

    async def _cancel(self, job_id: str, status: JobStatus) -> None:
        if await self._manager().broker.cancel(job_id, status):
            # Ended while still queued: no worker saw it, so the count is made here.
            self._metrics.jobs.labels(
                outcome_status(pb.JOB_STATE_CANCELLED, status), status.outcome_reason, ""
            ).inc()

    async def _find(
        self, job_id: str, context: grpc.aio.ServicerContext, *, watch_token: str | None = None
    ) -> str:
        """The job, if the caller may see it: its tenant's, or (`watch_token` given: watching) one whose
        watch token this is. Anything else is NOT_FOUND, exactly like an unknown id, so ids cannot be
        probed across tenants."""
        manager = self._manager()
        if not job_id:
            await abort(
                context,
                JobStatus.invalid(OptionsError([FieldViolation("job_id", "is required")])),
            )
        if manager is None:
            await abort(
                context, JobStatus(grpc.StatusCode.UNAVAILABLE, "server starting: the model is loading")
            )
        await self._require_broker(manager, context)
        owner = None
        # Only ids this server makes (uuid4 hex) reach the broker: no key a caller composes.
        if JOB_ID.fullmatch(job_id):
            try:
                owner = await manager.broker.owner(job_id)
            except BrokerUnavailable as error:
                await abort(context, error.status)
        caller = current_tenant.get()
        allowed = owner is not None and (
            owner.tenant == caller.name
            or bool(
                watch_token
                and owner.watch_token_sha256
                and hmac.compare_digest(token_digest(watch_token), owner.watch_token_sha256)
            )
        )
        if not allowed:
            await abort(
                context,
                JobStatus(
                    grpc.StatusCode.NOT_FOUND,
                    f"no job {job_id[:ECHO_CHARACTERS]!r} "
                    f"(unknown, or ended over {self._config.finished_job_ttl:.0f} s ago)",
                ),
            )
        return job_id

    # ------------------------------------------------------------ RPCs

    async def Stylize(self, request: pb.StylizeRequest, context: grpc.aio.ServicerContext):
        job_id, _, _ = await self._accept(request, context, owned_by_call=True)
        # aclosing: the inner generator's clean-up must run now, also when the caller's cancellation
        # arrives while this generator is suspended at `yield`.
        async with contextlib.aclosing(self._follow(job_id, context, owner=True)) as events:
            async for event in events:
                yield event

    async def SubmitJob(self, request: pb.StylizeRequest, context: grpc.aio.ServicerContext):
        job_id, position, watch_token = await self._accept(request, context, owned_by_call=False)
        return pb.SubmitJobResponse(job_id=job_id, queue_position=position, watch_token=watch_token)

    async def WatchJob(self, request: pb.WatchJobRequest, context: grpc.aio.ServicerContext):
        job_id = await self._find(request.job_id, context, watch_token=request.watch_token)
        async with contextlib.aclosing(self._follow(job_id, context, owner=False)) as events:
            async for event in events:
                yield event

    async def CancelJob(self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext):
        job_id = await self._find(request.job_id, context)
        try:
            await self._cancel(job_id, JobStatus(grpc.StatusCode.CANCELLED, "cancelled by CancelJob"))
            # A running job stops within one iteration, or completes when it was already past its last
            # iteration: answer what its watchers see, not what was asked.
            return pb.CancelJobResponse(state=await self._manager().broker.wait_finished(job_id))
        except BrokerUnavailable as error:
            await abort(context, error.status)

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext):
        runtime, manager = self._runtime(), self._manager()
        limits = self._config.limits
        info = pb.ServerInfo(
            version=__version__,
            default_options=wire.options_to_proto(DEFAULTS),
            available_layers=LAYERS[DEFAULTS.backbone],
            limits=pb.Limits(
                max_size=limits.max_size,
                max_pixels=limits.max_pixels,
                max_iterations=limits.max_iterations,
                max_styles=limits.max_styles,
                max_image_bytes=limits.max_image_bytes,
                max_queue=self._config.max_queue,
                finished_job_ttl_seconds=round(self._config.finished_job_ttl),
            ),
        )
        if manager is not None:
            queue = manager.snapshot()
            info.queue.CopyFrom(pb.QueueState(**dataclasses.asdict(queue)))
        if runtime is not None:
            info.models.extend(_model_info(model) for model in runtime.models.values())
            default = _model_info(runtime.default)
            info.model.CopyFrom(default)
            info.parity.CopyFrom(default.parity)
            info.available_layers[:] = default.available_layers
            info.providers.extend(runtime.default.providers)
            info.device = ", ".join(dict.fromkeys(str(device) for device in runtime.devices))
            info.devices.extend(
                pb.DeviceInfo(
                    device=device, auto_precision=choice.precision, auto_precision_reason=choice.reason
                )
                for device, choice in runtime.auto_precision.items()
            )
        return info


def _model_info(model: Model) -> pb.ModelInfo:
    manifest, parity = model.manifest, model.parity
    return pb.ModelInfo(
        arch=manifest.arch,
        weights=manifest.weights,
        # Random weights come from no file: their digest is that of the weights themselves.
        weights_sha256=manifest.weights_sha256 or manifest.state_dict_sha256,
        onnx_sha256=model.onnx_sha256,
        layers=manifest.layers,
        pooling=manifest.pooling,
        opset=manifest.opset,
        manifest_json=manifest.to_json(),
        parity=pb.ParityReport(
            passed=parity.passed,
            tolerance=parity.tolerance,
            targets_backend=parity.targets_backend,
            layers=[
                pb.LayerParity(layer=r.layer, quantity=r.quantity, relative_error=r.relative_error)
                for r in parity.rows
            ],
        ),
        available_layers=LAYERS[Backbone(manifest.arch)],
    )
