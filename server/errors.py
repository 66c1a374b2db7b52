"""gRPC statuses for failures, with google.rpc.BadRequest details naming each offending field."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from stylize.api.options import FieldViolation, OptionsError

log = logging.getLogger(__name__)

# The server learns a deadline as a timeout relative to the request's arrival, so its copy ends slightly after
# the client's: a caller whose deadline passed usually cancels (RST_STREAM) before the server's timer fires.
# A call that ends this close to its deadline counts as deadline exceeded.
DEADLINE_SKEW_SECONDS = 0.5


# What an INVALID_ARGUMENT status may carry, in UTF-8 bytes. gRPC sends the message twice (grpc-message,
# percent-encoded: up to 3 bytes per byte, and inside the google.rpc.Status of grpc-status-details-bin, which
# is base64: 4/3 of its bytes), and a client refuses trailers over 8 KiB (gRPC's soft metadata limit; 16 KiB
# hard): a 512-byte message and 3 KiB of violations stay under 6.5 KiB on the wire.
MAX_MESSAGE_BYTES = 512
MAX_VIOLATION_BYTES = 3072


@dataclass(frozen=True)
class JobStatus:
    """How a job (or a call) ended when it did not succeed: a gRPC code, a message, and field violations."""

    code: grpc.StatusCode
    message: str
    violations: tuple[FieldViolation, ...] = field(default=())
    # Why, for the stylize_jobs metric's `reason` label where the code alone does not say (queue_full,
    # oom, ...); empty: the code's name, lower case.
    reason: str = ""
    # When trying again may succeed (a per-tenant budget); sent as google.rpc.RetryInfo.
    retry_after_seconds: float | None = None

    @classmethod
    def invalid(cls, error: OptionsError) -> JobStatus:
        """INVALID_ARGUMENT with the error's violations, as many as fit in MAX_VIOLATION_BYTES (the rest
        counted in the message), and its message cut to MAX_MESSAGE_BYTES."""
        kept: list[FieldViolation] = []
        size = 0
        for violation in error.violations:
            # A violation's field and description, and the few bytes of protobuf framing around them.
            size += len(violation.field.encode()) + len(violation.description.encode()) + 6
            if size > MAX_VIOLATION_BYTES:
                break
            kept.append(violation)
        left = len(error.violations) - len(kept)
        suffix = f" ({left} more violations not listed)" if left else ""
        message = str(error).encode()
        room = MAX_MESSAGE_BYTES - len(suffix)
        if len(message) > room:
            message = message[: room - 3] + b"..."
        text = message.decode(errors="ignore")  # a character cut in two is dropped
        return cls(grpc.StatusCode.INVALID_ARGUMENT, text + suffix, tuple(kept))

    @property
    def outcome_reason(self) -> str:
        return self.reason or self.code.name.lower()

    def to_rpc_status(self) -> grpc.Status:
        detail = status_pb2.Status(code=getattr(code_pb2, self.code.name), message=self.message)
        if self.violations:
            bad_request = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in self.violations
                ]
            )
            packed = any_pb2.Any()
            packed.Pack(bad_request)
            detail.details.append(packed)
        if self.retry_after_seconds is not None:
            retry = error_details_pb2.RetryInfo()
            retry.retry_delay.FromTimedelta(datetime.timedelta(seconds=max(0.0, self.retry_after_seconds)))
            packed = any_pb2.Any()
            packed.Pack(retry)
            detail.details.append(packed)
        return rpc_status.to_status(detail)


def deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    """Whether a call that ended (its handler cancelled) ran out of its deadline, rather than being
    cancelled or dropped by its caller: the call had a deadline and was within DEADLINE_SKEW_SECONDS of it."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= DEADLINE_SKEW_SECONDS


async def abort(context: grpc.aio.ServicerContext, status: JobStatus) -> None:
    """End the call with `status` (raises, like context.abort)."""
    await context.abort_with_status(status.to_rpc_status())


# What a wrapped handler runs inside: an async context manager made per call from (request, context). It
# may abort before the handler runs, and sees the handler's exceptions.
Around = Callable[[object, grpc.aio.ServicerContext], contextlib.AbstractAsyncContextManager[None]]


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    around: Around,
    request_deserializer: Callable[[bytes], object] | None = None,
) -> grpc.RpcMethodHandler | None:
    """`handler` run inside `around(request, context)`: unary and server-streaming handlers, and
    bidirectional ones that are async generators (reflection); None for any other kind, so nothing passes
    unwrapped. `request_deserializer` replaces the handler's."""
    parse = request_deserializer or handler.request_deserializer
    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        unary = handler.unary_unary

        async def wrapped_unary(request, context):
            async with around(request, context):
                return await unary(request, context)

        return grpc.unary_unary_rpc_method_handler(wrapped_unary, parse, serialize)
    streaming = handler.unary_stream or handler.stream_stream
    if streaming is None:
        return None
    make = (
        grpc.unary_stream_rpc_method_handler
        if handler.unary_stream is not None
        else grpc.stream_stream_rpc_method_handler
    )
    if inspect.isasyncgenfunction(streaming):

        async def wrapped_stream(request, context):
            async with around(request, context):
                async for response in streaming(request, context):
                    yield response

        return make(wrapped_stream, parse, serialize)
    if handler.stream_stream is not None:
        return None

    async def wrapped_writer(request, context):  # a handler that writes with context.write() (health)
        async with around(request, context):
            return await streaming(request, context)

    return make(wrapped_writer, parse, serialize)


class InternalErrorInterceptor(grpc.aio.ServerInterceptor):
    """An exception that no handler turned into a status ends the call with INTERNAL and a request id. The
    exception goes to the log with that id, never to the caller: grpc.aio would send its text as UNKNOWN."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        @contextlib.asynccontextmanager
        async def reported(request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            try:
                yield
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception:
                request_id = uuid.uuid4().hex[:16]
                log.exception("request %s to %s failed", request_id, method)
                await abort(
                    context,
                    JobStatus(
                        grpc.StatusCode.INTERNAL, f"internal error (request id {request_id}; see the log)"
                    ),
                )

        return wrap_handler(handler, reported) or handler


class _Malformed:
    """Stands in for a request whose bytes do not parse as the method's message."""

    def __init__(self, reason: str):
        self.reason = reason


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Bytes that do not parse as the request message get INVALID_ARGUMENT.

    grpc.aio would answer UNKNOWN and log a DecodeError traceback: the parser runs before any handler.
    Here the parser is wrapped to hand the handler a marker instead, and the handler aborts on it.
    Covers unary and server-streaming methods (all this server has).
    """

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None or handler.stream_stream is not None:
            return handler
        parse, method = handler.request_deserializer, handler_call_details.method

        def tolerant_parse(data: bytes) -> object:
            try:
                return parse(data)
            except Exception as error:  # DecodeError and friends: all mean "not this message"
                return _Malformed(" ".join(str(error).split())[:200] or type(error).__name__)

        async def refuse(request: _Malformed, context: grpc.aio.ServicerContext) -> None:
            message = f"the request is not a valid message for {method}: {request.reason}"
            await abort(context, JobStatus(grpc.StatusCode.INVALID_ARGUMENT, message))

        @contextlib.asynccontextmanager
        async def checked(request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            if isinstance(request, _Malformed):
                await refuse(request, context)
            yield

        return wrap_handler(handler, checked, tolerant_parse) or handler
