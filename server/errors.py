"""gRPC statuses for failures, with google.rpc.BadRequest details naming each offending field."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from stylize.server.engine.options import FieldViolation, OptionsError


@dataclass(frozen=True)
class JobStatus:
    """How a job (or a call) ended when it did not succeed: a gRPC code, a message, and field violations."""

    code: grpc.StatusCode
    message: str
    violations: tuple[FieldViolation, ...] = field(default=())

    @classmethod
    def invalid(cls, error: OptionsError) -> JobStatus:
        return cls(grpc.StatusCode.INVALID_ARGUMENT, str(error), tuple(error.violations))

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


def field_violations(error: grpc.RpcError) -> list[FieldViolation]:
    """The BadRequest field violations of a failed call (client side; used by tests and tools)."""
    status = rpc_status.from_call(error)
    if status is None:
        return []
    violations: list[FieldViolation] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations += [FieldViolation(v.field, v.description) for v in bad_request.field_violations]
    return violations
