"""What the service costs on top of the engine, and how long the server takes to start. Prints JSON.

    .venv/bin/python bench/service.py [--model-dir DIR] [--size 128] [--iterations 20] [--repeats 5]

The same job (sample content and style, one scale of --size px, --iterations L-BFGS iterations, no
previews) runs alternately
- through a real stylize-server subprocess: encoded bytes in, Stylize stream, PNG bytes out (client wall
  time from the call to the Completed event), and
- through the engine in this process: the same Runtime the server builds (torch extractor, ONNX Runtime
  targets), from decoded images to the result tensor.
Alternating (A B B A ...) keeps slow drifts of a shared machine and the order within a pair out of the
ratio; medians are reported.
The overhead includes request decoding, queueing, event conversion, the final PNG encoding and gRPC.
Voluntary context switches per job (all threads of the server process, or of this one for the engine
side; Linux) show whether OpenMP's threads spin at their barriers or sleep at each one.

Start-up time: from spawning the process to health SERVING (imports, artifact, ONNX Runtime session,
parity probe), median of --startups runs; `serving_after_seconds` is the server's own figure (from the
start of its main loop), without interpreter start and imports.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # bench.machine, and the tests' server harness

from serverproc import ServerProcess, export_random_model, sample, scrape  # noqa: E402

from bench.machine import machine_info  # noqa: E402
from stylize.api.options import Limits  # noqa: E402
from stylize.server import convert  # noqa: E402
from stylize.server.config import parse_config  # noqa: E402
from stylize.server.engine.records import Result  # noqa: E402
from stylize.server.runtime import Runtime  # noqa: E402
from stylize.v1 import stylize_pb2 as pb  # noqa: E402
from stylize.v1 import stylize_pb2_grpc  # noqa: E402

SAMPLES = ROOT / "assets" / "samples"
SERVING_AFTER = re.compile(r"SERVING after (\d+\.\d+) s")


def the_request(size: int, iterations: int, precision: str) -> pb.StylizeRequest:
    return pb.StylizeRequest(
        content_image=(SAMPLES / "chelsea.png").read_bytes(),
        styles=[pb.StyleImage(image=(SAMPLES / "coffee.png").read_bytes())],
        options=pb.StyleOptions(
            size=size,
            min_size=size,
            initial_iterations=iterations,
            precision=pb.Precision.Value(f"PRECISION_{precision.upper()}"),
        ),
    )


def voluntary_switches(pid: int) -> int | None:
    """Voluntary context switches of every thread of process `pid` so far; None where /proc cannot say."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for task in tasks:
        try:
            status = Path(f"/proc/{pid}/task/{task}/status").read_text()
        except OSError:  # the thread ended
            continue
        total += int(status.split("voluntary_ctxt_switches:")[1].split()[0])
    return total


def switches_between(pid: int, before: int | None) -> int | None:
    after = voluntary_switches(pid)
    return None if before is None or after is None else after - before


@dataclass
class Stages:
    """Where one service call's time went: the client's total, the server's figures for the job."""

    total: float
    # From acceptance (after decoding) to a worker taking the job.
    queue: float
    # On the worker: the engine (targets and optimization) and the final encode.
    run: float
    # Of the server process during the call.
    switches: int | None


def through_service(
    stub: stylize_pb2_grpc.StyleTransferStub, request: pb.StylizeRequest, server_pid: int
) -> Stages:
    switches = voluntary_switches(server_pid)
    began = time.perf_counter()
    for event in stub.Stylize(request):
        if event.HasField("completed"):
            total = time.perf_counter() - began
            return Stages(
                total,
                event.completed.queue_seconds,
                event.completed.run_seconds,
                switches_between(server_pid, switches),
            )
    raise RuntimeError("the stream ended without a result")


def phase_means(metrics_url: str) -> dict[str, float]:
    """Mean seconds per job of each phase the server's workers time (stylize_job_phase_seconds)."""
    samples = scrape(metrics_url)
    means = {}
    for phase in ("targets", "optimize", "encode"):
        count = sample(samples, "stylize_job_phase_seconds_count", phase=phase) or 0
        means[phase] = round((sample(samples, "stylize_job_phase_seconds_sum", phase=phase) or 0) / count, 4)
    return means


def decode_seconds(request: pb.StylizeRequest, limits: Limits, repeats: int = 5) -> float:
    """The server's decoding and validation of the request (done before the job is queued)."""
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        convert.request_from_proto(request, limits)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def through_engine(runtime: Runtime, job: convert.JobRequest) -> tuple[float, int | None]:
    """(seconds, voluntary context switches of this process)."""
    switches = voluntary_switches(os.getpid())
    began = time.perf_counter()
    _, records = runtime.run(job, threading.Event(), 0)
    results = [record for record in records if isinstance(record, Result)]
    assert len(results) == 1
    return time.perf_counter() - began, switches_between(os.getpid(), switches)


def median_or_none(values: list[int | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known and len(known) == len(values) else None


def startup(model_dir: Path, device: str, env: dict[str, str]) -> tuple[float, float]:
    """(seconds from spawn to SERVING, the server's own 'SERVING after' figure)."""
    began = time.perf_counter()
    with ServerProcess(model_dir, "--device", device, env=env) as server:
        spawn_to_serving = time.perf_counter() - began
        own = float(SERVING_AFTER.search(server.log())[1])
    return spawn_to_serving, own


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, help="artifact to use (default: export random weights)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--startups", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "auto"),
        default="fp32",
        help="the request's precision, the same on both sides (fp32: what the overhead goal is stated in)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch/OpenMP threads on both sides (0: torch's default). On a shared, oversubscribed CPU, 1 "
        "avoids OpenMP barrier stalls that make single runs vary tenfold",
    )
    args = parser.parse_args()
    env = {}
    if args.threads:
        torch.set_num_threads(args.threads)
        env = {"OMP_NUM_THREADS": str(args.threads)}

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model_dir or export_random_model(Path(scratch))
        startups = [startup(model_dir, args.device, env) for _ in range(args.startups)]

        request = the_request(args.size, args.iterations, args.precision)
        # Both sides with the same torch threads: the Runtime sets them process-wide from --threads.
        thread_flags = ["--threads", str(args.threads)] if args.threads else []
        config = parse_config(
            ["--model-dir", str(model_dir), "--device", args.device, *thread_flags], environ={}
        )
        runtime = Runtime(config)
        job = convert.request_from_proto(request, config.limits)
        service_runs, engine_runs = [], []
        with ServerProcess(model_dir, "--device", args.device, *thread_flags, env=env) as server:
            stub = stylize_pb2_grpc.StyleTransferStub(grpc.insecure_channel(server.address))
            pid = server.process.pid
            through_service(stub, request, pid)  # warm-up: first-call allocations on both sides
            through_engine(runtime, job)
            for repeat in range(args.repeats):
                # A B B A ...: whatever the position in a pair costs falls on both sides alike.
                if repeat % 2 == 0:
                    service_runs.append(through_service(stub, request, pid))
                    engine_runs.append(through_engine(runtime, job))
                else:
                    engine_runs.append(through_engine(runtime, job))
                    service_runs.append(through_service(stub, request, pid))

            phases = phase_means(server.metrics_url)  # the warm-up job included
        decoding = decode_seconds(request, config.limits)

    service = statistics.median(run.total for run in service_runs)
    engine = statistics.median(seconds for seconds, _ in engine_runs)
    worker = statistics.median(run.run for run in service_runs)
    queue = statistics.median(run.queue for run in service_runs)
    print(
        json.dumps(
            {
                "benchmark": "service_overhead",
                "machine": machine_info(),
                "device": args.device,
                "threads": args.threads or torch.get_num_threads(),
                "size": args.size,
                "iterations": args.iterations,
                "precision": args.precision,
                "repeats": args.repeats,
                "service_seconds_median": round(service, 4),
                "engine_seconds_median": round(engine, 4),
                "overhead_ratio": round(service / engine - 1, 4),
                "goal_overhead_ratio": 0.05,
                "service_seconds": [round(run.total, 4) for run in service_runs],
                # Medians per job. `worker` is the engine plus the final encode on the server's worker;
                # the rest of a call is decoding, the queue, transport and the handoffs between threads.
                "service_split_seconds": {
                    "decode_and_validate": round(decoding, 4),
                    "queue": round(queue, 4),
                    "worker": round(worker, 4),
                    "worker_phases_mean": phases,
                    "transport_and_handoff": round(service - worker - queue - decoding, 4),
                },
                "worker_over_engine_ratio": round(worker / engine - 1, 4),
                "engine_seconds": [round(seconds, 4) for seconds, _ in engine_runs],
                "voluntary_context_switches_per_job_median": {
                    "service": median_or_none([run.switches for run in service_runs]),
                    "engine": median_or_none([switches for _, switches in engine_runs]),
                },
                "startup_seconds_median": round(statistics.median(s for s, _ in startups), 3),
                "serving_after_seconds_median": round(statistics.median(o for _, o in startups), 3),
                "startup_seconds": [round(s, 3) for s, _ in startups],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
