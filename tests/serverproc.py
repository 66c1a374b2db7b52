"""Run the real `stylize-server` as a subprocess for tests: free ports, wait for health, stop, show its log.

    with ServerProcess(model_dir, "--workers", "1") as server:
        channel = grpc.insecure_channel(server.address)

Ports are chosen by the server (--port 0 --metrics-port 0) and read from its "listening on" line, so
parallel test runs never race for a port. The server's stdout and stderr go to one log file; when the
`with` block fails, or the server does not come up, the log is printed (pytest shows it with the failure).
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from stylize.v1 import stylize_pb2 as pb

# The installed console script, beside the interpreter running the tests (the project's venv).
SERVER_COMMAND = (str(Path(sys.executable).parent / "stylize-server"),)
LISTENING = re.compile(r"listening on (?P<host>\S+):(?P<port>\d+) metrics on :(?P<metrics_port>\d+)")
# Logged before LISTENING by a server started with --health-port.
HEALTH_PORT = re.compile(r"health \(plaintext, health service only\) on \S+:(?P<port>\d+)")
SERVICE_NAME = "stylize.v1.StyleTransfer"
EXPORT_COMMAND = str(Path(sys.executable).parent / "stylize-export")
START_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0


def export_random_model(out: Path, *args: str) -> Path:
    """stylize-export --weights random into `out` (seconds on a CPU); returns `out`."""
    result = subprocess.run(
        [EXPORT_COMMAND, "--weights", "random", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"stylize-export failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return out


class ServerFailed(AssertionError):
    """The server exited or did not reach the expected state in time; the message carries its log."""


class ServerProcess:
    """A `stylize-server` subprocess on 127.0.0.1 with free ports.

    `wait_for`: the health status to wait for after start ("SERVING", "NOT_SERVING", or None to return as
    soon as the ports are known). Attributes once started: address ("127.0.0.1:PORT"), port,
    metrics_port, metrics_url, process, log_path.
    """

    def __init__(
        self,
        model_dir: Path,
        *args: str,
        env: dict[str, str] | None = None,
        wait_for: str | None = "SERVING",
        timeout: float = START_TIMEOUT,
    ):
        self.model_dir = Path(model_dir)
        self.args: Sequence[str] = args
        self.env = env
        self.wait_for = wait_for
        self.timeout = timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.metrics_port = 0
        # With --health-port: the plaintext health port, which health() then uses (the main port may need
        # TLS or tokens).
        self.health_port: int | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="stylize-server-", suffix=".log")[1])
        self.returncode: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _fail(self, reason: str) -> ServerFailed:
        return ServerFailed(f"{reason}\n----- server log -----\n{self.log()}")

    def start(self) -> ServerProcess:
        command = [
            *SERVER_COMMAND,
            "--model-dir",
            str(self.model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "0",
            *self.args,
        ]
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, env=environment
            )
        deadline = time.monotonic() + self.timeout
        self._read_ports(deadline)
        if self.wait_for is not None:
            self.wait_health(self.wait_for, deadline - time.monotonic())
        return self

    def _read_ports(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            match = LISTENING.search(self.log())
            if match:
                self.port, self.metrics_port = int(match["port"]), int(match["metrics_port"])
                health = HEALTH_PORT.search(self.log())
                self.health_port = int(health["port"]) if health else None
                return
            if self.process.poll() is not None:
                raise self._fail(f"server exited with code {self.process.returncode} before listening")
            time.sleep(0.05)
        raise self._fail(f"server did not print its ports within {self.timeout:.0f} s")

    def health(self, service: str = "") -> str:
        """The health status name of `service` ("" is the overall server)."""
        address = self.address if self.health_port is None else f"127.0.0.1:{self.health_port}"
        with grpc.insecure_channel(address) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5
            )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_health(self, status: str, timeout: float) -> None:
        """Wait until the overall and the StyleTransfer health both report `status` as the outcome of
        start-up (a loading server is NOT_SERVING too: for that status, also wait for the server's
        "NOT_SERVING after" log line)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self._fail(f"server exited with code {self.process.returncode} while starting")
            settled = status != "NOT_SERVING" or "NOT_SERVING after" in self.log()
            try:
                if settled and self.health("") == status and self.health(SERVICE_NAME) == status:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise self._fail(f"server health did not become {status} within {timeout:.0f} s")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the process to exit; returns its exit code (kills it after `timeout`)."""
        try:
            self.returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise self._fail(f"server did not exit within {timeout:.0f} s") from None
        return self.returncode

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def __enter__(self) -> ServerProcess:
        try:
            return self.start()
        except BaseException:
            self._kill()
            raise

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        try:
            self.stop()
        finally:
            self._kill()
            if kind is not None and not isinstance(error, ServerFailed):
                sys.stderr.write(f"----- server log ({self.log_path}) -----\n{self.log()}\n")
            else:
                self.log_path.unlink(missing_ok=True)

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


# ---------------------------------------------------------------- requests and scrapes for tests


def png_bytes(seed: int, size: tuple[int, int] = (64, 64)) -> bytes:
    """A seeded noise image, PNG-encoded."""
    image = Image.effect_noise(size, 30 + seed).convert("RGB")
    image = Image.merge("RGB", [image.getchannel(0), image.getchannel(1).rotate(90), image.getchannel(2)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# One 64 px scale and a few iterations: well under a second per job on a CPU.
SMALL = {"size": 64, "min_size": 64, "initial_iterations": 6}
# Adam iterations are cheap and many: a job that runs until it is cancelled.
LONG = {"size": 64, "min_size": 64, "initial_iterations": 5000, "optimizer": pb.OPTIMIZER_ADAM}


def stylize_request(options: dict | None = None, **fields: object) -> pb.StylizeRequest:
    """A 64 px content and one style with `options` (StyleOptions fields); other request fields as given."""
    request = pb.StylizeRequest(
        content_image=png_bytes(1),
        styles=[pb.StyleImage(image=png_bytes(2, (48, 64)))],
        options=pb.StyleOptions(**(SMALL if options is None else options)),
    )
    for name, value in fields.items():
        if isinstance(value, Message):
            getattr(request, name).CopyFrom(value)
        else:
            setattr(request, name, value)
    return request


def scrape(metrics_url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a /metrics page: (name, labels) -> value."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: dict, name: str, **labels: str) -> float | None:
    """The value of one sample whose labels include `labels` (summed when several match); None if absent."""
    values = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    return sum(values) if values else None


def collect(stream) -> tuple[list[pb.JobEvent], grpc.StatusCode]:
    """Read a stream to its end: (events, final status code)."""
    events = []
    try:
        for event in stream:
            events.append(event)
    except grpc.RpcError as error:
        return events, error.code()
    return events, grpc.StatusCode.OK


def wait_until(condition: Callable[[], bool], timeout: float, poll: float = 0.05) -> None:
    """Poll `condition` until it holds; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(poll)


def final_iteration(stub, job_id: str) -> tuple[int, grpc.StatusCode]:
    """The job's last iteration (a late watcher's replay ends with the latest progress) and its end status."""
    events, code = collect(stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=60))
    return max((e.progress.iteration for e in events if e.HasField("progress")), default=0), code


# LONG's iterations: a job of LONG that ends before them was stopped mid-way. How many iterations a
# cancelled job still runs depends on the client's lag behind the server, so tests through a real server
# check that it stopped, and tests/test_service_units.py and the engine's tests check "within one iteration".
LONG_ITERATIONS = LONG["initial_iterations"]


class StreamReader(threading.Thread):
    """Reads a stream continuously, so `latest` is the iteration the server sent last (no client backlog)."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream = stream
        self.events: list[pb.JobEvent] = []
        self.latest = 0
        self.code: grpc.StatusCode | None = None
        self.start()

    def run(self) -> None:
        _, self.code = collect(self._track())

    def _track(self):
        for event in self.stream:
            self.events.append(event)
            if event.HasField("progress"):
                self.latest = event.progress.iteration
            yield event

    def wait_for_events(self, count: int, timeout: float = 60) -> None:
        """Until `count` events arrived (the first one, queued, means the job was accepted)."""
        deadline = time.monotonic() + timeout
        while len(self.events) < count and time.monotonic() < deadline and self.is_alive():
            time.sleep(0.01)
        assert len(self.events) >= count, f"the stream ended or stalled after {len(self.events)} events"

    def wait_for_iteration(self, iteration: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.latest < iteration and time.monotonic() < deadline and self.is_alive():
            time.sleep(0.01)
        assert self.latest >= iteration, "the job did not progress"
