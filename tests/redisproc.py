"""Run Debian's `redis-server` for tests: on 127.0.0.1, a free port, no persistence, its own directory.

    with RedisProcess() as redis_server:
        url = redis_server.url           # redis://127.0.0.1:PORT/0
        redis_server.pause()             # SIGSTOP: connections hang, as with a stuck or partitioned Redis
        redis_server.resume()            # SIGCONT

`make tools` installs redis-server (deploy/tools/ensure-tools.sh redis-server); tests that need it skip
with that hint where it is missing, so the in-process default needs no Redis.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
START_TIMEOUT = 10.0


def require_redis_server() -> None:
    if not os.access(REDIS_SERVER, os.X_OK):
        pytest.skip("redis-server is not installed: make tools (deploy/tools/ensure-tools.sh redis-server)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisProcess:
    def __init__(self) -> None:
        self._directory = tempfile.TemporaryDirectory(prefix="stylize-redis-")
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return Path(self._directory.name) / "redis.log"

    def __enter__(self) -> RedisProcess:
        require_redis_server()
        self.port = _free_port()
        options = {
            "bind": "127.0.0.1",
            "port": str(self.port),
            "save": "",
            "appendonly": "no",
            "dir": self._directory.name,
            "logfile": str(self.log_path),
        }
        self.process = subprocess.Popen(
            [REDIS_SERVER, *(part for name, value in options.items() for part in (f"--{name}", value))],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as connection:
                    connection.sendall(b"PING\r\n")
                    if connection.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise AssertionError(f"redis-server did not start on port {self.port}:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return "(no log)"

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
        self._directory.cleanup()
