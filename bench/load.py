"""N concurrent clients submit small jobs for a bounded time against one server. Prints JSON.

    .venv/bin/python -m bench.load [--clients 8] [--duration 30] [--size 64] [--iterations 4]
                                   [--model-dir DIR | --server HOST:PORT [--server-pid PID]]

Without --server the script starts its own stylize-server (random weights exported to a temporary
directory unless --model-dir is given; free ports) and stops it afterwards. Each client is a thread with
its own StylizeClient (its own connection) that runs Stylize calls back to back: sample content and style
images shrunk to --size px, one scale, --iterations L-BFGS iterations, no previews. After --duration
seconds no client starts another job; jobs in flight finish and count.

Reported: completed jobs per second (over the whole run, until the last job ended), queue wait
percentiles (the server's Completed.queue_seconds), end-to-end latency percentiles (call to Completed on
the client), failures by status code, and the server's resident memory, peak memory and thread count
before the load (after one warm-up job, which allocates what every job reuses) and after it. The clients
share the machine with the server: on a small CPU their own work (encoding, gRPC) is part of the figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # bench.machine, and the tests' server harness

from procstatus import ProcessStatus, process_status  # noqa: E402
from serverproc import ServerProcess, export_random_model, sample, scrape  # noqa: E402

from bench.machine import describe, machine_info  # noqa: E402
from stylize.client import StylizeClient  # noqa: E402
from stylize.client.errors import StylizeError  # noqa: E402

SAMPLES = ROOT / "assets" / "samples"
# Wait before retrying after the server refused a job (queue full, draining): no busy loop.
REFUSED_BACKOFF_SECONDS = 0.05
PERCENTILES = (50, 95, 99)


@dataclass
class Tally:
    """What the clients saw; appended to from the client threads under `lock`."""

    queue_seconds: list[float] = field(default_factory=list)
    latency_seconds: list[float] = field(default_factory=list)
    run_seconds: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


def small_png(path: Path, size: int) -> bytes:
    image = Image.open(path).convert("RGB")
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def percentiles(values: list[float]) -> dict[str, float | None]:
    """Nearest-rank percentiles (None without values)."""
    ordered = sorted(values)
    result: dict[str, float | None] = {}
    for p in PERCENTILES:
        rank = max(1, -(-p * len(ordered) // 100))  # ceil(p/100 * n)
        result[f"p{p}"] = round(ordered[rank - 1], 4) if ordered else None
    return result


def run_client(address: str, job: dict[str, object], stop_at: float, timeout: float, tally: Tally) -> None:
    with StylizeClient(address, timeout=timeout) as client:
        while time.monotonic() < stop_at:
            began = time.perf_counter()
            try:
                completed = client.stylize(**job).result()
            except StylizeError as error:
                with tally.lock:
                    tally.errors[error.code.name if error.code else "CLIENT"] += 1
                time.sleep(REFUSED_BACKOFF_SECONDS)
                continue
            latency = time.perf_counter() - began
            with tally.lock:
                tally.queue_seconds.append(completed.queue_seconds)
                tally.run_seconds.append(completed.run_seconds)
                tally.latency_seconds.append(latency)


def settle(metrics_url: str, timeout: float = 10.0) -> dict[str, float | None]:
    """Queue depth and jobs in progress once both are 0 (or after `timeout`): a worker counts its job done
    just after the client received the result, so the last job may still be counted for a moment."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(metrics_url)
        idle = {
            "queue_depth": sample(samples, "stylize_queue_depth"),
            "jobs_in_progress": sample(samples, "stylize_jobs_in_progress"),
        }
        if not any(idle.values()) or time.monotonic() > deadline:
            return idle
        time.sleep(0.1)


def memory(status: ProcessStatus | None) -> dict[str, int] | None:
    return dataclasses.asdict(status) if status else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds during which jobs start")
    parser.add_argument("--size", type=int, default=64, help="edge of the output in px")
    parser.add_argument("--iterations", type=int, default=4, help="L-BFGS iterations per job")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline of each job's call")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--model-dir", type=Path, help="artifact for the server this script starts")
    target.add_argument("--server", help="HOST:PORT of a running server (no server is started)")
    parser.add_argument("--server-pid", type=int, help="with --server: its process id, for memory figures")
    parser.add_argument("--device", default="auto", help="--device of the server this script starts")
    parser.add_argument("--workers", type=int, default=1, help="--workers of the server this script starts")
    parser.add_argument(
        "--max-queue", type=int, default=16, help="--max-queue of the server this script starts"
    )
    args = parser.parse_args()

    machine = machine_info()
    job = {
        "content": small_png(SAMPLES / "chelsea.png", args.size),
        "styles": [small_png(SAMPLES / "coffee.png", args.size)],
        "size": args.size,
        "min_size": args.size,
        "initial_iterations": args.iterations,
        "client_tag": "bench-load",
    }
    with ExitStack() as stack:
        address, pid, metrics_url = args.server, args.server_pid, None
        if address is None:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            model_dir = args.model_dir or export_random_model(scratch)
            server = stack.enter_context(
                ServerProcess(
                    model_dir,
                    *("--device", args.device, "--workers", str(args.workers)),
                    *("--max-queue", str(args.max_queue)),
                )
            )
            address, pid, metrics_url = server.address, server.process.pid, server.metrics_url

        with StylizeClient(address, timeout=args.timeout) as client:
            client.stylize(**job).result()  # warm-up, not counted
        before = process_status(pid) if pid else None

        tally = Tally()
        began = time.monotonic()
        threads = [
            threading.Thread(
                target=run_client, args=(address, job, began + args.duration, args.timeout, tally)
            )
            for _ in range(args.clients)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - began

        after = process_status(pid) if pid else None
        idle = settle(metrics_url) if metrics_url else None

    completed = len(tally.latency_seconds)
    report = {
        "benchmark": "load",
        "machine": machine,
        "clients": args.clients,
        "duration_seconds": args.duration,
        "elapsed_seconds": round(elapsed, 2),
        "job": {"size": args.size, "iterations": args.iterations},
        "server": {"started_here": args.server is None, "workers": args.workers, "device": args.device},
        "completed": completed,
        "jobs_per_second": round(completed / elapsed, 3),
        "queue_seconds": percentiles(tally.queue_seconds),
        "latency_seconds": percentiles(tally.latency_seconds),
        "run_seconds": percentiles(tally.run_seconds),
        "errors": dict(tally.errors),
        "server_memory_before": memory(before),
        "server_memory_after": memory(after),
        "server_after_load": idle,
    }
    print(json.dumps(report, indent=2))
    queue, latency = report["queue_seconds"], report["latency_seconds"]
    print(
        f"load: {args.clients} clients, {completed} jobs in {elapsed:.1f} s = {report['jobs_per_second']} "
        f"jobs/s; queue wait p50/p95/p99 {queue['p50']}/{queue['p95']}/{queue['p99']} s; latency p50/p99 "
        f"{latency['p50']}/{latency['p99']} s; errors {dict(tally.errors) or 'none'}\n"
        f"  server RSS {_mib(before)} -> {_mib(after)} MiB ({describe(machine)})",
        file=sys.stderr,
    )


def _mib(status: ProcessStatus | None) -> str:
    return f"{status.rss_bytes / 2**20:.0f}" if status else "?"


if __name__ == "__main__":
    main()
