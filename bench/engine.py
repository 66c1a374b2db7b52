"""Engine benchmark: seconds per iteration and pixel-iterations per second of `stylize`.

    python -m bench.engine [--quick] [--edges 128 256 512] [--threads N]
    python bench/engine.py --quick

Prints one JSON document on stdout and a short table on stderr. What it measures:

- per edge (square image, 128/256/512 px), per precision (fp32, bf16, auto and what it resolved
  to) and optimizer (Adam, L-BFGS): the median wall time of one iteration through the real loop
  (`stylize`'s generator: forward, losses, backward, step, one Progress record), after warm-up
  iterations, and the same for the minimal plain-torch loop of bench/baseline.py (same weights,
  layers and style weight) as the baseline row. All configurations of an edge run interleaved,
  one iteration each in turn, so a neighbour's load on a shared machine hits them alike and the
  bf16/fp32 and engine/baseline ratios stay fair even when the absolute times are noisy;
- a coarse-to-fine run against a single-scale run with the same total iterations at
  256 px: time and the final losses (evaluated at the final 256 px image).

The VGG weights are random (seeded): speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

from bench import baseline
from bench.machine import machine_info
from bench.report import print_report
from stylize.api import schedule
from stylize.api.options import DEFAULTS, Precision, StyleOptions
from stylize.model.vgg import VGGFeatures, random_state_dict
from stylize.server.engine.imageio import pil_to_tensor
from stylize.server.engine.precision import resolve as resolve_precision
from stylize.server.engine.records import Result, Started
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


def engine_iterations(content, style, options: StyleOptions, extractor, device) -> tuple[str, Iterator]:
    """(the precision the job really runs in, its iterations: one Progress per next())."""
    job = stylize(content, [(style, 1.0)], options, extractor, device=device)
    started = next(job)
    assert isinstance(started, Started)
    return started.precision, job


def baseline_iterations(content, style, optimizer: str, extractor, device) -> Iterator:
    return baseline.iterations(
        content[None].to(device),
        style[None].to(device),
        extractor,
        content_layers=[name for name, _ in DEFAULTS.content_layers],
        style_layers=[name for name, _ in DEFAULTS.style_layers],
        style_weight=DEFAULTS.style_weight,
        optimizer=optimizer,
        learning_rate=DEFAULTS.learning_rate,
        history=DEFAULTS.lbfgs_history,
    )


def iteration_times(jobs: dict[str, Iterator], warmup: int, measured: int) -> dict[str, list[float]]:
    """Step the jobs round-robin, one iteration each in turn; seconds per iteration."""
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for step in range(warmup + measured):
        for name, job in jobs.items():
            start = time.perf_counter()
            next(job)
            elapsed = time.perf_counter() - start
            if step >= warmup:
                times[name].append(elapsed)
    for job in jobs.values():
        job.close()
    return times


PRECISIONS = ("fp32", "bf16", "auto")
OPTIMIZERS = ("adam", "lbfgs")


def speed_table(edges, content, style, extractor, device, warmup, measured) -> tuple[list[dict], dict, dict]:
    """Per edge: the engine in each precision and optimizer and the minimal loop (bench/baseline.py), all
    interleaved. The engine runs without its total-variation term, so both optimize the same objective."""
    rows, speedups, ratios = [], {}, {}
    for edge in edges:
        cropped = _resize(content, edge)
        jobs: dict[str, Iterator] = {}
        resolved: dict[str, str] = {}
        for precision in PRECISIONS:
            for optimizer in OPTIMIZERS:
                options = dataclasses.replace(
                    DEFAULTS,
                    size=edge,
                    min_size=edge,
                    initial_iterations=warmup + measured + 1,
                    tv_weight=0.0,
                    precision=precision,
                    optimizer=optimizer,
                )
                name = f"engine {precision}/{optimizer}"
                resolved[name], jobs[name] = engine_iterations(cropped, style, options, extractor, device)
        for optimizer in OPTIMIZERS:
            name = f"baseline fp32/{optimizer}"
            resolved[name] = "fp32"
            jobs[name] = baseline_iterations(cropped, style, optimizer, extractor, device)
        times = iteration_times(jobs, warmup, measured)
        width, height = cropped.shape[2], cropped.shape[1]
        medians = {}
        for name, samples in times.items():
            program, setting = name.split()
            precision, optimizer = setting.split("/")
            seconds = statistics.median(samples)
            medians[name] = seconds
            rows.append(
                {
                    "edge": edge,
                    "width": width,
                    "height": height,
                    "program": program,
                    "precision": precision,
                    "resolved_precision": resolved[name],
                    "optimizer": optimizer,
                    "seconds_per_iteration": round(seconds, 5),
                    "pixel_iterations_per_second": round(width * height / seconds),
                    "samples": len(samples),
                    "min_seconds": round(min(samples), 5),
                    "max_seconds": round(max(samples), 5),
                }
            )
            print(
                f"{edge:5d} px  {name:22s} ({resolved[name]}) {seconds:8.4f} s/it  "
                f"{width * height / seconds / 1e6:7.3f} Mpx-it/s",
                file=sys.stderr,
                flush=True,
            )
        speedups[str(edge)] = {
            o: round(medians[f"engine fp32/{o}"] / medians[f"engine bf16/{o}"], 3) for o in OPTIMIZERS
        }
        ratios[str(edge)] = {
            o: round(medians[f"engine fp32/{o}"] / medians[f"baseline fp32/{o}"], 3) for o in OPTIMIZERS
        }
        print(
            f"{edge:5d} px  bf16 speed-up over fp32: {speedups[str(edge)]}; "
            f"engine/baseline in fp32: {ratios[str(edge)]}",
            file=sys.stderr,
            flush=True,
        )
    return rows, speedups, ratios


def _resize(image: torch.Tensor, edge: int) -> torch.Tensor:
    """The square crop at edge x edge pixels."""
    resized = torch.nn.functional.interpolate(image[None], size=(edge, edge), mode="bicubic", antialias=True)
    return resized[0].clamp(0, 1)


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
    rows, speedups, ratios = speed_table(edges, content, style, extractor, device, warmup, measured)
    multiscale = multiscale_comparison(256, total, content, style, extractor, device)
    print_report(
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
            "engine_over_baseline_fp32": ratios,
            "auto_precision": {
                str(device): dataclasses.asdict(resolve_precision(Precision.AUTO, device, extractor))
            },
            "multiscale_vs_single_scale": multiscale,
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
