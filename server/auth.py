"""Who is calling: bearer tokens from a reloadable file (or the client certificate's subject), the tenant
each one names, and that tenant's limits.

The token file (JSON) holds SHA-256 digests of tokens, never the tokens themselves:

    {"tenants": {
        "acme": {"token_sha256": ["9f86d081884c7d65..."],
                 "max_jobs_in_flight": 4, "max_queued": 8,
                 "max_pixel_iterations_per_minute": 2000000000, "max_concurrent_decodes": 2},
        "render-farm": {"token_sha256": ["..."]}}}

A digest: `printf %s "$TOKEN" | sha256sum`. Limits left out (or 0) are unlimited. The file is read again
when it changes (checked at most once a second), so a revoked token stops working without a restart; a
file that no longer parses keeps the previous tenants, with one error in the log.

The interceptor wraps every handler: a call without a known token (nor, with --tenant-from-client-cert,
a verified client certificate) ends with UNAUTHENTICATED before the handler runs; the handler reads the
caller's tenant from `current_tenant`. Exempt services (health, reflection) pass without a token.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from .errors import JobStatus, abort, wrap_handler

log = logging.getLogger(__name__)

RELOAD_CHECK_SECONDS = 1.0
# A bearer token longer than this is refused before it is hashed.
MAX_TOKEN_CHARACTERS = 4096
LIMIT_NAMES = (
    "max_jobs_in_flight",
    "max_queued",
    "max_pixel_iterations_per_minute",
    "max_concurrent_decodes",
)


class TokenFileError(Exception):
    """The token file cannot be used (a start-up error; while running, the previous tenants stay)."""


@dataclass(frozen=True)
class TenantLimits:
    """0: unlimited."""

    max_jobs_in_flight: int = 0
    max_queued: int = 0
    max_pixel_iterations_per_minute: int = 0
    max_concurrent_decodes: int = 0


@dataclass(frozen=True)
class Tenant:
    name: str
    limits: TenantLimits = field(default_factory=TenantLimits)


# The caller of an open server (no token file): every job belongs to it.
ANONYMOUS = Tenant("")
current_tenant: contextvars.ContextVar[Tenant] = contextvars.ContextVar("current_tenant", default=ANONYMOUS)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_token_file(text: str, source: str) -> tuple[dict[str, Tenant], dict[str, Tenant]]:
    """(tenants by token digest, tenants by name); TokenFileError naming what is wrong."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise TokenFileError(f"{source}: not JSON: {error}") from None
    tenants = data.get("tenants") if isinstance(data, dict) else None
    if not isinstance(tenants, dict):
        raise TokenFileError(f'{source}: expected {{"tenants": {{NAME: {{"token_sha256": [...]}}}}}}')
    by_digest: dict[str, Tenant] = {}
    by_name: dict[str, Tenant] = {}
    for name, entry in tenants.items():
        where = f"{source}: tenant {name!r}"
        if not isinstance(entry, dict) or not name:
            raise TokenFileError(f"{where}: expected an object with token_sha256")
        unknown = set(entry) - {"token_sha256", *LIMIT_NAMES}
        if unknown:
            raise TokenFileError(f"{where}: unknown field {sorted(unknown)[0]!r}")
        limits = {}
        for limit in LIMIT_NAMES:
            value = entry.get(limit, 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise TokenFileError(f"{where}: {limit} must be an integer >= 0, got {value!r}")
            limits[limit] = value
        tenant = Tenant(name, TenantLimits(**limits))
        digests = entry.get("token_sha256", [])
        if not isinstance(digests, list):
            raise TokenFileError(f"{where}: token_sha256 must be a list of hex digests")
        for digest in digests:
            if (
                not isinstance(digest, str)
                or len(digest) != 64
                or any(c not in "0123456789abcdef" for c in digest)
            ):
                raise TokenFileError(f"{where}: {str(digest)[:70]!r} is not a lower-case sha256 hex digest")
            if digest in by_digest:
                raise TokenFileError(f"{where}: a digest is listed twice")
            by_digest[digest] = tenant
        by_name[name] = tenant
    return by_digest, by_name


class TokenFile:
    """The tenants of a token file, read again when the file changes."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic):
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._checked = clock()
        try:
            self._stamp = self._read_stamp()
            self._by_digest, self._by_name = parse_token_file(path.read_text(), str(path))
        except OSError as error:
            raise TokenFileError(f"cannot read {path}: {error.strerror}") from None

    def _read_stamp(self) -> tuple[int, int]:
        status = os.stat(self.path)
        return status.st_mtime_ns, status.st_size

    def _refresh(self) -> None:
        now = self._clock()
        with self._lock:
            if now - self._checked < RELOAD_CHECK_SECONDS:
                return
            self._checked = now
            try:
                stamp = self._read_stamp()
            except OSError as error:
                log.error("token file %s cannot be read (keeping the previous tenants): %s", self.path, error)
                return
            if stamp == self._stamp:
                return
            # Taken before parsing: a file that does not parse is reported once, not every second.
            self._stamp = stamp
            try:
                self._by_digest, self._by_name = parse_token_file(self.path.read_text(), str(self.path))
            except (OSError, UnicodeDecodeError, TokenFileError) as error:
                log.error("token file changed but cannot be used (keeping the previous tenants): %s", error)
                return
            log.info("token file %s reloaded: %d tenant(s)", self.path, len(self._by_name))

    def by_token(self, token: str) -> Tenant | None:
        # Only digests are compared, so a lookup's timing says nothing about the tokens.
        self._refresh()
        return self._by_digest.get(token_digest(token))

    def by_name(self, name: str) -> Tenant | None:
        self._refresh()
        return self._by_name.get(name)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the first `authorization: Bearer ...` entry; "" for a malformed or empty one."""
    for key, value in metadata or ():
        if key != "authorization":
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        scheme, _, token = text.partition(" ")
        if scheme.lower() != "bearer" or not token.strip() or len(token) > MAX_TOKEN_CHARACTERS:
            return ""
        return token.strip()
    return None


def _certificate_subject(context: grpc.aio.ServicerContext) -> str | None:
    """The verified client certificate's common name (mutual TLS), or None."""
    names = (context.auth_context() or {}).get("x509_common_name") or []
    return names[0].decode() if names else None


UNAUTHENTICATED = JobStatus(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token")


class Authenticator:
    """Turns a call into its tenant, or None when it must be refused."""

    def __init__(self, tokens: TokenFile | None, *, tenant_from_client_cert: bool):
        self._tokens = tokens
        self._from_cert = tenant_from_client_cert

    @property
    def open(self) -> bool:
        return self._tokens is None and not self._from_cert

    def tenant(self, context: grpc.aio.ServicerContext) -> Tenant | None:
        if self.open:
            return ANONYMOUS
        token = bearer_token(context.invocation_metadata())
        if token and self._tokens is not None:
            found = self._tokens.by_token(token)
            if found is not None:
                return found
        if token is None and self._from_cert:
            subject = _certificate_subject(context)
            if subject:
                known = self._tokens.by_name(subject) if self._tokens is not None else None
                return known or Tenant(subject)
        return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses unauthenticated calls with UNAUTHENTICATED and sets `current_tenant` for the handler.
    Services named in `exempt` (full names) are not checked."""

    def __init__(self, authenticator: Authenticator, exempt: Iterable[str]):
        self._authenticator = authenticator
        self._exempt = frozenset(exempt)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        service = handler_call_details.method.lstrip("/").rpartition("/")[0]
        if handler is None or service in self._exempt or self._authenticator.open:
            return handler
        authenticate = self._authenticator.tenant

        @contextlib.asynccontextmanager
        async def admitted(request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            tenant = authenticate(context)
            if tenant is None:
                await abort(context, UNAUTHENTICATED)
            current_tenant.set(tenant)
            yield

        return wrap_handler(handler, admitted)
