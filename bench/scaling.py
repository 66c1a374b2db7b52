"""How the cost of a job grows with image size: time per iteration and peak memory. Prints JSON.

    .venv/bin/python -m bench.scaling [--model-dir DIR] [--sizes 128 256 512] [--iterations 4]

Each size runs in a fresh Python process (peak memory is a high-water mark: it cannot be reset inside
one process) that builds what the server builds (stylize.server.runtime.Runtime: torch extractor, ONNX
Runtime session, parity probe) and runs one job the server's way: sample content and style, the engine's
default options except one scale of SIZE px (the content's longest edge; chelsea.png is 3:2) and
--iterations L-BFGS iterations, no previews. Reported per size:
- seconds_per_iteration: median over the iterations after the first (the first also computes the style
  and content targets and warms up the allocator), with seconds_per_megapixel_iteration;
- targets_and_first_iteration_seconds;
- peak RSS of the process after start-up (imports, model, ORT session, probe) and after the job
  (resource.getrusage ru_maxrss), and their difference: the job's own peak memory on top of a started
  server (0 when the job stayed under the start-up peak).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # bench.machine, and the tests' exporter

from serverproc import export_random_model  # noqa: E402

from bench.machine import describe, machine_info  # noqa: E402

SAMPLES = ROOT / "assets" / "samples"
SIZES = (128, 256, 512)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def one_size(model_dir: Path, size: int, iterations: int, device: str) -> dict[str, object]:
    """Runs in the child process."""
    from stylize.server import convert
    from stylize.server.config import parse_config
    from stylize.server.engine.records import Progress
    from stylize.server.runtime import Runtime
    from stylize.v1 import stylize_pb2 as pb

    config = parse_config(["--model-dir", str(model_dir), "--device", device], environ={})
    runtime = Runtime(config)
    request = pb.StylizeRequest(
        content_image=(SAMPLES / "chelsea.png").read_bytes(),
        styles=[pb.StyleImage(image=(SAMPLES / "coffee.png").read_bytes())],
        options=pb.StyleOptions(size=size, min_size=size, initial_iterations=iterations),
    )
    job = convert.request_from_proto(request, config.limits)
    startup_peak = peak_rss_bytes()
    _, records = runtime.run(job, threading.Event(), 0)
    times, width, height = [], 0, 0
    began = time.perf_counter()
    for record in records:
        now = time.perf_counter()
        if isinstance(record, Progress):
            times.append(now - began)
            width, height = record.width, record.height
        began = now
    job_peak = peak_rss_bytes()
    per_iteration = statistics.median(times[1:])
    return {
        "size": size,
        "width": width,
        "height": height,
        "iterations": len(times),
        "seconds_per_iteration": round(per_iteration, 4),
        "seconds_per_megapixel_iteration": round(per_iteration / (width * height / 1e6), 4),
        "targets_and_first_iteration_seconds": round(times[0], 4),
        "startup_peak_rss_bytes": startup_peak,
        "job_peak_rss_bytes": job_peak,
        "job_rss_increment_bytes": job_peak - startup_peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, help="artifact to use (default: export random weights)")
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--iterations", type=int, default=4, help="L-BFGS iterations per job (>= 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one size, in a fresh process
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_size(args.model_dir, args.child, args.iterations, args.device)))
        return

    machine = machine_info()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model_dir or export_random_model(Path(scratch))
        for size in args.sizes:
            command = [sys.executable, "-m", "bench.scaling", "--child", str(size)]
            command += ["--model-dir", str(model_dir), "--iterations", str(args.iterations)]
            command += ["--device", args.device]
            child = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
            if child.returncode != 0:
                raise SystemExit(f"size {size} failed ({child.returncode}):\n{child.stderr}")
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    print(
        json.dumps(
            {"benchmark": "scaling", "machine": machine, "device": args.device, "results": rows}, indent=2
        )
    )
    table = [f"job cost by size ({describe(machine)})"]
    table += [
        f"  {r['width']}x{r['height']:<4} {r['seconds_per_iteration']:8.3f} s/it  "
        f"{r['seconds_per_megapixel_iteration']:8.3f} s/Mpx-it  "
        f"peak RSS {r['job_peak_rss_bytes'] / 2**20:6.0f} MiB "
        f"(+{r['job_rss_increment_bytes'] / 2**20:.0f} over start-up)"
        for r in rows
    ]
    print("\n".join(table), file=sys.stderr)


if __name__ == "__main__":
    main()
