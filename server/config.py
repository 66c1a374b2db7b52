"""The server's configuration: command-line flags, each with a matching STYLIZE_* environment variable.

Precedence: a flag on the command line beats its environment variable, which beats the default.
The engine's limits take their defaults from stylize.api.options.Limits (defined once).
"""

from __future__ import annotations

import argparse
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from stylize.api.options import DEFAULT_LIMITS, HARD_MAX_SIZE, Limits
from stylize.api.wire import DEFAULT_PORT, MAX_MESSAGE_BYTES

ENV_PREFIX = "STYLIZE_"
# 9090 is Prometheus's own port; 9464 is the port OpenTelemetry's Prometheus exporter uses by convention.
DEFAULT_METRICS_PORT = 9464
PROVIDER_CHOICES = ("tensorrt", "cuda", "cpu")
MEMORY_BROKER = "memory"
AUTH_EXEMPT_CHOICES = ("health", "reflection")
# How an environment variable spells an on/off flag.
BOOLEANS = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}
# A job's worker renews its lease well within this; a job whose lease is this old is run elsewhere.
DEFAULT_LEASE_SECONDS = 15.0
DEFAULT_MAX_ATTEMPTS = 3
# Connections older than this get GOAWAY (clients re-resolve and reach pods added since); running streams
# are never cut: there is no grace limit, a stream finishes on its old connection.
DEFAULT_MAX_CONNECTION_AGE_SECONDS = 300.0


@dataclass(frozen=True)
class ServerConfig:
    model_dir: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    metrics_port: int = DEFAULT_METRICS_PORT
    workers: int = 1
    # torch's intra-op threads (process-wide, shared by the workers); 0: the usable cores / workers.
    threads: int = 0
    max_queue: int = 16
    # Decoded input pixels that requests being decoded and jobs waiting in this process (the memory broker
    # queues decoded images) may hold together: about 1.6 GB at PIL's 4 bytes per RGB pixel, so that a full
    # queue of the largest requests (9 x 40 Mpx each, 16 deep: 5.8 Gpx) cannot exhaust memory (README, The
    # server: memory).
    max_queued_pixels: int = 400_000_000
    device: str = "auto"
    # "auto", or an ordered subset of PROVIDER_CHOICES.
    providers: tuple[str, ...] = ("auto",)
    trt_cache_dir: Path | None = None
    grace_seconds: float = 30.0
    on_parity_failure: str = "fail"
    parity_tolerance: float = 1e-3
    # The state_dict_sha256 digests a served model's weights must have; empty: any.
    expect_weights_sha256: tuple[str, ...] = ()
    finished_job_ttl: float = 300.0
    broker: str = MEMORY_BROKER
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_connection_age: float = DEFAULT_MAX_CONNECTION_AGE_SECONDS
    max_message_bytes: int = MAX_MESSAGE_BYTES
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # A plaintext port serving only the health service (Kubernetes' gRPC probes); None: none.
    health_port: int | None = None
    token_file: Path | None = None
    tenant_from_client_cert: bool = False
    # Services reachable without a token: "health", "reflection".
    auth_exempt: tuple[str, ...] = ("health",)
    reflection: str = "auto"
    metrics_host: str | None = None
    limits: Limits = field(default_factory=lambda: DEFAULT_LIMITS)
    log_level: str = "INFO"


_FIELDS = {field.name: field for field in fields(ServerConfig)}


def _default(name: str) -> object:
    """ServerConfig's default for `name` as its flag takes it: the one place a default is defined. A tuple
    is comma-joined, so the flag's type parses it like a command-line value."""
    value = _FIELDS[name].default
    return ",".join(value) if isinstance(value, tuple) else value


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _edge(text: str) -> int:
    value = _positive_int(text)
    if value > HARD_MAX_SIZE:
        raise argparse.ArgumentTypeError(f"must be at most {HARD_MAX_SIZE}, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port 0..65535 (0 picks a free one), got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _providers(text: str) -> tuple[str, ...]:
    names = tuple(name.strip().lower() for name in text.split(",") if name.strip())
    if names == ("auto",):
        return names
    unknown = [name for name in names if name not in PROVIDER_CHOICES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected 'auto' or a comma-separated list of {','.join(PROVIDER_CHOICES)}, got {text!r}"
        )
    return names


def _digests(text: str) -> tuple[str, ...]:
    digests = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    bad = [d for d in digests if len(d) != 64 or any(c not in "0123456789abcdef" for c in d)]
    if bad:
        raise argparse.ArgumentTypeError(f"expected sha256 hex digests, comma-separated, got {bad[0][:70]!r}")
    return digests


def _broker(text: str) -> str:
    if text == MEMORY_BROKER:
        return text
    parts = urllib.parse.urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        port = None
    path = parts.path.lstrip("/")
    if parts.scheme != "redis" or not parts.hostname or port is None or not (path == "" or path.isdigit()):
        expected = f"expected {MEMORY_BROKER} or redis://HOST:PORT/DB"
        raise argparse.ArgumentTypeError(f"{expected}, got {text[:80]!r}")
    return text


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _exempt(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in AUTH_EXEMPT_CHOICES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of health,reflection, got {text!r}"
        )
    return names


def _device(text: str) -> str:
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stylize-server",
        description="Neural style transfer as a streaming gRPC service (stylize.v1.StyleTransfer). "
        f"Every flag can also be set by an environment variable {ENV_PREFIX}<FLAG> "
        f"(for example --max-queue as {ENV_PREFIX}MAX_QUEUE); a flag beats its variable.",
        formatter_class=_DefaultsHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--model-dir",
        type=Path,
        help="directory holding vgg19.onnx + vgg19.json and/or vgg16.onnx + vgg16.json from stylize-export "
        "(required; every artifact in it is served)",
    )
    add("--host", default=_default("host"), help="address to listen on (0.0.0.0 or [::] in a container)")
    add(
        "--port",
        type=_port,
        default=_default("port"),
        help="gRPC port; 0 picks a free one (printed at start-up)",
    )
    add(
        "--metrics-port",
        type=_port,
        default=_default("metrics_port"),
        help="Prometheus /metrics port (9090 is Prometheus's own); 0 picks a free one",
    )
    add(
        "--workers",
        type=_positive_int,
        default=_default("workers"),
        help="worker threads, one per device (cuda:0..N-1 on GPUs)",
    )
    add(
        "--threads",
        type=_non_negative_int,
        default=_default("threads"),
        help="torch intra-op threads per worker; 0 = the usable CPU cores divided by --workers",
    )
    add(
        "--max-queue",
        type=_positive_int,
        default=_default("max_queue"),
        help="jobs that may wait (with the redis broker: across the fleet); more get RESOURCE_EXHAUSTED",
    )
    add(
        "--max-queued-pixels",
        type=_positive_int,
        default=_default("max_queued_pixels"),
        help="decoded input pixels (width*height, from the headers) that requests being decoded and jobs "
        "waiting in this process may hold together; a request that would go over gets RESOURCE_EXHAUSTED "
        "at once (one alone is always admitted). The redis broker queues encoded requests",
    )
    add(
        "--device",
        type=_device,
        default=_default("device"),
        help="torch device: auto (cuda if present), cpu, cuda, cuda:N",
    )
    add(
        "--providers",
        type=_providers,
        default=_default("providers"),
        help="ONNX Runtime execution providers in order, e.g. tensorrt,cuda,cpu; auto = tensorrt,cuda,cpu "
        "with a GPU, cpu without. Named providers that do not really run abort start-up",
    )
    add(
        "--trt-cache-dir",
        type=Path,
        default=_default("trt_cache_dir"),
        help="TensorRT engine cache (default: MODEL_DIR/trt-cache)",
    )
    add(
        "--grace-seconds",
        type=_non_negative_float,
        default=_default("grace_seconds"),
        help="on SIGTERM/SIGINT, time in-flight jobs get to finish before they are cancelled",
    )
    add(
        "--on-parity-failure",
        choices=("fail", "torch"),
        default=_default("on_parity_failure"),
        help="when ONNX Runtime and torch disagree at start-up: stay NOT_SERVING (fail) or serve with "
        "targets computed by torch (torch)",
    )
    add(
        "--parity-tolerance",
        type=_non_negative_float,
        default=_default("parity_tolerance"),
        help="largest relative error max|ort-torch|/max|torch| the start-up probe accepts (per layer, Gram)",
    )
    add(
        "--expect-weights-sha256",
        type=_digests,
        default=_default("expect_weights_sha256"),
        help="refuse to start unless every served model's weights have one of these digests "
        "(comma-separated; the manifest's state_dict_sha256, computed again from the .onnx at start-up): "
        "pins what may serve, so an artifact whose weights and manifest were both changed does not",
    )
    add(
        "--finished-job-ttl",
        type=_non_negative_float,
        default=_default("finished_job_ttl"),
        help="seconds a finished job stays watchable",
    )
    add(
        "--broker",
        type=_broker,
        default=_default("broker"),
        help=f"where jobs wait and their events go: {MEMORY_BROKER} (this process only) or "
        "redis://HOST:PORT/DB (a fleet: any replica serves any job; README: Running a fleet)",
    )
    add(
        "--lease-seconds",
        type=_positive_float,
        default=_default("lease_seconds"),
        help="redis broker: a running job whose worker has not renewed its lease for this long is run "
        "again by another worker",
    )
    add(
        "--max-attempts",
        type=_positive_int,
        default=_default("max_attempts"),
        help="redis broker: runs a job gets (the first included) before it fails, so a job that kills "
        "its worker cannot loop forever",
    )
    add(
        "--max-connection-age-seconds",
        type=_positive_float,
        default=_default("max_connection_age"),
        help="connections older than this are asked to reconnect (GOAWAY; running streams finish), so "
        "clients re-resolve and reach new replicas",
    )
    add(
        "--max-message-bytes",
        type=_positive_int,
        default=_default("max_message_bytes"),
        help="gRPC send/receive message limit",
    )
    limits = DEFAULT_LIMITS
    add(
        "--max-size",
        type=_edge,
        default=limits.max_size,
        help=f"largest output edge in pixels, at most {HARD_MAX_SIZE} (raise --max-pixels with it); a scale "
        "that does not fit in memory runs tiled",
    )
    add("--max-pixels", type=_positive_int, default=limits.max_pixels, help="largest output width*height")
    add("--max-iterations", type=_positive_int, default=limits.max_iterations, help="most iterations per job")
    add("--max-styles", type=_positive_int, default=limits.max_styles, help="most style images per job")
    add(
        "--max-image-bytes",
        type=_positive_int,
        default=limits.max_image_bytes,
        help="largest encoded input image",
    )
    add(
        "--max-input-pixels",
        type=_positive_int,
        default=limits.max_input_pixels,
        help="largest decoded input image (width*height, checked from the header before decoding)",
    )
    add(
        "--tls-cert",
        type=Path,
        default=_default("tls_cert"),
        help="PEM certificate chain for TLS on the gRPC port (with --tls-key); read again when it changes",
    )
    add("--tls-key", type=Path, default=_default("tls_key"), help="PEM private key of --tls-cert")
    add(
        "--tls-client-ca",
        type=Path,
        default=_default("tls_client_ca"),
        help="PEM CA bundle: clients must present a certificate it signed (mutual TLS)",
    )
    add(
        "--health-port",
        type=_port,
        default=_default("health_port"),
        help="also serve the health service alone, in plaintext, on this port (for Kubernetes' gRPC probes "
        "when the main port needs TLS or tokens; keep it off the Service)",
    )
    add(
        "--token-file",
        type=Path,
        default=_default("token_file"),
        help="JSON of tenants, their token sha256 digests and limits (README: Securing a deployment); "
        "read again when it changes. Unset: the server is open to anyone who reaches it",
    )
    add(
        "--tenant-from-client-cert",
        action="store_true",
        help="under mutual TLS, a call without a token belongs to the tenant its client certificate's "
        "common name names",
    )
    add(
        "--auth-exempt",
        type=_exempt,
        default=_default("auth_exempt"),
        help="services callable without a token: health, reflection (comma-separated; empty: none)",
    )
    add(
        "--reflection",
        choices=("on", "off", "auto"),
        default=_default("reflection"),
        help="gRPC server reflection; auto: on only where no --token-file is set",
    )
    add(
        "--metrics-host",
        default=_default("metrics_host"),
        help="address the /metrics port binds to (default: --host)",
    )
    add(
        "--log-level",
        default=_default("log_level"),
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="log level",
    )
    return parser


def _env_defaults(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Use STYLIZE_<FLAG> as the default of --flag, parsed by the flag's own type so errors read the same."""
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        flag = action.option_strings[0]
        variable = ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()
        if variable not in environ:
            continue
        text = environ[variable]
        if isinstance(action, argparse._StoreTrueAction):
            if text.lower() not in BOOLEANS:
                parser.error(f"{variable}={text!r}: expected one of {', '.join(BOOLEANS)}")
            action.default = BOOLEANS[text.lower()]
            continue
        try:
            value = action.type(text) if action.type else text
        except (argparse.ArgumentTypeError, ValueError) as error:
            parser.error(f"{variable}={text!r}: {error}")
        if action.choices is not None and value not in action.choices:
            parser.error(f"{variable}={text!r}: choose from {', '.join(map(str, action.choices))}")
        # A string default goes through the flag's type at parse time, like a command-line value.
        action.default = text


def parse_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Parse flags and STYLIZE_* variables; argparse exits with code 2 and a one-line message on bad input."""
    parser = build_parser()
    _env_defaults(parser, os.environ if environ is None else environ)
    args = parser.parse_args(argv)
    if args.model_dir is None:
        parser.error(f"--model-dir (or {ENV_PREFIX}MODEL_DIR) is required")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")
    if args.tenant_from_client_cert and args.tls_client_ca is None:
        parser.error("--tenant-from-client-cert needs mutual TLS (--tls-client-ca)")
    return ServerConfig(
        model_dir=args.model_dir,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        workers=args.workers,
        threads=args.threads,
        max_queue=args.max_queue,
        max_queued_pixels=args.max_queued_pixels,
        device=args.device,
        providers=args.providers,
        trt_cache_dir=args.trt_cache_dir,
        grace_seconds=args.grace_seconds,
        on_parity_failure=args.on_parity_failure,
        parity_tolerance=args.parity_tolerance,
        expect_weights_sha256=args.expect_weights_sha256,
        finished_job_ttl=args.finished_job_ttl,
        broker=args.broker,
        lease_seconds=args.lease_seconds,
        max_attempts=args.max_attempts,
        max_connection_age=args.max_connection_age_seconds,
        max_message_bytes=args.max_message_bytes,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        health_port=args.health_port,
        token_file=args.token_file,
        tenant_from_client_cert=args.tenant_from_client_cert,
        auth_exempt=args.auth_exempt,
        reflection=args.reflection,
        metrics_host=args.metrics_host,
        limits=Limits(
            max_size=args.max_size,
            max_pixels=args.max_pixels,
            max_iterations=args.max_iterations,
            max_styles=args.max_styles,
            max_image_bytes=args.max_image_bytes,
            max_input_pixels=args.max_input_pixels,
        ),
        log_level=args.log_level,
    )
