"""TLS and mutual TLS for the gRPC port, with certificates read again when their files change.

gRPC asks the fetcher for a new configuration at every handshake; the fetcher answers None (keep the
current one) unless a file's modification time or size changed, so cert-manager's rotation is served
without a restart and without re-reading files on every connection. A file that cannot be read or parsed
keeps the last good configuration, with one error in the log.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)


class TlsError(Exception):
    """The certificate files cannot be used (start-up error)."""


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    # Clients must present a certificate signed by this CA (mutual TLS); None: any client may connect.
    client_ca: Path | None = None

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) if self.client_ca is None else (self.cert, self.key, self.client_ca)


def _stamp(paths: tuple[Path, ...]) -> tuple[tuple[int, int], ...]:
    stamps = []
    for path in paths:
        status = os.stat(path)
        stamps.append((status.st_mtime_ns, status.st_size))
    return tuple(stamps)


class ReloadingCredentials:
    """grpc.dynamic_ssl_server_credentials over files that may be replaced while the server runs."""

    def __init__(self, files: TlsFiles):
        self._files = files
        self._lock = threading.Lock()
        try:
            self._stamp = _stamp(files.paths)
            initial = self._configuration()
        except OSError as error:
            raise TlsError(f"cannot read {error.filename}: {error.strerror}") from None
        self.credentials = grpc.dynamic_ssl_server_credentials(
            initial, self._fetch, require_client_authentication=files.client_ca is not None
        )

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        files = self._files
        pair = (files.key.read_bytes(), files.cert.read_bytes())
        if b"PRIVATE KEY" not in pair[0] or b"CERTIFICATE" not in pair[1]:
            raise TlsError(f"{files.key} and {files.cert} must be a PEM private key and certificate chain")
        roots = files.client_ca.read_bytes() if files.client_ca is not None else None
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=roots)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            try:
                stamp = _stamp(self._files.paths)
                if stamp == self._stamp:
                    return None
                configuration = self._configuration()
            except (OSError, TlsError) as error:
                log.error("TLS files changed but cannot be used (keeping the previous ones): %s", error)
                return None
            self._stamp = stamp
            log.info("TLS certificate reloaded from %s", self._files.cert)
            return configuration
