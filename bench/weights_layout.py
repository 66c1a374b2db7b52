"""Seconds per engine iteration with the convolution weights channels-last (as the engine makes them) and
contiguous (as they were before: every convolution then converted its weight in both passes). Prints JSON.

    .venv/bin/python -m bench.weights_layout [--sizes 128 256] [--precisions fp32 bf16] [--threads N]

Two jobs per size and precision on two copies of the same seeded random VGG19 (speed does not depend on
the weights' values), stepped in turn one iteration at a time (A B B A ...); the second job's weights are
turned back to the contiguous layout after the engine converted them. Medians after --warmup iterations.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from bench.machine import machine_info  # noqa: E402
from bench.report import print_report  # noqa: E402
from stylize.api.options import DEFAULTS, Precision  # noqa: E402
from stylize.model.vgg import VGGFeatures, random_state_dict  # noqa: E402
from stylize.server.engine.imageio import pil_to_tensor  # noqa: E402
from stylize.server.engine.records import Progress, Started  # noqa: E402
from stylize.server.engine.run import stylize  # noqa: E402

SAMPLES = ROOT / "assets" / "samples"
LAYOUTS = ("channels_last", "contiguous")


def load(name: str) -> torch.Tensor:
    return pil_to_tensor(Image.open(SAMPLES / name))


def contiguous_weights(network: torch.nn.Module) -> None:
    for parameter in network.parameters():
        if parameter.dim() == 4:
            parameter.data = parameter.data.contiguous()


def compare(size: int, precision: Precision, warmup: int, measured: int) -> dict[str, Any]:
    options = replace(
        DEFAULTS, size=size, min_size=size, initial_iterations=warmup + measured, precision=precision
    )
    content, style = load("chelsea.png"), load("hubble_deep_field.jpg")
    jobs = {}
    for layout in LAYOUTS:
        extractor = VGGFeatures().load_weights(random_state_dict(0))
        job = stylize(content, [(style, 1.0)], options, extractor, device=torch.device("cpu"))
        started = next(job)
        assert isinstance(started, Started)
        if layout == "contiguous":
            contiguous_weights(extractor)
            contiguous_weights(extractor.with_dtype(torch.bfloat16))
        jobs[layout] = job
    times: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
    losses: dict[str, float] = {}
    for step in range(warmup + measured):
        for layout in LAYOUTS if step % 2 == 0 else LAYOUTS[::-1]:
            began = time.perf_counter()
            record = next(jobs[layout])
            elapsed = time.perf_counter() - began
            assert isinstance(record, Progress)
            losses[layout] = record.losses.total
            if step >= warmup:
                times[layout].append(elapsed)
    for job in jobs.values():
        job.close()
    medians = {layout: statistics.median(values) for layout, values in times.items()}
    return {
        "size": size,
        "precision": started.precision,
        "seconds_per_iteration_median": {layout: round(value, 4) for layout, value in medians.items()},
        "channels_last_over_contiguous": round(medians["channels_last"] / medians["contiguous"] - 1, 4),
        "total_loss_after_last_iteration": losses,
        "seconds_per_iteration": {layout: [round(t, 4) for t in values] for layout, values in times.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=11, help="measured iterations per job")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes:
        for name in args.precisions:
            row = compare(size, Precision(name), args.warmup, args.iterations)
            print(
                json.dumps({k: row[k] for k in ("size", "precision", "channels_last_over_contiguous")}),
                file=sys.stderr,
            )
            rows.append(row)
    print_report(
        {
            "benchmark": "weights_layout",
            "machine": machine_info(),
            "threads": torch.get_num_threads(),
            "optimizer": DEFAULTS.optimizer.value,
            "weights": "random (seeded)",
            "warmup_iterations": args.warmup,
            "measured_iterations": args.iterations,
            "rows": rows,
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
