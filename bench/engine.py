"""Engine benchmark: seconds per iteration and pixel-iterations per second of `stylize`.

    python -m bench.engine [--quick] [--edges 128 256 512] [--threads N]
    python bench/engine.py --quick

Prints one JSON document on stdout and a short table on stderr. What it measures:

- per edge (square image, 128/256/512 px), per precision (fp32, bf16) and optimizer (Adam,
  L-BFGS): the median wall time of one iteration through the real loop (`stylize`'s
  generator: forward, losses, backward, step, one Progress record), after warm-up
  iterations. The four configurations of an edge run interleaved, one iteration each in
  turn, so a neighbour's load on a shared machine hits them alike and the bf16/fp32
  ratios stay fair even when the absolute times are noisy;
- a coarse-to-fine run against a single-scale run with the same total iterations at
  256 px: time and the final losses (evaluated at the final 256 px image).

The VGG weights are random (seeded): speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

from bench.machine import machine_info
from stylize.export.vgg import VGGFeatures, random_state_dict
from stylize.server.engine import schedule
from stylize.server.engine.imageio import pil_to_tensor
from stylize.server.engine.options import DEFAULTS, StyleOptions
from stylize.server.engine.records import Progress, Result
from stylize.server.engine.run import stylize

SAMPLES = Path(__file__).resolve().parent.parent / "assets" / "samples"
CPU_AND_GPU_NOTE = "CUDA timings include a device sync per iteration (the Progress record reads the losses)."


def square(image: torch.Tensor) -> torch.Tensor:
    height, width = image.shape[1:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return image[:, top : top + side, left : left + side]


def load(name: str) -> torch.Tensor:
    return pil_to_tensor(Image.open(SAMPLES / name))


def iteration_times(
    configs: dict[str, StyleOptions], content, style, extractor, device, warmup: int, measured: int
) -> dict[str, list[float]]:
    """Step the jobs of `configs` round-robin, one iteration each in turn; seconds per iteration."""
    jobs: dict[str, Iterator] = {
        name: stylize(content, [(style, 1.0)], options, extractor, device=device)
        for name, options in configs.items()
    }
    times: dict[str, list[float]] = {name: [] for name in configs}
    for step in range(warmup + measured):
        for name, job in jobs.items():
            start = time.perf_counter()
            record = next(job)
            elapsed = time.perf_counter() - start
            assert isinstance(record, Progress)
            if step >= warmup:
                times[name].append(elapsed)
    for job in jobs.values():
        job.close()
    return times


def speed_table(edges, content, style, extractor, device, warmup, measured) -> tuple[list[dict], dict]:
    rows, speedups = [], {}
    for edge in edges:
        configs = {
            (precision, optimizer): dataclasses.replace(
                DEFAULTS,
                size=edge,
                min_size=edge,
                initial_iterations=warmup + measured + 1,
                precision=precision,
                optimizer=optimizer,
            )
            for optimizer in ("adam", "lbfgs")
            for precision in ("fp32", "bf16")
        }
        named = {f"{p}/{o}": options for (p, o), options in configs.items()}
        times = iteration_times(named, content, style, extractor, device, warmup, measured)
        width, height = schedule.fit(edge, (content.shape[2], content.shape[1]))
        medians = {}
        for (precision, optimizer), _ in configs.items():
            samples = times[f"{precision}/{optimizer}"]
            seconds = statistics.median(samples)
            medians[precision, optimizer] = seconds
            rows.append(
                {
                    "edge": edge,
                    "width": width,
                    "height": height,
                    "precision": precision,
                    "optimizer": optimizer,
                    "seconds_per_iteration": round(seconds, 5),
                    "pixel_iterations_per_second": round(width * height / seconds),
                    "samples": len(samples),
                    "min_seconds": round(min(samples), 5),
                }
            )
            print(
                f"{edge:5d} px  {precision:5s} {optimizer:6s} {seconds:8.4f} s/it  "
                f"{width * height / seconds / 1e6:7.3f} Mpx-it/s",
                file=sys.stderr,
                flush=True,
            )
        speedups[str(edge)] = {
            optimizer: round(medians["fp32", optimizer] / medians["bf16", optimizer], 3)
            for optimizer in ("adam", "lbfgs")
        }
        print(f"{edge:5d} px  bf16 speed-up over fp32: {speedups[str(edge)]}", file=sys.stderr, flush=True)
    return rows, speedups


def finish(options: StyleOptions, content, style, extractor, device) -> dict:
    start = time.perf_counter()
    result = None
    for record in stylize(content, [(style, 1.0)], options, extractor, device=device):
        if isinstance(record, Result):
            result = record
    seconds = time.perf_counter() - start
    plan = schedule.plan_for(options, (content.shape[2], content.shape[1]))
    return {
        "scales": [{"width": s.width, "height": s.height, "iterations": s.iterations} for s in plan],
        "iterations": result.iterations,
        "seconds": round(seconds, 3),
        "losses": dataclasses.asdict(result.losses),
    }


def multiscale_comparison(edge, total, content, style, extractor, device) -> dict:
    """Coarse-to-fine (from edge/2, sqrt 2 steps) against one scale, both `total` iterations."""
    scales = schedule.scale_count(edge, edge // 2, DEFAULTS.scale_factor)
    later = total // (2 * (scales - 1))  # half the budget at the first scale, the rest shared
    multi = dataclasses.replace(
        DEFAULTS,
        size=edge,
        min_size=edge // 2,
        initial_iterations=total - later * (scales - 1),
        iterations=later,
    )
    single = dataclasses.replace(DEFAULTS, size=edge, min_size=edge, initial_iterations=total)
    report = {}
    for name, options in (("multi_scale", multi), ("single_scale", single)):
        report[name] = finish(options, content, style, extractor, device)
        print(
            f"{edge:5d} px  {name:12s} {report[name]['seconds']:8.2f} s  total loss "
            f"{report[name]['losses']['total']:.4g}",
            file=sys.stderr,
            flush=True,
        )
    return {"edge": edge, "total_iterations": total, "optimizer": DEFAULTS.optimizer.value, **report}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations, 128 and 256 px only")
    parser.add_argument("--edges", type=int, nargs="+", help="square image edges (default: 128 256 512)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    edges = args.edges or ([128, 256] if args.quick else [128, 256, 512])
    warmup, measured = (2, 3) if args.quick else (3, 9)
    total = 40 if args.quick else 200

    host = machine_info()
    extractor = VGGFeatures().load_weights(random_state_dict(0)).to(device)
    content, style = square(load("chelsea.png")), load("hubble_deep_field.jpg")
    rows, speedups = speed_table(edges, content, style, extractor, device, warmup, measured)
    multiscale = multiscale_comparison(256, total, content, style, extractor, device)
    json.dump(
        {
            "machine": host,
            "settings": {
                "warmup_iterations": warmup,
                "measured_iterations": measured,
                "device": str(device),
                "note": CPU_AND_GPU_NOTE,
                "weights": "random (seeded)",
                "layers": "defaults (content relu4_2; style relu1_1..relu5_1)",
            },
            "iteration": rows,
            "bf16_speedup": speedups,
            "multiscale_vs_single_scale": multiscale,
        },
        sys.stdout,
        indent=2,
    )
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
