"""The exceptions the client raises: one class per way a call can fail, all under StylizeError.

The server ends a failed call with a gRPC status; `error_from_rpc` turns that status into one of these
classes so callers can write `except InvalidArgument as e: e.violations` instead of inspecting status
codes. Field problems travel as google.rpc.BadRequest details (see the proto's header) and come back
as FieldViolation records with the same field paths the server uses ("options.size",
"styles[1].image"). The client raises the same InvalidArgument for problems it finds itself before
sending anything, so a caller handles both the same way.

    StylizeError               base class; `.code` is the grpc.StatusCode (None for local problems)
      InvalidArgument          bad image, option or limit; `.violations` lists every field problem
      NotFound                 no job with that id (unknown, or finished longer ago than the TTL)
      ResourceExhausted        the server's queue is full or it ran out of memory: retry later
      Unavailable              no server reachable, or the server is starting or draining
      DeadlineExceeded         the call's deadline passed (the job is cancelled with the call)
      Cancelled                the job was cancelled (by CancelJob, the caller, or server shutdown)
      JobFailed                the job failed on the server (any other status)
"""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from stylize.api.options import FieldViolation, one_line


class StylizeError(Exception):
    """Any failure of a stylize call. The message is one line."""

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


class InvalidArgument(StylizeError, ValueError):
    """The request was rejected: `violations` names each offending field."""

    def __init__(
        self,
        message: str,
        violations: list[FieldViolation] | None = None,
        *,
        code: grpc.StatusCode | None = None,
    ):
        self.violations = list(violations or [])
        details = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        if details and details not in message:
            message = f"{message}: {details}" if message else details
        super().__init__(message, code=code)

    @classmethod
    def of(cls, violations: list[FieldViolation]) -> InvalidArgument:
        """The error for violations found on the client side, before any call."""
        return cls("", violations)


class NotFound(StylizeError):
    """No job with that id: it never existed or finished longer ago than the server keeps jobs."""


class ResourceExhausted(StylizeError):
    """The server cannot take the job now (queue full, out of memory, a tenant limit): retry later or
    elsewhere. `retry_after`: the server's hint in seconds, where it gave one."""

    def __init__(
        self, message: str, *, code: grpc.StatusCode | None = None, retry_after: float | None = None
    ):
        super().__init__(message, code=code)
        self.retry_after = retry_after


class Unauthenticated(StylizeError):
    """The server wants a bearer token (token=..., $STYLIZE_TOKEN) and did not get a valid one."""


class Unavailable(StylizeError):
    """No server could be reached, or it is starting up or draining."""


class DeadlineExceeded(StylizeError):
    """The call's deadline passed before it finished."""


class Cancelled(StylizeError):
    """The job or the call was cancelled."""


class JobFailed(StylizeError):
    """The job failed on the server."""


_CLASS_BY_CODE: dict[grpc.StatusCode, type[StylizeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def _details(error: grpc.RpcError) -> list[Any]:
    """The rich status's details (google.protobuf.Any), if the error has any."""
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # rich status inconsistent with the plain one: ignore the details
        return []
    return list(status.details) if status is not None else []


def field_violations(error: grpc.RpcError) -> list[FieldViolation]:
    """The BadRequest field violations in the error's rich status, if it has any."""
    violations = []
    for detail in _details(error):
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations += [FieldViolation(v.field, v.description) for v in bad_request.field_violations]
    return violations


def retry_after(error: grpc.RpcError) -> float | None:
    """The google.rpc.RetryInfo delay in the error's rich status, in seconds, if it has one."""
    for detail in _details(error):
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToTimedelta().total_seconds())
    return None


def error_from_rpc(error: grpc.RpcError) -> StylizeError:
    """The StylizeError for a failed call (sync or grpc.aio)."""
    code: grpc.StatusCode = error.code()
    details = one_line(error.details() or code.name.lower().replace("_", " "))
    cls = _CLASS_BY_CODE.get(code, JobFailed)
    if cls is InvalidArgument:
        return InvalidArgument(details, field_violations(error), code=code)
    if cls is ResourceExhausted:
        return ResourceExhausted(details, code=code, retry_after=retry_after(error))
    return cls(details, code=code)
