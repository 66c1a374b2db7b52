"""`stylize-server`: start-up, serving, and graceful shutdown.

Order of start-up: the gRPC port and /metrics come up first with health NOT_SERVING (so orchestrators
can probe a loading server), then the artifact, torch extractors, ONNX Runtime session and parity probe
load on a thread; only a passed probe (or --on-parity-failure=torch) turns health SERVING, for the
overall service "" and for "stylize.v1.StyleTransfer". The line
    listening on HOST:PORT metrics on :MPORT
is printed to stdout once both ports are bound (tests and scripts read the ports chosen with 0 from it).

Shutdown on SIGTERM/SIGINT: health NOT_SERVING at once; new jobs get UNAVAILABLE "server shutting down";
queued and running jobs get --grace-seconds to finish (a second signal ends the grace period at once), then
are cancelled and their streams end with UNAVAILABLE "server shutting down"; exit code 0. Start-up errors
print one line to stderr, exit code 2.

Keepalive (clients should match): the server pings an idle connection every 30 s and drops it when the
ping is not answered within 10 s; clients may ping as often as every 10 s, also with no call in flight
(more often counts as a strike; two strikes close the connection with GOAWAY "too_many_pings").
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from stylize.api import __version__
from stylize.v1 import stylize_pb2, stylize_pb2_grpc

from .auth import Authenticator, AuthInterceptor, TokenFile, TokenFileError
from .broker import Broker
from .broker.memory import MemoryBroker
from .broker.redis import RedisBroker
from .config import MEMORY_BROKER, ServerConfig, parse_config
from .errors import InternalErrorInterceptor, MalformedRequestInterceptor
from .jobs import JobManager
from .metrics import GrpcMetricsInterceptor, ServiceMetrics, new_registry, serve_metrics
from .runtime import Runtime, StartupError
from .service import StyleTransferService
from .tls import ReloadingCredentials, TlsError, TlsFiles

log = logging.getLogger("stylize.server")

SERVICE_NAME = stylize_pb2.DESCRIPTOR.services_by_name["StyleTransfer"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# --auth-exempt's names.
EXEMPTABLE = {"health": HEALTH_SERVICE_NAME, "reflection": reflection.SERVICE_NAME}
HEALTH_SERVICES = ("", SERVICE_NAME)
# How often health looks at the broker's reachability.
HEALTH_POLL_SECONDS = 0.5
# Time streams get after the jobs ended to deliver their final status before connections close.
STOP_GRACE_SECONDS = 5.0
KEEPALIVE_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Clients ping every 30 s (stylize.client.channel); a ping sooner than this apart is a strike, and two
    # strikes end the connection with GOAWAY too_many_pings. (gRPC core's name for this setting is
    # GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS; its key is the string below.)
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 2),
)


@dataclass
class _Started:
    """What start-up produced; None until it finished (the servicer answers UNAVAILABLE meanwhile)."""

    runtime: Runtime | None = None
    manager: JobManager | None = None


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    # No grpc.max_connection_age_grace_ms: its default (infinite) lets a stream running at GOAWAY finish.
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_connection_age_ms", round(config.max_connection_age * 1000)),
        *KEEPALIVE_OPTIONS,
    ]


def open_broker(config: ServerConfig, loop: asyncio.AbstractEventLoop) -> Broker:
    if config.broker == MEMORY_BROKER:
        return MemoryBroker(max_queue=config.max_queue, finished_job_ttl=config.finished_job_ttl, loop=loop)
    return RedisBroker(
        config.broker,
        loop=loop,
        limits=config.limits,
        max_queue=config.max_queue,
        finished_job_ttl=config.finished_job_ttl,
        lease_seconds=config.lease_seconds,
        max_attempts=config.max_attempts,
    )


async def _follow_health(
    health_servicer: health.aio.HealthServicer,
    metrics: ServiceMetrics,
    runtime: Runtime,
    manager: JobManager,
) -> None:
    """Health, polled until draining: the overall service "" (liveness) is SERVING while the model passed
    its probe; "stylize.v1.StyleTransfer" (readiness) also needs the broker to answer. A Redis outage thus
    takes the pods out of the Service without restarting them (their running jobs go on), and they serve
    again when it is back."""
    serving: tuple[bool, bool] | None = None
    while not manager.draining:
        up = manager.broker.available
        metrics.broker_up.set(1 if up else 0)
        now = (runtime.ready, runtime.ready and up)
        if now != serving:
            if serving is not None:
                log.warning(
                    "%s: broker %s", "SERVING again" if now[1] else "NOT_SERVING", manager.broker.name
                )
            serving = now
            for name, status in zip(HEALTH_SERVICES, now, strict=True):
                await health_servicer.set(name, _health_status(status))
            metrics.serving.set(1 if now[1] else 0)
        await asyncio.sleep(HEALTH_POLL_SECONDS)


def _authenticator(config: ServerConfig) -> Authenticator:
    try:
        tokens = TokenFile(config.token_file) if config.token_file is not None else None
    except TokenFileError as error:
        raise StartupError(str(error)) from None
    return Authenticator(tokens, tenant_from_client_cert=config.tenant_from_client_cert)


async def _serve_health(
    config: ServerConfig, health_servicer: health.aio.HealthServicer
) -> grpc.aio.Server | None:
    """The plaintext health-only port (--health-port), or None."""
    if config.health_port is None:
        return None
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        port = server.add_insecure_port(f"{config.host}:{config.health_port}")
    except RuntimeError as error:
        raise StartupError(f"cannot listen on {config.host}:{config.health_port}: {error}") from None
    await server.start()
    log.info("health (plaintext, health service only) on %s:%d", config.host, port)
    return server


def _health_status(serving: bool) -> int:
    return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING


def _record_runtime(metrics: ServiceMetrics, runtime: Runtime) -> None:
    devices = ",".join(dict.fromkeys(str(device) for device in runtime.devices))
    for arch, model in runtime.models.items():
        for row in model.parity.rows:
            metrics.parity_error.labels(row.layer, row.quantity, model.parity.candidate, arch).set(
                row.relative_error
            )
        metrics.model_info.labels(arch, model.manifest.weights, ",".join(model.providers), devices).set(1)
    for device, choice in runtime.auto_precision.items():
        metrics.device_info.labels(device, choice.precision).set(1)
    metrics.parity_passed.set(1 if all(model.parity.passed for model in runtime.models.values()) else 0)


async def _set_health(servicer: health.aio.HealthServicer, status: int) -> None:
    for name in HEALTH_SERVICES:
        await servicer.set(name, status)


async def serve(config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code. Raises StartupError for a server that cannot start."""
    began = time.monotonic()
    if not config.model_dir.is_dir():
        raise StartupError(f"--model-dir {config.model_dir}: no such directory")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    registry = new_registry()
    metrics = ServiceMetrics(registry)
    metrics.build_info.labels(__version__).set(1)
    started = _Started()
    health_servicer = health.aio.HealthServicer()
    authenticator = _authenticator(config)
    exempt = {EXEMPTABLE[name] for name in config.auth_exempt}
    # Outermost first: metrics count every call, refused ones included; an unexpected exception becomes
    # INTERNAL with a request id; the caller is authenticated before a request is looked at.
    grpc_metrics = GrpcMetricsInterceptor(registry)
    grpc_metrics.initialize(
        (
            stylize_pb2.DESCRIPTOR.services_by_name["StyleTransfer"],
            health_pb2.DESCRIPTOR.services_by_name["Health"],
        )
    )
    server = grpc.aio.server(
        interceptors=[
            grpc_metrics,
            InternalErrorInterceptor(),
            AuthInterceptor(authenticator, exempt),
            MalformedRequestInterceptor(),
        ],
        options=server_options(config),
    )
    stylize_pb2_grpc.add_StyleTransferServicer_to_server(
        StyleTransferService(config, metrics, lambda: started.runtime, lambda: started.manager), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection == "on" or (config.reflection == "auto" and config.token_file is None):
        reflection.enable_server_reflection(
            (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server
        )
    if authenticator.open:
        log.warning(
            "OPEN SERVER: no --token-file, so anyone who reaches %s:%s may submit, watch and cancel any "
            "job (README: Securing a deployment)",
            config.host,
            config.port,
        )
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    address = f"{config.host}:{config.port}"
    try:
        if config.tls_cert is not None and config.tls_key is not None:
            files = TlsFiles(config.tls_cert, config.tls_key, config.tls_client_ca)
            port = server.add_secure_port(address, ReloadingCredentials(files).credentials)
        else:
            port = server.add_insecure_port(address)
    except TlsError as error:
        raise StartupError(str(error)) from None
    except RuntimeError as error:
        raise StartupError(f"cannot listen on {address}: {error}") from None
    health_server = await _serve_health(config, health_servicer)
    metrics_host = config.metrics_host or config.host
    try:
        metrics_server = await serve_metrics(registry, metrics_host, config.metrics_port)
    except OSError as error:
        raise StartupError(f"cannot serve metrics on {metrics_host}:{config.metrics_port}: {error}") from None
    metrics_port = metrics_server.sockets[0].getsockname()[1]
    await server.start()
    print(f"listening on {config.host}:{port} metrics on :{metrics_port}", flush=True)

    try:
        loading = asyncio.ensure_future(asyncio.to_thread(Runtime, config))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait((loading, stopped), return_when=asyncio.FIRST_COMPLETED)
        if not loading.done():
            log.info("signal received during start-up; exiting")
            return 0
        runtime = loading.result()
        broker = open_broker(config, loop)
        await broker.start()
        manager = JobManager(runtime, metrics, broker, workers=config.workers)
        manager.start()
        started.runtime, started.manager = runtime, manager
        _record_runtime(metrics, runtime)
        ready_seconds = time.monotonic() - began
        health_task = asyncio.ensure_future(_follow_health(health_servicer, metrics, runtime, manager))
        if runtime.ready:
            log.info(
                "SERVING after %.2f s: device %s; %s",
                ready_seconds,
                ", ".join(dict.fromkeys(map(str, runtime.devices))),
                "; ".join(
                    f"{arch}: ONNX Runtime {', '.join(model.providers)}, targets from "
                    f"{model.parity.targets_backend}, {model.manifest.weights} weights"
                    for arch, model in runtime.models.items()
                ),
            )
        else:
            log.error("NOT_SERVING after %.2f s: the parity probe failed (table above)", ready_seconds)

        await stopped
        stop.clear()
        log.info("shutting down: NOT_SERVING, draining jobs for up to %.0f s", config.grace_seconds)
        health_task.cancel()
        metrics.serving.set(0)
        await health_servicer.enter_graceful_shutdown()
        draining = asyncio.ensure_future(manager.drain(config.grace_seconds))
        again = asyncio.ensure_future(stop.wait())
        await asyncio.wait((draining, again), return_when=asyncio.FIRST_COMPLETED)
        if not draining.done():
            log.warning("second signal: cancelling the remaining jobs now")
            manager.end_grace()
            await draining
        again.cancel()
        await broker.close()
        return 0
    finally:
        await server.stop(STOP_GRACE_SECONDS)
        if health_server is not None:
            await health_server.stop(0)
        metrics_server.close()


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return asyncio.run(serve(config))
    except StartupError as error:
        print(f"stylize-server: error: {error}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
