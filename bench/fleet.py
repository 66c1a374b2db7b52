"""Two replicas, one mixed workload: client round robin over in-process queues against one Redis queue
that both replicas pull from. Prints JSON.

    .venv/bin/python -m bench.fleet [--repeats 3] [--jobs 24] [--large-share 0.25] [--interval 0.8]
                                    [--model-dir DIR]

Each repeat runs the same workload twice, once per broker, side by side in time:
- `memory`: two servers with the in-process broker; the client sends job i to replica i mod 2 (what
  round robin over the headless Service does).
- `redis`: the same two servers' settings with `--broker redis://...` on one redis-server; the client
  still sends job i to replica i mod 2, but a job runs on whichever replica's worker is free first.

The workload: --jobs arrivals, one every --interval seconds, each large with probability --large-share
(a fixed seed, so every run sends the same sequence), the rest small. Each replica has one worker with
one torch thread (the machine's two cores, one per replica). Reported per broker: p50/p95 queue wait of
small and of large jobs (the server's Completed.queue_seconds), jobs per second (arrivals to the last
completion), medians over the repeats, and the ratio of the small jobs' p95 wait, memory over redis.
Random weights: this measures scheduling, not pictures.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # bench.machine, and the tests' server and Redis harness

from redisproc import RedisProcess  # noqa: E402
from serverproc import ServerProcess, export_random_model, stylize_request  # noqa: E402

from bench.load import percentiles  # noqa: E402
from bench.machine import describe, machine_info  # noqa: E402
from stylize.v1 import stylize_pb2_grpc  # noqa: E402

SMALL = {"size": 64, "min_size": 64, "initial_iterations": 4}
LARGE = {"size": 128, "min_size": 128, "initial_iterations": 60}
REPLICAS = 2
SEED = 14


def workload(jobs: int, large_share: float) -> list[str]:
    chooser = random.Random(SEED)
    return ["large" if chooser.random() < large_share else "small" for _ in range(jobs)]


@contextmanager
def replicas(model_dir: Path, broker: str) -> Iterator[list[ServerProcess]]:
    args = ("--device", "cpu", "--workers", "1", "--threads", "1", "--max-queue", "64", "--broker", broker)
    with ExitStack() as stack:
        servers = [ServerProcess(model_dir, *args, wait_for=None) for _ in range(REPLICAS)]
        for server in servers:
            stack.callback(server.stop)
            server.start()
        for server in servers:
            server.wait_health("SERVING", 120)
        yield servers


def run_workload(servers: list[ServerProcess], kinds: list[str], interval: float) -> dict[str, object]:
    stubs = [stylize_pb2_grpc.StyleTransferStub(grpc.insecure_channel(s.address)) for s in servers]
    for stub in stubs:  # warm-up: one job per replica, not counted
        list(stub.Stylize(stylize_request(SMALL), timeout=300))
    waits: dict[str, list[float]] = {"small": [], "large": []}
    failures: list[str] = []
    lock = threading.Lock()

    def call(index: int, kind: str) -> None:
        request = stylize_request(LARGE if kind == "large" else SMALL)
        try:
            events = list(stubs[index % REPLICAS].Stylize(request, timeout=600))
        except grpc.RpcError as error:
            with lock:
                failures.append(error.code().name)
            return
        with lock:
            waits[kind].append(events[-1].completed.queue_seconds)

    began = time.monotonic()
    threads = []
    for index, kind in enumerate(kinds):
        time.sleep(max(0.0, began + index * interval - time.monotonic()))
        thread = threading.Thread(target=call, args=(index, kind))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    done = sum(len(values) for values in waits.values())
    return {
        "jobs_per_second": round(done / elapsed, 3),
        "queue_seconds": {kind: percentiles(values) for kind, values in waits.items()},
        "failures": failures,
    }


def median_of(runs: list[dict], *path: str) -> float | None:
    values = []
    for run in runs:
        value: object = run
        for key in path:
            value = value[key]  # type: ignore[index]
        if value is not None:
            values.append(float(value))  # type: ignore[arg-type]
    return round(statistics.median(values), 3) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=24, help="arrivals per run")
    parser.add_argument("--large-share", type=float, default=0.25, help="probability that a job is large")
    parser.add_argument("--interval", type=float, default=0.8, help="seconds between arrivals")
    parser.add_argument("--model-dir", type=Path, help="artifact to serve (default: random weights)")
    args = parser.parse_args()

    kinds = workload(args.jobs, args.large_share)
    runs: dict[str, list[dict]] = {"memory": [], "redis": []}
    with ExitStack() as stack:
        model_dir = args.model_dir or export_random_model(
            Path(stack.enter_context(tempfile.TemporaryDirectory()))
        )
        redis_server = stack.enter_context(RedisProcess())
        for repeat in range(args.repeats):
            for broker in ("memory", "redis"):
                url = "memory" if broker == "memory" else redis_server.url
                with replicas(model_dir, url) as servers:
                    runs[broker].append(run_workload(servers, kinds, args.interval))
                print(f"repeat {repeat + 1}/{args.repeats} {broker}: {runs[broker][-1]}", file=sys.stderr)

    summary = {
        broker: {
            "jobs_per_second": median_of(results, "jobs_per_second"),
            **{
                f"{kind}_queue_seconds_{p}": median_of(results, "queue_seconds", kind, p)
                for kind in ("small", "large")
                for p in ("p50", "p95")
            },
        }
        for broker, results in runs.items()
    }
    small_memory, small_redis = (summary[b]["small_queue_seconds_p95"] for b in ("memory", "redis"))
    report = {
        "benchmark": "fleet",
        "machine": machine_info(),
        "replicas": REPLICAS,
        "workload": {
            "jobs": args.jobs,
            "large": kinds.count("large"),
            "small": kinds.count("small"),
            "interval_seconds": args.interval,
            "small_job": SMALL,
            "large_job": LARGE,
            "seed": SEED,
        },
        "repeats": args.repeats,
        "median": summary,
        "small_p95_wait_memory_over_redis": (
            round(small_memory / small_redis, 2) if small_memory and small_redis else None
        ),
        "runs": runs,
    }
    print(json.dumps(report, indent=2))
    print(f"{describe(report['machine'])}", file=sys.stderr)
    for broker, figures in summary.items():
        print(f"{broker:>6}: {figures}", file=sys.stderr)


if __name__ == "__main__":
    main()
