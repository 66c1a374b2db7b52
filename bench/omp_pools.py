"""One engine job on a worker thread, with and without a second OpenMP pool alive in the process. Prints JSON.

    .venv/bin/python -m bench.omp_pools [--model-dir DIR] [--size 128] [--iterations 20] [--threads 2]

libgomp gives every thread that runs a parallel region a pool of team threads, kept until that thread
ends, and counts the threads of all pools together; while they outnumber the usable cores, its threads
spin only briefly at a barrier before they sleep on a futex. The service once hit that: the Runtime's
start-up ran torch on an asyncio executor thread, which keeps its pool, beside the worker's.

Nothing torch runs on the main thread here. A worker thread (T1) builds the Runtime (its start-up runs on
a thread of its own that ends) and runs every job. `second_pool` runs have another thread (T2) alive that
has run one parallel region, as the executor thread had; `alone` runs have none. The two alternate (A B B A
...), medians are reported, with each job's voluntary context switches (all threads; Linux): in the
throttled state every parallel region costs a sleep and a wake-up.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # bench.*, and the tests' export helper

from serverproc import export_random_model  # noqa: E402

from bench.machine import machine_info  # noqa: E402
from bench.service import the_request, voluntary_switches  # noqa: E402
from stylize.server import convert  # noqa: E402
from stylize.server.config import parse_config  # noqa: E402
from stylize.server.engine.records import Result  # noqa: E402
from stylize.server.runtime import Runtime  # noqa: E402


class Worker:
    """A long-lived thread that runs the calls it is given, one at a time."""

    def __init__(self, name: str):
        self._calls: queue.Queue[Callable[[], Any] | None] = queue.Queue()
        self._results: queue.Queue[tuple[bool, Any]] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (call := self._calls.get()) is not None:
            try:
                self._results.put((True, call()))
            except BaseException as error:  # handed to the caller
                self._results.put((False, error))

    def call(self, work: Callable[[], Any]) -> Any:
        self._calls.put(work)
        ok, value = self._results.get()
        if not ok:
            raise value
        return value

    def stop(self) -> None:
        self._calls.put(None)
        self._thread.join()


def one_parallel_region() -> None:
    """Work torch splits over its threads: the calling thread's OpenMP pool exists afterwards."""
    torch.ones(1 << 20).add_(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, help="artifact to use (default: export random weights)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model_dir or export_random_model(Path(scratch))
        config = parse_config(
            ["--model-dir", str(model_dir), "--device", "cpu", "--threads", str(args.threads)], environ={}
        )
        worker = Worker("T1")
        runtime: Runtime = worker.call(lambda: Runtime(config))
    job = convert.request_from_proto(the_request(args.size, args.iterations, "fp32"), config.limits)

    def run() -> tuple[float, int | None]:
        before = voluntary_switches(os.getpid())
        began = time.perf_counter()
        _, records = runtime.run(job, threading.Event(), 0)
        assert sum(isinstance(record, Result) for record in records) == 1
        seconds = time.perf_counter() - began
        after = voluntary_switches(os.getpid())
        return seconds, None if before is None or after is None else after - before

    worker.call(run)  # warm-up
    runs: dict[str, list[tuple[float, int | None]]] = {"alone": [], "second_pool": []}
    for repeat in range(args.repeats):
        for mode in ("alone", "second_pool") if repeat % 2 == 0 else ("second_pool", "alone"):
            if mode == "alone":
                runs[mode].append(worker.call(run))
                continue
            holder = Worker("T2")
            holder.call(one_parallel_region)
            runs[mode].append(worker.call(run))
            holder.stop()  # its pool ends with it
    medians = {mode: statistics.median(seconds for seconds, _ in values) for mode, values in runs.items()}
    switches = {
        mode: (
            statistics.median(count for _, count in values if count is not None)
            if all(count is not None for _, count in values)
            else None
        )
        for mode, values in runs.items()
    }
    print(
        json.dumps(
            {
                "benchmark": "omp_pools",
                "machine": machine_info(),
                "threads": args.threads,
                "size": args.size,
                "iterations": args.iterations,
                "precision": "fp32",
                "repeats": args.repeats,
                "seconds_median": {mode: round(value, 4) for mode, value in medians.items()},
                "second_pool_over_alone_ratio": round(medians["second_pool"] / medians["alone"] - 1, 4),
                "voluntary_context_switches_per_job_median": switches,
                "seconds": {mode: [round(s, 4) for s, _ in values] for mode, values in runs.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
