"""Coarse-to-fine against single-scale on the real VGG19: time against quality. Prints JSON.

    python -m bench.schedule [--edge 256] [--pairs 1] [--first-pair 0] [--single-iterations 150]
    python -m bench.schedule --merge A.json B.json ... [--markdown]

Every schedule optimizes the engine's default loss (what a caller who names no preset gets) in fp32 on
one content/style pair of bench/quality.py, with an output of --edge px, and every result is scored
three ways on the real ImageNet VGG19 (`imagenet-q8`, fp32, at the output size):

- content error and style error, bench/quality.py's measures (relative relu4_2 feature error to the
  content; mean relative Gram error over relu1_1..relu5_1 to the style);
- the fixed Gatys objective: content relu4_2 plus Gram style relu1_1..relu5_1 with
  `loss_normalization` GATYS (content 1/2 sum (F - P)^2, style per layer 1/(4 N^2 M^2) sum (G - A)^2),
  content weight 1 and style weight 1e3 (the gatys2016 preset's alpha/beta = 1e-3), no TV: one number
  that does not depend on what a schedule optimized.

The single-scale run is scored every --checkpoint iterations (scoring is outside its time), so each
multi-scale result can be set against the time single-scale needs to reach the same score: "single-scale
seconds to match" (linear between checkpoints; null when it never gets there within its iterations).
Times are the engine's own (the generator's next() calls), fp32, this process's torch threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from bench.machine import describe, machine_info  # noqa: E402
from bench.quality import (  # noqa: E402
    CONTENT_LAYER,
    PAIRS,
    STYLE_LAYERS,
    Scorer,
    load,
    real_extractor,
)
from stylize.api.options import DEFAULTS, LossNormalization, Precision, StyleOptions  # noqa: E402
from stylize.api.schedule import fit  # noqa: E402
from stylize.server.engine.losses import ContentLoss, GramStyleLoss  # noqa: E402
from stylize.server.engine.records import Progress, Result, Started  # noqa: E402
from stylize.server.engine.run import stylize  # noqa: E402

GATYS_CONTENT_WEIGHT = 1.0
GATYS_STYLE_WEIGHT = 1e3
MEASURES = ("gatys_objective", "content_error", "style_error")


def schedules(edge: int, single_iterations: int) -> dict[str, StyleOptions]:
    """The candidates, all from the engine's defaults in fp32 (the defaults' 128 px start kept at 256 px:
    min_size = edge / 2)."""
    base = dataclasses.replace(DEFAULTS, size=edge, precision=Precision.FP32)
    coarse = max(16, edge // 2)
    return {
        f"single scale {edge}, {single_iterations} it.": dataclasses.replace(
            base, min_size=edge, initial_iterations=single_iterations
        ),
        f"defaults: {coarse} -> {edge} by sqrt 2, 200 + 100 + 100": dataclasses.replace(
            base, min_size=coarse
        ),
        f"fast-preview style: {coarse} -> {edge} by 2, 40 + 20": dataclasses.replace(
            base, min_size=coarse, scale_factor=2.0, initial_iterations=40, iterations=20
        ),
        f"handover: {coarse} -> {edge} by sqrt 2, 50 + 50 + 50": dataclasses.replace(
            base, min_size=coarse, initial_iterations=50, iterations=50
        ),
    }


class GatysObjective:
    """The fixed objective at the output size, with the engine's own loss modules (GATYS normalization)."""

    def __init__(self, scorer: Scorer):
        with torch.no_grad():
            content_features = scorer.network(scorer.content)[CONTENT_LAYER]
        self.network = scorer.network
        self.content = ContentLoss(content_features, LossNormalization.GATYS)
        self.style = {
            name: GramStyleLoss(gram, LossNormalization.GATYS) for name, gram in scorer.style_grams.items()
        }

    def __call__(self, image: torch.Tensor) -> float:
        with torch.no_grad():
            features = self.network(image[None].float())
            style = sum(float(loss(features[name])) for name, loss in self.style.items()) / len(self.style)
            return (
                GATYS_CONTENT_WEIGHT * float(self.content(features[CONTENT_LAYER]))
                + GATYS_STYLE_WEIGHT * style
            )


def run(
    content: torch.Tensor,
    style: torch.Tensor,
    options: StyleOptions,
    extractor: Any,
    score: Any,
    checkpoint: int,
) -> dict[str, Any]:
    """One job; its final scores and, every `checkpoint` iterations of its last scale, (seconds, scores)."""
    job = stylize(
        content, [(style, 1.0)], options, extractor, device=torch.device("cpu"), preview_every=checkpoint
    )
    seconds = 0.0
    curve = []
    result = None
    started = None
    while True:
        began = time.perf_counter()
        try:
            record = next(job)
        except StopIteration:
            break
        seconds += time.perf_counter() - began
        if isinstance(record, Started):
            started = record
        elif isinstance(record, Progress) and record.image is not None and record.scale == record.scales - 1:
            curve.append({"iteration": record.iteration, "seconds": round(seconds, 2), **score(record.image)})
        elif isinstance(record, Result):
            result = record
    assert started is not None and result is not None
    return {
        "seconds": round(seconds, 2),
        "iterations": result.iterations,
        "scales": [list(scale) for scale in started.scales],
        **score(result.image),
        "curve": curve,
    }


def seconds_to_reach(curve: list[dict[str, Any]], measure: str, value: float) -> float | None:
    """When a (decreasing) measure of the single-scale run first reaches `value`, linear in between."""
    previous = None
    for point in curve:
        if point[measure] <= value:
            if previous is None:
                return float(point["seconds"])
            fraction = (previous[measure] - value) / (previous[measure] - point[measure])
            return round(previous["seconds"] + fraction * (point["seconds"] - previous["seconds"]), 2)
        previous = point
    return None


def main_run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    extractor, resolved = real_extractor()
    chosen = schedules(args.edge, args.single_iterations)
    single = next(iter(chosen))
    info = machine_info()
    print(describe(info), file=sys.stderr)
    pairs = PAIRS[args.first_pair : args.first_pair + args.pairs]
    rows = []
    for content_name, style_name in pairs:
        content, style = load(content_name), load(style_name)
        width, height = fit(args.edge, (content.shape[-1], content.shape[-2]))
        scorer = Scorer(extractor, content, style, (height, width))
        objective = GatysObjective(scorer)

        def score(
            image: torch.Tensor, scorer: Scorer = scorer, objective: GatysObjective = objective
        ) -> dict[str, float]:
            scores = scorer.score(image.float())
            return {
                "gatys_objective": round(objective(image), 6),
                "content_error": round(float(scores["content_error"]), 4),
                "style_error": round(float(scores["style_error"]), 4),
            }

        pair = f"{Path(content_name).stem}/{Path(style_name).stem}"
        # Warm-up: kernel selection at each of the sizes the schedules use.
        warm = dataclasses.replace(
            chosen[single], initial_iterations=2, min_size=args.edge // 2, iterations=2
        )
        run(content, style, warm, extractor, score, checkpoint=0)
        results = {}
        for name, options in chosen.items():
            results[name] = run(
                content, style, options, extractor, score, args.checkpoint if name == single else 0
            )
            r = results[name]
            print(
                f"{pair} {name:45s} {r['seconds']:7.1f} s  gatys {r['gatys_objective']:.4g}"
                f"  content {r['content_error']:.3f}  style {r['style_error']:.3f}",
                file=sys.stderr,
                flush=True,
            )
        curve = results[single]["curve"]
        for name, result in results.items():
            result["single_scale_seconds_to_match"] = {
                measure: seconds_to_reach(curve, measure, result[measure]) for measure in MEASURES
            }
            rows.append({"pair": pair, "schedule": name, **result})
    report = {
        "benchmark": "schedule",
        "machine": info,
        "threads": torch.get_num_threads(),
        "edge": args.edge,
        "precision": "fp32",
        "weights": {"kind": resolved.kind, "source": resolved.source, "sha256": resolved.sha256},
        "objective": {
            "content": CONTENT_LAYER,
            "style": list(STYLE_LAYERS),
            "loss_normalization": "gatys",
            "content_weight": GATYS_CONTENT_WEIGHT,
            "style_weight": GATYS_STYLE_WEIGHT,
        },
        "command": " ".join(["python -m bench.schedule", *sys.argv[1:]]),
        "results": rows,
    }
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


def main_merge(args: argparse.Namespace) -> int:
    rows = [row for path in args.merge for row in json.loads(Path(path).read_text())["results"]]
    names = list(dict.fromkeys(row["schedule"] for row in rows))
    table = []
    for name in names:
        mine = [row for row in rows if row["schedule"] == name]
        entry: dict[str, Any] = {"schedule": name, "pairs": len(mine)}
        for key in ("seconds", *MEASURES):
            entry[key] = statistics.median(row[key] for row in mine)
        for measure in MEASURES:
            matched = [row["single_scale_seconds_to_match"][measure] for row in mine]
            entry[f"single_scale_seconds_to_match_{measure}"] = (
                statistics.median(matched) if all(m is not None for m in matched) else None
            )
            entry[f"single_scale_never_matched_{measure}"] = sum(m is None for m in matched)
        table.append(entry)
    json.dump({"benchmark": "schedule_medians", "medians": table}, sys.stdout, indent=2)
    print()
    if args.markdown:
        print(
            "| schedule | seconds | Gatys objective | content error | style error | single scale to match "
            "(objective / content / style) |\n|---|---:|---:|---:|---:|---|",
            file=sys.stderr,
        )
        for e in table:
            match = " / ".join(
                "never"
                if e[f"single_scale_never_matched_{m}"]
                else f"{e[f'single_scale_seconds_to_match_{m}']:.1f} s"
                for m in MEASURES
            )
            print(
                f"| {e['schedule']} | {e['seconds']:.1f} | {e['gatys_objective']:.4g} "
                f"| {e['content_error']:.3f} | {e['style_error']:.3f} | {match} |",
                file=sys.stderr,
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edge", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument("--first-pair", type=int, default=0)
    parser.add_argument("--single-iterations", type=int, default=150)
    parser.add_argument("--checkpoint", type=int, default=10, help="single-scale scoring interval")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="medians over the runs' pairs instead")
    parser.add_argument("--markdown", action="store_true", help="with --merge: a markdown table on stderr")
    args = parser.parse_args(argv)
    return main_merge(args) if args.merge else main_run(args)


if __name__ == "__main__":
    raise SystemExit(main())
