"""The engine's optimization loop under torch.profiler: the top operators per iteration. Prints JSON.

    .venv/bin/python -m bench.profile [--size 128] [--iterations 5] [--warmup 2] [--optimizer lbfgs]
                                      [--precision fp32] [--threads N] [--sort self] [--top 25]

One job (chelsea.png with hubble_deep_field.jpg, one scale of --size px, seeded random VGG19 weights: speed
does not depend on the weights' values) runs --warmup iterations unprofiled, then --iterations under the
profiler. Per operator: calls per iteration, self CPU milliseconds per iteration (the operator's own time,
without the operators it calls) and total CPU milliseconds per iteration (with them). A table goes to
stderr. `--stacks` adds the Python lines that called each of the top copy-like operators (copy_, to,
contiguous, clone, clamp), which shows where layout conversions and casts come from.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from bench.machine import machine_info  # noqa: E402
from stylize.api.options import DEFAULTS, Optimizer, Precision  # noqa: E402
from stylize.model.vgg import VGGFeatures, random_state_dict  # noqa: E402
from stylize.server.engine.imageio import pil_to_tensor  # noqa: E402
from stylize.server.engine.records import Progress, Started  # noqa: E402
from stylize.server.engine.run import stylize  # noqa: E402

SAMPLES = ROOT / "assets" / "samples"
COPY_LIKE = ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone", "aten::clamp")
# Frames of these files say nothing about who called the operator.
SKIPPED_FRAMES = ("torch/", "contextlib", "<built-in", "bench/profile.py")


def load(name: str) -> torch.Tensor:
    return pil_to_tensor(Image.open(SAMPLES / name))


def caller_lines(prof: profile, names: tuple[str, ...], per_name: int = 4) -> dict[str, list[dict[str, Any]]]:
    """Per operator name: the innermost project frames that called it, most calls first."""
    calls: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for event in prof.events():
        if event.name not in names:
            continue
        frames = [frame for frame in event.stack if not any(skip in frame for skip in SKIPPED_FRAMES)]
        calls[event.name][" <- ".join(frames[:2]) or "(no Python frame)"] += 1
    return {
        name: [
            {"calls": count, "from": where}
            for where, count in sorted(sites.items(), key=lambda item: -item[1])[:per_name]
        ]
        for name, sites in calls.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=5, help="profiled iterations")
    parser.add_argument("--warmup", type=int, default=2, help="iterations before the profiler starts")
    parser.add_argument("--optimizer", choices=[o.value for o in Optimizer], default=DEFAULTS.optimizer.value)
    parser.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--sort", choices=("self", "total", "calls"), default="self")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--stacks", action="store_true", help="where the copy-like operators are called")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    extractor = VGGFeatures().load_weights(random_state_dict(0)).to(device)
    options = replace(
        DEFAULTS,
        size=args.size,
        min_size=args.size,
        initial_iterations=args.warmup + args.iterations,
        optimizer=Optimizer(args.optimizer),
        precision=Precision(args.precision),
    )
    job = stylize(
        load("chelsea.png"), [(load("hubble_deep_field.jpg"), 1.0)], options, extractor, device=device
    )
    started = next(job)
    assert isinstance(started, Started)
    for _ in range(args.warmup):
        assert isinstance(next(job), Progress)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, with_stack=args.stacks) as prof:
        for _ in range(args.iterations):
            assert isinstance(next(job), Progress)
    job.close()

    n = args.iterations
    rows = [
        {
            "operator": event.key,
            "calls_per_iteration": round(event.count / n, 2),
            "self_cpu_ms_per_iteration": round(event.self_cpu_time_total / 1e3 / n, 3),
            "cpu_ms_per_iteration": round(event.cpu_time_total / 1e3 / n, 3),
        }
        for event in prof.key_averages()
    ]
    key = {
        "self": "self_cpu_ms_per_iteration",
        "total": "cpu_ms_per_iteration",
        "calls": "calls_per_iteration",
    }
    rows.sort(key=lambda row: -row[key[args.sort]])
    top = rows[: args.top]
    # The loop's wall time per iteration is about the self time of all operators (one thread issues them).
    self_total = sum(row["self_cpu_ms_per_iteration"] for row in rows)
    print(f"{'operator':40} {'calls/it':>9} {'self ms/it':>11} {'total ms/it':>12}", file=sys.stderr)
    for row in top:
        print(
            f"{row['operator'][:40]:40} {row['calls_per_iteration']:9.1f} "
            f"{row['self_cpu_ms_per_iteration']:11.3f} {row['cpu_ms_per_iteration']:12.3f}",
            file=sys.stderr,
        )
    print(f"{'all operators, self':40} {'':9} {self_total:11.3f}", file=sys.stderr)
    report: dict[str, Any] = {
        "benchmark": "profile",
        "machine": machine_info(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "size": args.size,
        "scale": [started.scales[0][0], started.scales[0][1]],
        "optimizer": args.optimizer,
        "precision": started.precision,
        "weights": "random (seeded)",
        "warmup_iterations": args.warmup,
        "profiled_iterations": n,
        "self_cpu_ms_per_iteration_all_operators": round(self_total, 3),
        "top_operators": top,
        "copy_like_operators": [row for row in rows if row["operator"] in COPY_LIKE],
    }
    if args.stacks:
        report["copy_like_callers"] = caller_lines(prof, COPY_LIKE)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
