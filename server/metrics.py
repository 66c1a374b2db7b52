"""Prometheus metrics: the stylize_* set, NVML GPU gauges, and go-grpc-prometheus metrics from an interceptor.

Names are a contract with deploy/ (dashboard, alerts): change them only together. Everything lives in one
CollectorRegistry per server (no module-level metric objects), so several servers can run in one process.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable, Iterable, Sequence

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from .errors import deadline_passed

log = logging.getLogger(__name__)

# Jobs run for seconds to minutes, and may wait about as long.
JOB_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)
# A job taken by an idle worker waits milliseconds: the buckets below 0.1 s tell that apart from a queue.
QUEUE_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, *JOB_SECONDS_BUCKETS)
# One optimizer iteration: milliseconds (small images on a GPU) to seconds (large ones on a CPU).
ITERATION_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# RPCs range from sub-millisecond unary calls to streams as long as a job.
RPC_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
# The `size_class` label: a job's requested long edge, at most this many pixels.
SIZE_CLASSES = (("small", 256), ("medium", 512), ("large", 1024))
LARGEST_SIZE_CLASS = "xlarge"
JOB_PHASES = ("targets", "optimize", "encode")
REJECTION_REASONS = (
    "invalid_argument",
    "queue_full",
    "queued_pixels",
    "deadline_too_short",
    "shutdown",
    "unavailable",
)


def size_class(size: int) -> str:
    return next((name for name, edge in SIZE_CLASSES if size <= edge), LARGEST_SIZE_CLASS)


class ServiceMetrics:
    """The stylize_* metrics of one server."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.jobs = Counter(
            "stylize_jobs",
            "Jobs by outcome: status (succeeded, failed, cancelled, deadline_exceeded, rejected), the reason "
            "(ok, queue_full, oom, deadline, ...) and the backbone.",
            ["status", "reason", "arch"],
            registry=registry,
        )
        # Refusals carry no arch (the request may not even parse); the alerts subtract deadline_too_short
        # from the gRPC errors, so its series must exist before the first refusal.
        for reason in REJECTION_REASONS:
            self.jobs.labels("rejected", reason, "")
        self.queue_wait = Histogram(
            "stylize_queue_wait_seconds",
            "Time from acceptance to start on a worker.",
            buckets=QUEUE_SECONDS_BUCKETS,
            registry=registry,
        )
        sized = [name for name, _ in SIZE_CLASSES] + [LARGEST_SIZE_CLASS]
        self.job_duration = Histogram(
            "stylize_job_duration_seconds",
            "Time a job ran on its worker (queue wait excluded), by requested size class.",
            ["size_class"],
            buckets=JOB_SECONDS_BUCKETS,
            registry=registry,
        )
        self.iteration = Histogram(
            "stylize_iteration_seconds",
            "Time of one optimizer iteration, by requested size class.",
            ["size_class"],
            buckets=ITERATION_SECONDS_BUCKETS,
            registry=registry,
        )
        for name in sized:
            self.job_duration.labels(name)
            self.iteration.labels(name)
        self.job_phase = Histogram(
            "stylize_job_phase_seconds",
            "A succeeded job's time by phase: targets (features of content and styles), optimize, encode.",
            ["phase"],
            buckets=JOB_SECONDS_BUCKETS,
            registry=registry,
        )
        for phase in JOB_PHASES:
            self.job_phase.labels(phase)
        self.time_to_first_progress = Histogram(
            "stylize_time_to_first_progress_seconds",
            "Time from a worker taking a job to its first progress event.",
            buckets=QUEUE_SECONDS_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "stylize_queue_depth",
            "Jobs waiting that this server's workers may take: its own (memory broker) or the fleet's.",
            registry=registry,
        )
        self.fleet_queue_depth = Gauge(
            "stylize_fleet_queue_depth",
            "Jobs waiting across the fleet (every replica on one Redis broker reports the same figure).",
            registry=registry,
        )
        self.queue_oldest_wait = Gauge(
            "stylize_queue_oldest_wait_seconds",
            "How long the oldest waiting job has waited (fleet-wide with the Redis broker).",
            registry=registry,
        )
        self.queue_capacity = Gauge(
            "stylize_queue_capacity", "Jobs that may wait before new ones are refused.", registry=registry
        )
        self.workers = Gauge("stylize_workers", "Worker threads (one per device).", registry=registry)
        self.watchers = Gauge(
            "stylize_watchers", "Streams following a job on this server.", registry=registry
        )
        self.broker_up = Gauge(
            "stylize_broker_up", "1 while the job broker answers (always 1 in memory).", registry=registry
        )
        self.in_progress = Gauge("stylize_jobs_in_progress", "Jobs running on a worker.", registry=registry)
        self.pixel_iterations = Counter(
            "stylize_pixel_iterations",
            "Output pixels times iterations done; rate() is the throughput.",
            registry=registry,
        )
        self.previews_sent = Counter(
            "stylize_previews_sent", "Preview images written to watchers.", registry=registry
        )
        self.parity_error = Gauge(
            "stylize_parity_relative_error",
            "Start-up probe: max|candidate - torch| / max|torch| per model, tapped layer and quantity.",
            ["layer", "quantity", "backend", "arch"],
            registry=registry,
        )
        self.parity_passed = Gauge(
            "stylize_parity_passed",
            "1 when the start-up parity probe of every model passed.",
            registry=registry,
        )
        self.serving = Gauge("stylize_serving", "1 while health reports SERVING.", registry=registry)
        self.build_info = Gauge(
            "stylize_build_info", "Always 1; the version label.", ["version"], registry=registry
        )
        self.model_info = Gauge(
            "stylize_model_info",
            "Always 1, a series per model served: arch, weights kind, ONNX Runtime providers, torch device.",
            ["arch", "weights", "providers", "device"],
            registry=registry,
        )
        self.device_info = Gauge(
            "stylize_device_info",
            "Always 1, a series per worker device: what precision AUTO resolved to there.",
            ["device", "auto_precision"],
            registry=registry,
        )
        self.job_precision = Counter(
            "stylize_job_precision",
            "Jobs started, by device and the precision their network really ran in.",
            ["device", "precision"],
            registry=registry,
        )


class NvmlCollector(Collector):
    """GPU memory and utilization from NVML; yields nothing (no series at all) where NVML sees no GPU."""

    def __init__(self) -> None:
        self._nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            if pynvml.nvmlDeviceGetCount() > 0:
                self._nvml = pynvml
        except Exception as error:  # no driver, no library, no device: all mean "no GPU gauges"
            log.debug("NVML unavailable, no GPU metrics: %s", error)

    @property
    def active(self) -> bool:
        return self._nvml is not None

    def collect(self) -> Iterable[GaugeMetricFamily]:
        if self._nvml is None:
            return []
        nvml = self._nvml
        used = GaugeMetricFamily("stylize_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"])
        total = GaugeMetricFamily("stylize_gpu_memory_total_bytes", "GPU memory installed.", labels=["gpu"])
        utilization = GaugeMetricFamily(
            "stylize_gpu_utilization_ratio",
            "Fraction of time the GPU was busy (NVML sample).",
            labels=["gpu"],
        )
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                used.add_metric([str(index)], float(memory.used))
                total.add_metric([str(index)], float(memory.total))
                utilization.add_metric([str(index)], nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
        except Exception as error:  # a scrape must never fail because of the GPU
            log.warning("NVML query failed: %s", error)
            return []
        return [used, total, utilization]


def new_registry() -> CollectorRegistry:
    """A registry with the process, platform and GC collectors that the default registry would have."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    nvml = NvmlCollector()
    if nvml.active:
        registry.register(nvml)
    return registry


# The /metrics endpoint on the event loop: no thread per connection (an idle one costs a socket and a
# coroutine), at most this many open at once (more are closed at once), each with this long to send its
# request head of at most this many bytes.
MAX_METRICS_CONNECTIONS = 128
METRICS_REQUEST_SECONDS = 5.0
MAX_METRICS_REQUEST_BYTES = 8192


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


class MetricsEndpoint:
    """GET /metrics (HEAD too) and nothing else: other paths get 404, other methods 405."""

    def __init__(self, registry: CollectorRegistry):
        self._registry = registry
        self._open = 0

    def answer(self, head: bytes) -> bytes:
        method, _, rest = head.partition(b" ")
        target = rest.partition(b" ")[0].partition(b"?")[0]
        if method not in (b"GET", b"HEAD"):
            return _response("405 Method Not Allowed", b"only GET /metrics\n")
        if target != b"/metrics":
            return _response("404 Not Found", b"only /metrics\n")
        body = generate_latest(self._registry)
        response = _response("200 OK", body, CONTENT_TYPE_LATEST)
        return response[: len(response) - len(body)] if method == b"HEAD" else response

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= MAX_METRICS_CONNECTIONS:
            writer.close()
            return
        self._open += 1
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), METRICS_REQUEST_SECONDS)
            writer.write(self.answer(head))
            await asyncio.wait_for(writer.drain(), METRICS_REQUEST_SECONDS)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a slow, oversized or vanished client: drop the connection
        finally:
            self._open -= 1
            writer.close()


async def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> asyncio.Server:
    """Serve /metrics on the running loop; the bound port is `server.sockets[0].getsockname()[1]`."""
    endpoint = MetricsEndpoint(registry)
    return await asyncio.start_server(endpoint.handle, host, port, limit=MAX_METRICS_REQUEST_BYTES)


# ---------------------------------------------------------------- gRPC (go-grpc-prometheus names)

# go-grpc-prometheus labels codes with Go's codes.Code.String().
_GO_CODE_NAMES = {grpc.StatusCode.OK: "OK", grpc.StatusCode.CANCELLED: "Canceled"}


def go_code_name(code: grpc.StatusCode) -> str:
    return _GO_CODE_NAMES.get(code) or "".join(part.capitalize() for part in code.name.split("_"))


class GrpcMetrics:
    def __init__(self, registry: CollectorRegistry):
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter(
            "grpc_server_started", "RPCs started on the server.", labels, registry=registry
        )
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, regardless of success or failure.",
            [*labels, "grpc_code"],
            registry=registry,
        )
        self.received = Counter(
            "grpc_server_msg_received",
            "RPC stream messages received on the server.",
            labels,
            registry=registry,
        )
        self.sent = Counter(
            "grpc_server_msg_sent", "gRPC stream messages sent by the server.", labels, registry=registry
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Response latency (seconds) of gRPC that had been application-level handled by the server.",
            labels,
            buckets=RPC_SECONDS_BUCKETS,
            registry=registry,
        )


class _CallRecorder:
    """Counts one RPC; `finish` works out its final code from the exception and the context."""

    def __init__(self, metrics: GrpcMetrics, labels: Sequence[str]):
        self._metrics = metrics
        self._labels = labels
        self._start = time.perf_counter()
        metrics.started.labels(*labels).inc()

    def received(self) -> None:
        self._metrics.received.labels(*self._labels).inc()

    def sent(self) -> None:
        self._metrics.sent.labels(*self._labels).inc()

    def finish(self, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
        code = context.code()
        if code is None:
            if error is None:
                code = grpc.StatusCode.OK
            elif isinstance(error, asyncio.CancelledError):
                # The caller cancelled, disconnected or ran out of time: the handler only sees cancellation,
                # and the deadline tells the last apart.
                code = (
                    grpc.StatusCode.DEADLINE_EXCEEDED
                    if deadline_passed(context)
                    else grpc.StatusCode.CANCELLED
                )
            else:
                code = grpc.StatusCode.UNKNOWN
        if isinstance(code, int):  # aio contexts may hold the raw cygrpc integer
            code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
        self._metrics.handled.labels(*self._labels, go_code_name(code)).inc()
        self._metrics.handling.labels(*self._labels).observe(time.perf_counter() - self._start)


def _wrap_unary(behavior: Callable, metrics: GrpcMetrics, labels: Sequence[str]) -> Callable:
    async def wrapped(request, context):
        call = _CallRecorder(metrics, labels)
        call.received()
        error: BaseException | None = None
        try:
            response = await behavior(request, context)
            call.sent()
            return response
        except BaseException as caught:
            error = caught
            raise
        finally:
            call.finish(context, error)

    return wrapped


def _wrap_server_stream(behavior: Callable, metrics: GrpcMetrics, labels: Sequence[str]) -> Callable:
    if not inspect.isasyncgenfunction(behavior):

        async def wrapped_writer(request, context):  # a handler that writes with context.write()
            call = _CallRecorder(metrics, labels)
            call.received()
            error: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as caught:
                error = caught
                raise
            finally:
                call.finish(context, error)

        return wrapped_writer

    async def wrapped(request, context):
        call = _CallRecorder(metrics, labels)
        call.received()
        error: BaseException | None = None
        try:
            async for response in behavior(request, context):
                call.sent()
                yield response
        except BaseException as caught:
            error = caught
            raise
        finally:
            call.finish(context, error)

    return wrapped


class GrpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """grpc_server_* metrics for unary and server-streaming RPCs (the only kinds this server has; other
    kinds pass through uncounted)."""

    def __init__(self, registry: CollectorRegistry):
        self._metrics = GrpcMetrics(registry)

    def initialize(self, services: Iterable[ServiceDescriptor]) -> None:
        """Create every method's series at zero, every code included (go-grpc-prometheus's
        InitializeMetrics), so rates and ratios exist before the first call."""
        for service in services:
            for method in service.methods:
                if method.client_streaming:
                    continue
                kind = "server_stream" if method.server_streaming else "unary"
                labels = (kind, service.full_name, method.name)
                for counter in (self._metrics.started, self._metrics.received, self._metrics.sent):
                    counter.labels(*labels)
                self._metrics.handling.labels(*labels)
                for code in grpc.StatusCode:
                    self._metrics.handled.labels(*labels, go_code_name(code))

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        if handler.unary_unary is not None:
            behavior = _wrap_unary(handler.unary_unary, self._metrics, ("unary", service, method))
            return grpc.unary_unary_rpc_method_handler(
                behavior, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            behavior = _wrap_server_stream(
                handler.unary_stream, self._metrics, ("server_stream", service, method)
            )
            return grpc.unary_stream_rpc_method_handler(
                behavior, handler.request_deserializer, handler.response_serializer
            )
        return handler
