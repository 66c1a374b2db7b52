"""round_robin over two real server processes: one client channel spreads its jobs over both."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from serverproc import START_TIMEOUT, ServerProcess

from stylize.client import StylizeClient

SAMPLES = Path(__file__).resolve().parent.parent / "assets" / "samples"
CONTENT, STYLE = SAMPLES / "chelsea.png", SAMPLES / "coffee.png"
SMALL = {"size": 32, "min_size": 32, "initial_iterations": 2}
JOBS = 6


@pytest.fixture(scope="module")
def two_servers(model_dir: Path) -> Iterator[list[ServerProcess]]:
    """Two servers starting side by side (start-up is mostly the parity probe: seconds of CPU each)."""
    with ExitStack() as stack:
        servers = [
            stack.enter_context(
                ServerProcess(model_dir, "--device", "cpu", "--grace-seconds", "5", wait_for=None)
            )
            for _ in range(2)
        ]
        for server in servers:
            server.wait_health("SERVING", START_TIMEOUT)
        yield servers


def succeeded_jobs(server: ServerProcess) -> float:
    """stylize_jobs_total{status="succeeded"} as that server's /metrics reports it."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    matches = re.findall(r'^stylize_jobs_total\{[^}]*status="succeeded"[^}]*\} (\S+)$', text, re.MULTILINE)
    return sum(float(value) for value in matches)


def jobs_since(servers: list[ServerProcess], before: list[float], expected: int) -> list[float]:
    """Succeeded jobs per server since `before`, waiting briefly for the total to reach `expected`: a
    server counts a job just after it has sent the job's last event."""
    deadline = time.monotonic() + 10
    while True:
        done = [succeeded_jobs(server) - start for server, start in zip(servers, before, strict=True)]
        if sum(done) >= expected or time.monotonic() > deadline:
            return done
        time.sleep(0.1)


def test_round_robin_spreads_jobs_over_both_servers(two_servers: list[ServerProcess]) -> None:
    before = [succeeded_jobs(server) for server in two_servers]
    targets = [server.address for server in two_servers]
    with StylizeClient(targets) as client:
        assert client.target.startswith("ipv4:127.0.0.1:")
        for _ in range(JOBS):
            client.stylize(CONTENT, [STYLE], **SMALL).result()
    done = jobs_since(two_servers, before, JOBS)
    assert sum(done) == JOBS
    # round_robin alternates over ready servers; both must have worked (pick_first would give 6 and 0).
    assert min(done) >= 2, done


def test_a_stopped_server_leaves_the_rotation(two_servers: list[ServerProcess]) -> None:
    """Jobs keep succeeding once one server is gone: it leaves the rotation, UNAVAILABLE is retried.
    (Last in this module: it stops one of the module's servers.)"""
    remaining, leaving = two_servers
    with StylizeClient([remaining.address, leaving.address]) as client:
        client.stylize(CONTENT, [STYLE], **SMALL).result()
        assert leaving.stop() == 0
        before = succeeded_jobs(remaining)
        for _ in range(3):
            client.stylize(CONTENT, [STYLE], **SMALL).result()
    assert jobs_since([remaining], [before], 3) == [3]
