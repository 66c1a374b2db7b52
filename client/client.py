"""StylizeClient (blocking) and AsyncStylizeClient (asyncio): the stylize API for Python callers.

    with StylizeClient("127.0.0.1:50051") as client:
        for event in client.stylize("photo.jpg", ["starry.jpg"], size=512, preview_every=20):
            ...  # Queued, Started, Progress (losses, preview), Completed (final image)

Each client holds one gRPC channel (one server, a list of servers, or a dns:/// name: see
stylize.client.channel) and is closed by its context manager or `close()`.

Deadlines: `timeout` on the constructor is the default deadline of a job stream (Stylize, WatchJob;
None: none, jobs can be long); `call_timeout` that of the quick calls (SubmitJob, CancelJob,
GetServerInfo). Every method takes `timeout=` to override it for one call. A Stylize call whose
deadline passes is cancelled on the server, and so is its job.

Calls fail fast with Unavailable when no server is reachable (after the UNAVAILABLE retries of the
service config), unless the client was made with `wait_for_ready=True`, in which case they wait for a
server up to their deadline.

Failures raise the exceptions in stylize.client.errors, never grpc.RpcError.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from stylize.api.options import FieldViolation
from stylize.client.channel import channel_options, default_token, resolve_target
from stylize.client.errors import Cancelled, InvalidArgument, JobFailed, error_from_rpc
from stylize.client.events import Completed, Event, JobState, event_from_proto
from stylize.client.info import ServerInfo
from stylize.client.request import ImageSource, StyleSource, build_request
from stylize.v1 import stylize_pb2, stylize_pb2_grpc

DEFAULT_CALL_TIMEOUT = 30.0
_Response = TypeVar("_Response")


@dataclass(frozen=True)
class Submission:
    """A queued job: follow it with watch(job_id), stop it with cancel(job_id)."""

    job_id: str
    queue_position: int
    # Lets another caller (of any tenant) watch, not cancel, the job: watch(job_id, watch_token=...).
    watch_token: str = ""


def _job_request(job_id: str) -> str:
    if not job_id:
        raise InvalidArgument.of([FieldViolation("job_id", "is required")])
    return job_id


def _ended_without_result() -> JobFailed:
    return JobFailed("the job's stream ended without a result")


class _ClientBase:
    def __init__(
        self,
        target: str | Sequence[str] | None = None,
        *,
        timeout: float | None = None,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        wait_for_ready: bool = False,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        server_name: str | None = None,
    ):
        """`credentials`: TLS (see tls_credentials); None: plaintext. `token`: the bearer token sent with
        every call (default $STYLIZE_TOKEN). `server_name`: the name to expect in the server's
        certificate where it differs from the target's host."""
        self.target = resolve_target(target)
        self.timeout = timeout
        self.call_timeout = call_timeout
        self.wait_for_ready = wait_for_ready
        self._credentials = credentials
        self._options = channel_options(server_name)
        token = default_token() if token is None else token
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def _call_args(self, timeout: float | None, default: float | None) -> dict[str, Any]:
        return {
            "timeout": default if timeout is None else timeout,
            "wait_for_ready": self.wait_for_ready,
            "metadata": self._metadata,
        }

    def _job_args(self, timeout: float | None) -> dict[str, Any]:
        return self._call_args(timeout, self.timeout)

    def _quick_args(self, timeout: float | None) -> dict[str, Any]:
        return self._call_args(timeout, self.call_timeout)


class EventStream:
    """The events of one job, in order, as they arrive. Iterate it once.

    Stopping early (break, an exception, close() or leaving its `with` block) cancels the call:
    for Stylize that cancels the job, for WatchJob it only stops watching. `cancel()` may be called
    from another thread; the iterating thread then gets Cancelled.
    """

    def __init__(self, call: Any):
        self._call = call
        self.job_id: str | None = None
        self._events = self._iterate()

    def _iterate(self) -> Generator[Event, None, None]:
        try:
            for message in self._call:
                event = event_from_proto(message)
                if event is not None:
                    self.job_id = event.job_id
                    yield event
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        finally:
            self._call.cancel()  # a no-op once the call has finished

    def __iter__(self) -> Iterator[Event]:
        return self._events

    def __next__(self) -> Event:
        return next(self._events)

    def cancel(self) -> None:
        self._call.cancel()

    def close(self) -> None:
        self._events.close()

    def result(self) -> Completed:
        """Wait for the end of the job and return its Completed event."""
        for event in self:
            if isinstance(event, Completed):
                return event
        raise _ended_without_result()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class StylizeClient(_ClientBase):
    """Blocking client over one channel. See the module docstring for targets and deadlines."""

    def __init__(self, target: str | Sequence[str] | None = None, **settings: Any):
        super().__init__(target, **settings)
        if self._credentials is None:
            self._channel = grpc.insecure_channel(self.target, options=self._options)
        else:
            self._channel = grpc.secure_channel(self.target, self._credentials, options=self._options)
        self._stub = stylize_pb2_grpc.StyleTransferStub(self._channel)

    def stylize(
        self,
        content: ImageSource,
        styles: Sequence[StyleSource] | ImageSource,
        *,
        timeout: float | None = None,
        **settings: Any,
    ) -> EventStream:
        """Run one job and stream its events.

        `content`, and each style: a path, encoded bytes or a PIL image; a style may be an
        (image, weight) pair. `settings`: engine options by name (size=512, style_weight=1e4,
        style_layers=["relu1_1", "relu2_1:0.5"], optimizer="adam", ...), preset, preview_every,
        preview_max_size, preview_format, preview_quality, output_format, client_tag. Unset
        options take the preset's values (preset="fast-preview", ...), or without one the server's
        defaults. Bad input raises InvalidArgument before anything is sent.
        """
        request = build_request(content, styles, **settings)
        return EventStream(self._stub.Stylize(request, **self._job_args(timeout)))

    def submit(
        self,
        content: ImageSource,
        styles: Sequence[StyleSource] | ImageSource,
        *,
        timeout: float | None = None,
        **settings: Any,
    ) -> Submission:
        """Queue a job (same arguments as stylize) and return its id at once."""
        request = build_request(content, styles, **settings)
        response = self._unary(self._stub.SubmitJob, request, timeout)
        return Submission(response.job_id, response.queue_position, response.watch_token)

    def watch(self, job_id: str, *, watch_token: str = "", timeout: float | None = None) -> EventStream:
        """Follow a job from its current state (a late watcher first gets the latest progress). Another
        tenant's job needs its watch token (Submission.watch_token)."""
        request = stylize_pb2.WatchJobRequest(job_id=_job_request(job_id), watch_token=watch_token)
        return EventStream(self._stub.WatchJob(request, **self._job_args(timeout)))

    def cancel(self, job_id: str, *, timeout: float | None = None) -> JobState | None:
        """Cancel a queued or running job; returns its state afterwards. Idempotent."""
        request = stylize_pb2.CancelJobRequest(job_id=_job_request(job_id))
        return JobState.from_proto(self._unary(self._stub.CancelJob, request, timeout).state)

    def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        response = self._unary(self._stub.GetServerInfo, stylize_pb2.GetServerInfoRequest(), timeout)
        return ServerInfo.from_proto(response)

    def _unary(self, method: Callable[..., _Response], request: object, timeout: float | None) -> _Response:
        try:
            return method(request, **self._quick_args(timeout))
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> StylizeClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncEventStream:
    """The events of one job for `async for`. Same rules as EventStream."""

    def __init__(self, call: Any):
        self._call = call
        self._cancelled_here = False
        self.job_id: str | None = None
        self._events = self._iterate()

    async def _iterate(self) -> AsyncGenerator[Event, None]:
        try:
            async for message in self._call:
                event = event_from_proto(message)
                if event is not None:
                    self.job_id = event.job_id
                    yield event
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        except asyncio.CancelledError:
            # grpc.aio reports a call cancelled through this stream as a cancelled read; a task
            # that is itself being cancelled must still see CancelledError.
            if self._cancelled_here and not _current_task_cancelling():
                raise Cancelled("cancelled by the caller", code=grpc.StatusCode.CANCELLED) from None
            raise
        finally:
            self._call.cancel()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events

    async def __anext__(self) -> Event:
        return await anext(self._events)

    def cancel(self) -> None:
        self._cancelled_here = True
        self._call.cancel()

    async def aclose(self) -> None:
        await self._events.aclose()

    async def result(self) -> Completed:
        async for event in self:
            if isinstance(event, Completed):
                return event
        raise _ended_without_result()

    async def __aenter__(self) -> AsyncEventStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class AsyncStylizeClient(_ClientBase):
    """asyncio client over one grpc.aio channel; create it inside a running event loop."""

    def __init__(self, target: str | Sequence[str] | None = None, **settings: Any):
        super().__init__(target, **settings)
        if self._credentials is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
        else:
            self._channel = grpc.aio.secure_channel(self.target, self._credentials, options=self._options)
        self._stub = stylize_pb2_grpc.StyleTransferStub(self._channel)

    def stylize(
        self,
        content: ImageSource,
        styles: Sequence[StyleSource] | ImageSource,
        *,
        timeout: float | None = None,
        **settings: Any,
    ) -> AsyncEventStream:
        """Run one job and stream its events (`async for`); arguments as StylizeClient.stylize."""
        request = build_request(content, styles, **settings)
        return AsyncEventStream(self._stub.Stylize(request, **self._job_args(timeout)))

    async def submit(
        self,
        content: ImageSource,
        styles: Sequence[StyleSource] | ImageSource,
        *,
        timeout: float | None = None,
        **settings: Any,
    ) -> Submission:
        request = build_request(content, styles, **settings)
        response = await self._unary(self._stub.SubmitJob, request, timeout)
        return Submission(response.job_id, response.queue_position, response.watch_token)

    def watch(self, job_id: str, *, watch_token: str = "", timeout: float | None = None) -> AsyncEventStream:
        request = stylize_pb2.WatchJobRequest(job_id=_job_request(job_id), watch_token=watch_token)
        return AsyncEventStream(self._stub.WatchJob(request, **self._job_args(timeout)))

    async def cancel(self, job_id: str, *, timeout: float | None = None) -> JobState | None:
        request = stylize_pb2.CancelJobRequest(job_id=_job_request(job_id))
        return JobState.from_proto((await self._unary(self._stub.CancelJob, request, timeout)).state)

    async def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        request = stylize_pb2.GetServerInfoRequest()
        return ServerInfo.from_proto(await self._unary(self._stub.GetServerInfo, request, timeout))

    async def _unary(self, method: Callable[..., Any], request: object, timeout: float | None) -> Any:
        try:
            return await method(request, **self._quick_args(timeout))
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncStylizeClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
