"""How the client reaches one server or several: the target string and the channel's settings.

Targets:
- "host:port" or any gRPC target ("dns:///stylize.default.svc:50051", "unix:/path", "ipv4:...") as is;
- several "IP:PORT" (a list, or one string with commas) become one static-resolver target
  ("ipv4:10.0.0.1:50051,10.0.0.2:50051"), so one channel spreads calls over all of them. Names that
  resolve to several servers (a Kubernetes headless Service) go through "dns:///NAME:PORT" instead,
  which re-resolves when the set changes.

Channel settings (the service config and channel options):
- round_robin load balancing: each call goes to the next ready server; a server that fails drops
  out of the rotation until it reconnects. Jobs are long, so per-call balancing is what spreads
  GPU work; the default pick_first would send everything to one server.
- retries for UNAVAILABLE only (a server that is starting, draining or gone): the call was not
  accepted, so retrying elsewhere is safe. Never INVALID_ARGUMENT or any other status: those would
  fail again, or could run a job twice. gRPC retries a streaming call only until the first event
  arrives, so a job that started is never silently restarted.
- keepalive pings every 30 s (10 s to answer), also while no call is active, so a dead server or a
  dropped NAT mapping is noticed while a long job streams nothing; the server permits exactly this.
- 64 MiB messages both ways, as the server: a maximum-size input image plus a few styles.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Sequence
from pathlib import Path

import grpc

from stylize.api.options import FieldViolation
from stylize.api.wire import DEFAULT_PORT, MAX_MESSAGE_BYTES
from stylize.client.errors import InvalidArgument

SERVICE_NAME = "stylize.v1.StyleTransfer"
SERVER_ENV = "STYLIZE_SERVER"
# The bearer token a client sends when none is passed in code or on the command line.
TOKEN_ENV = "STYLIZE_TOKEN"
DEFAULT_TARGET = f"127.0.0.1:{DEFAULT_PORT}"
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000

SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": SERVICE_NAME}],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.1s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}


def default_target() -> str:
    """$STYLIZE_SERVER, else 127.0.0.1:50051."""
    return os.environ.get(SERVER_ENV) or DEFAULT_TARGET


def _split(targets: str | Sequence[str]) -> list[str]:
    items = [targets] if isinstance(targets, str) else list(targets)
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def _ip_and_port(target: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        return ipaddress.ip_address(host.strip("[]")), int(port)
    except ValueError:
        return None


def resolve_target(targets: str | Sequence[str] | None = None) -> str:
    """One gRPC target for one server or several (see the module's docstring); None: default_target()."""
    parts = _split(default_target() if targets is None else targets)
    if not parts:
        raise InvalidArgument.of([FieldViolation("server", "no server given")])
    if len(parts) == 1:
        return parts[0]
    addresses = [_ip_and_port(part) for part in parts]
    names = [part for part, address in zip(parts, addresses, strict=True) if address is None]
    if names:
        problem = (
            f"{', '.join(names)}: a list of servers takes IP:PORT entries; "
            "for a name with several addresses use dns:///NAME:PORT"
        )
        raise InvalidArgument.of([FieldViolation("server", problem)])
    versions = {address.version for address, _ in addresses}  # type: ignore[misc]
    if versions == {4}:
        return "ipv4:" + ",".join(f"{address}:{port}" for address, port in addresses)  # type: ignore[misc]
    if versions == {6}:
        return "ipv6:" + ",".join(f"[{address}]:{port}" for address, port in addresses)  # type: ignore[misc]
    raise InvalidArgument.of([FieldViolation("server", "a list of servers must be all IPv4 or all IPv6")])


def default_token() -> str | None:
    """$STYLIZE_TOKEN, else None (no authorization header)."""
    return os.environ.get(TOKEN_ENV) or None


def tls_credentials(
    ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """TLS to the server: `ca` verifies it (None: the system's roots); `cert` and `key` are this client's
    certificate for mutual TLS. An unreadable file is InvalidArgument naming its flag."""

    def read(path: Path | None, field: str) -> bytes | None:
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as error:
            raise InvalidArgument.of(
                [FieldViolation(field, f"cannot read {path}: {error.strerror}")]
            ) from None

    if (cert is None) != (key is None):
        raise InvalidArgument.of([FieldViolation("tls_cert", "a client certificate and its key go together")])
    return grpc.ssl_channel_credentials(read(ca, "tls_ca"), read(key, "tls_key"), read(cert, "tls_cert"))


def channel_options(server_name: str | None = None) -> list[tuple[str, object]]:
    """`server_name`: the name the server's certificate must carry, where it differs from the target's."""
    override: list[tuple[str, object]] = (
        [] if server_name is None else [("grpc.ssl_target_name_override", server_name)]
    )
    return [
        *override,
        ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
        # Our service config, not one a DNS TXT record might carry.
        ("grpc.service_config_disable_resolution", 1),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
