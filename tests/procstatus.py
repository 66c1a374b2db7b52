"""Memory and thread figures of a running process, from /proc/PID/status (Linux; no psutil needed).

Used by the reliability tests (growth of a server's RSS and thread count over a soak) and bench/load.py
(server memory before and after load).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcessStatus:
    rss_bytes: int
    # The peak resident set since the process started (VmHWM).
    peak_rss_bytes: int
    threads: int


def process_status(pid: int) -> ProcessStatus:
    """Read /proc/PID/status now; raises FileNotFoundError when the process is gone."""
    values: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        values[key] = value.strip()
    return ProcessStatus(
        rss_bytes=_kilobytes(values["VmRSS"]),
        peak_rss_bytes=_kilobytes(values["VmHWM"]),
        threads=int(values["Threads"]),
    )


def _kilobytes(value: str) -> int:
    number, unit = value.split()
    assert unit == "kB", f"unexpected unit {unit!r} in /proc/PID/status"
    return int(number) * 1024
