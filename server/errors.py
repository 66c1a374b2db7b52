"""gRPC statuses for failures, with google.rpc.BadRequest details naming each offending field."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from stylize.api.options import FieldViolation, OptionsError


@dataclass(frozen=True)
class JobStatus:
    """How a job (or a call) ended when it did not succeed: a gRPC code, a message, and field violations."""

    code: grpc.StatusCode
    message: str
    violations: tuple[FieldViolation, ...] = field(default=())
    # Why, for the stylize_jobs metric's `reason` label where the code alone does not say (queue_full,
    # oom, ...); empty: the code's name, lower case.
    reason: str = ""

    @classmethod
    def invalid(cls, error: OptionsError) -> JobStatus:
        return cls(grpc.StatusCode.INVALID_ARGUMENT, str(error), tuple(error.violations))

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
        return rpc_status.to_status(detail)


async def abort(context: grpc.aio.ServicerContext, status: JobStatus) -> None:
    """End the call with `status` (raises, like context.abort)."""
    await context.abort_with_status(status.to_rpc_status())


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
        if handler is None or handler.request_deserializer is None:
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

        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def checked_unary(request, context):
                if isinstance(request, _Malformed):
                    await refuse(request, context)
                return await unary(request, context)

            return grpc.unary_unary_rpc_method_handler(
                checked_unary, tolerant_parse, handler.response_serializer
            )
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            stream = handler.unary_stream

            async def checked_stream(request, context):
                if isinstance(request, _Malformed):
                    await refuse(request, context)
                async for response in stream(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(
                checked_stream, tolerant_parse, handler.response_serializer
            )
        return handler
