"""Quality benchmark: how much content each candidate keeps and how much style it takes, on the real VGG19.

    python -m bench.quality [--edge 128] [--candidates NAME ...] [--pairs N] [--save DIR]
    python -m bench.quality --merge A.json B.json ... [--plot docs/quality-front.png] [--markdown]

For each candidate options set and each content/style pair (assets/samples, SOURCES.md) it runs the
engine (stylize.server.engine.run.stylize: Started, Progress..., Result) at `--edge` px and scores
the result with the real ImageNet VGG19 (`imagenet-q8`, Caffe input) in fp32 at the output size:

- content error: ||F_relu4_2(output) - F_relu4_2(content)|| / ||F_relu4_2(content)|| (L2, relative);
- style error of layer l in relu1_1..relu5_1: ||G_l(output) - G_l(style)|| / ||G_l(style)|| (Frobenius,
  Gram averaged over positions), the style resized as the engine's KEEP_ASPECT does (its longest edge
  the output's longest edge), and their mean over the five layers;
- the same style error of the content image itself at the output size: the baseline "the style error
  falls by 90%" is measured against (fall = 1 - style error / baseline).
- the content error of the style image itself (stretched to the output size): what a result that kept
  nothing of the content would score.

The scores ignore what a candidate optimized (its loss normalization, layers and weights): every candidate
is measured by the same two numbers. Schedules are scaled to `--edge` as bench/presets.py does (size =
edge, min_size = edge / 4, the defaults' 512/128 ratio; single-scale presets stay single-scale).

Prints one JSON document on stdout and a table on stderr; `--merge` combines the JSON of several runs
(a sweep split into commands), prints the medians over pairs and optionally draws the front.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from stylize.api.options import DEFAULTS, StyleOptions
from stylize.api.presets import PRESETS
from stylize.api.schedule import fit
from stylize.server.engine.imageio import pil_to_tensor, tensor_to_pil
from stylize.server.engine.losses import gram_matrix
from stylize.server.engine.records import Progress, Result, Started
from stylize.server.engine.run import stylize

SAMPLES = Path(__file__).resolve().parent.parent / "assets" / "samples"
CONTENT_LAYER = "relu4_2"
STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
# (content, style): the bundled samples first (the README's demo pair), then the added ones.
PAIRS: tuple[tuple[str, str], ...] = (
    ("chelsea.png", "hubble_deep_field.jpg"),
    ("coffee.png", "ihc.png"),
    ("astronaut.jpg", "retina.jpg"),
    ("rocket.jpg", "ihc.png"),
    ("astronaut.jpg", "brick.jpg"),
    ("rocket.jpg", "gravel.jpg"),
)


def load(name: str) -> torch.Tensor:
    return pil_to_tensor(Image.open(SAMPLES / name))


def scaled(options: StyleOptions, edge: int) -> StyleOptions:
    """The options' schedule at the bench edge: multi-scale ones from edge / 4, single-scale ones at edge."""
    single = options.min_size >= options.size
    return dataclasses.replace(options, size=edge, min_size=edge if single else max(16, edge // 4))


def weights(style_weight: float, tv_weight: float) -> StyleOptions:
    return dataclasses.replace(DEFAULTS, style_weight=style_weight, tv_weight=tv_weight)


def candidates(edge: int) -> dict[str, StyleOptions]:
    """The engine's defaults, the old defaults (sw 100, tv 10, the random-weights choice), a style-weight
    sweep with tv 10, a tv sweep at the lower style weights, and the presets."""
    found = {"defaults": DEFAULTS}
    for sw in (100, 30, 10, 7, 5, 3, 1, 0.3, 0.1):
        found[f"sw {sw:g} tv 10"] = weights(sw, 10.0)
    for sw in (10, 5, 3, 1):
        for tv in (0, 1):
            found[f"sw {sw:g} tv {tv:g}"] = weights(sw, float(tv))
    for name in ("fast-preview", "quality", "gatys2016", "keras-vgg19-adam"):
        found[name] = PRESETS[name].options
    return {name: scaled(options, edge) for name, options in found.items()}


# What runs without --candidates: the sweep (the defaults are one of its points) and our two presets;
# gatys2016 and keras-vgg19-adam (1000 single-scale iterations each) only when named.
DEFAULT_RUN = ("sw 100 tv 10", "sw 10 tv 10", "sw 5 tv 10", "sw 3 tv 10", "sw 1 tv 10", "sw 0.3 tv 10",
               "sw 0.1 tv 10", "sw 1 tv 0", "sw 1 tv 1", "fast-preview", "quality")  # fmt: skip


def _resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The engine's resize: bicubic, antialiased, clipped ([N, C, H, W])."""
    if image.shape[-2:] == (height, width):
        return image
    return F.interpolate(image, size=(height, width), mode="bicubic", antialias=True).clamp(0, 1)


class Scorer:
    """The two errors of an image against a content and a style, with the real fp32 network."""

    def __init__(self, extractor, content: torch.Tensor, style: torch.Tensor, output: tuple[int, int]):
        height, width = output
        layers = [CONTENT_LAYER, *STYLE_LAYERS]
        self.network = extractor.configured(layers=layers, pooling="max", padding="zeros")
        self.content = _resize(content[None], height, width)
        style_width, style_height = fit(max(height, width), (style.shape[-1], style.shape[-2]))
        with torch.no_grad():
            self.content_features = self.network(self.content)[CONTENT_LAYER]
            style_features = self.network(_resize(style[None], style_height, style_width))
            self.style_grams = {name: gram_matrix(style_features[name]) for name in STYLE_LAYERS}

    def score(self, image: torch.Tensor) -> dict[str, object]:
        with torch.no_grad():
            features = self.network(image[None].float())
        target = self.content_features
        content = float((features[CONTENT_LAYER] - target).norm() / target.norm())
        style = {
            name: float((gram_matrix(features[name]) - gram).norm() / gram.norm())
            for name, gram in self.style_grams.items()
        }
        mean = statistics.fmean(style.values())
        return {"content_error": content, "style_error": mean, "style_layers": style}


def real_extractor():
    from stylize.model.vgg import VGGFeatures
    from stylize.model.weights import resolve_weights

    resolved = resolve_weights("imagenet-q8")
    extractor = VGGFeatures(layers=[CONTENT_LAYER, *STYLE_LAYERS], normalization=resolved.normalization)
    return extractor.load_weights(resolved.state_dict).eval(), resolved


def run_job(content, style, options, extractor, device) -> tuple[torch.Tensor, dict[str, object]]:
    """One engine job; (output image [3, H, W], its facts). Checks the record order as it goes."""
    start = time.perf_counter()
    records = iter(stylize(content, [(style, 1.0)], options, extractor, device=device))
    started = next(records)
    assert isinstance(started, Started), started
    result = None
    for record in records:
        assert result is None and isinstance(record, Progress | Result), record
        result = record if isinstance(record, Result) else None
    assert isinstance(result, Result)
    seconds = time.perf_counter() - start
    return result.image.float().cpu(), {
        "seconds": round(seconds, 2),
        "iterations": result.iterations,
        "precision": started.precision,
        "scales": [list(scale) for scale in started.scales],
    }


def main_run(args) -> int:
    from bench.machine import describe, machine_info

    device = torch.device(args.device)
    extractor, resolved = real_extractor()
    extractor = extractor.to(device)
    chosen = candidates(args.edge)
    unknown = [name for name in args.candidates or [] if name not in chosen]
    if unknown:
        raise SystemExit(f"unknown candidates {unknown}; valid: {list(chosen)}")
    names = args.candidates or list(DEFAULT_RUN)
    pairs = PAIRS[args.first_pair : args.first_pair + args.pairs]
    info = machine_info()
    print(describe(info), file=sys.stderr)
    # Warm-up: the first runs of a process pay for kernel selection, not for the candidate.
    warm = dataclasses.replace(DEFAULTS, size=args.edge, min_size=args.edge, initial_iterations=3)
    run_job(load(pairs[0][0]), load(pairs[0][1]), warm, extractor, device)
    rows = []
    for content_name, style_name in pairs:
        content, style = load(content_name), load(style_name)
        output_width, output_height = fit(args.edge, (content.shape[-1], content.shape[-2]))
        scorer = Scorer(extractor, content.to(device), style.to(device), (output_height, output_width))
        baseline = scorer.score(scorer.content[0])
        # Content lost: the style image itself at the output size (stretched) scored as an output.
        lost = scorer.score(_resize(style[None].to(device), output_height, output_width)[0])
        pair = f"{Path(content_name).stem}/{Path(style_name).stem}"
        print(
            f"{pair}: the content's own style error {baseline['style_error']:.3f},"
            f" the style's own content error {lost['content_error']:.3f}",
            file=sys.stderr,
        )
        for name in names:
            image, facts = run_job(content, style, chosen[name], extractor, device)
            scores = scorer.score(image.to(device))
            fall = 1 - scores["style_error"] / baseline["style_error"]
            row = {
                "candidate": name, "pair": pair, **facts,
                "content_error": round(scores["content_error"], 4),
                "style_error": round(scores["style_error"], 4),
                "style_layers": {k: round(v, 4) for k, v in scores["style_layers"].items()},
                "content_style_error": round(baseline["style_error"], 4),
                "style_content_error": round(lost["content_error"], 4),
                "style_fall": round(fall, 4),
            }  # fmt: skip
            rows.append(row)
            print(
                f"  {name:18s} {facts['seconds']:7.1f} s {facts['iterations']:5d} it"
                f"  content {row['content_error']:.3f}  style {row['style_error']:.3f}"
                f"  fall {100 * fall:5.1f}%",
                file=sys.stderr,
                flush=True,
            )
            if args.save:
                out = Path(args.save) / f"{pair.replace('/', '-')}-{name.replace(' ', '_')}.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                tensor_to_pil(image).save(out)
    report = {
        "benchmark": "quality",
        "machine": info,
        "edge": args.edge,
        "device": str(device),
        "weights": {"kind": resolved.kind, "source": resolved.source, "sha256": resolved.sha256},
        "command": " ".join(["python -m bench.quality", *sys.argv[1:]]),
        "candidates": {name: _options_json(chosen[name]) for name in names},
        "results": rows,
    }
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


def _options_json(options: StyleOptions) -> dict[str, object]:
    values = dataclasses.asdict(options).items()
    return {k: (v if isinstance(v, int | float | str) else str(v)) for k, v in values}


# --------------------------------------------------------------------------- merging and the front


def medians(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per candidate, the medians over pairs of content error, style error, style fall and seconds."""
    by: dict[str, list[dict]] = {}
    for row in rows:
        by.setdefault(row["candidate"], []).append(row)
    keys = ("content_error", "style_error", "style_fall", "seconds")
    return {
        name: {
            "pairs": len(group),
            **{key: statistics.median(r[key] for r in group) for key in keys},
            "min_style_fall": min(r["style_fall"] for r in group),
            "max_content_error": max(r["content_error"] for r in group),
        }
        for name, group in by.items()
    }


def plot(
    summary: dict[str, dict[str, float]], path: Path, highlight: str | None, bound: float | None = None
) -> None:
    """Content error (x) against mean style error (y), one labelled point per candidate, in plain PIL;
    `bound`, a content error, drawn as a vertical line."""
    width, height, margin = 760, 520, 60
    xs = [s["content_error"] for s in summary.values()]
    ys = [s["style_error"] for s in summary.values()]
    x0, x1 = 0.0, max(xs) * 1.08
    y0, y1 = 0.0, max(ys) * 1.08
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            margin + (x - x0) / (x1 - x0) * (width - 2 * margin),
            height - margin - (y - y0) / (y1 - y0) * (height - 2 * margin),
        )

    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    for i in range(6):
        x, y = x0 + (x1 - x0) * i / 5, y0 + (y1 - y0) * i / 5
        px, _ = at(x, y0)
        _, py = at(x0, y)
        draw.line([px, height - margin, px, height - margin + 5], fill="black")
        draw.text((px - 12, height - margin + 8), f"{x:.2f}", fill="black")
        draw.line([margin - 5, py, margin, py], fill="black")
        draw.text((margin - 40, py - 6), f"{y:.2f}", fill="black")
    x_label = "content error (relu4_2, relative; median over pairs)"
    draw.text((width // 2 - 150, height - 22), x_label, fill="black")
    draw.text((8, 8), "mean style error (Gram relu1_1..relu5_1, relative; median over pairs)", fill="black")
    if bound is not None:
        bx, _ = at(bound, y0)
        for top in range(margin, height - margin, 12):
            draw.line([bx, top, bx, min(top + 6, height - margin)], fill="gray")
        draw.text((bx + 4, margin + 4), f"content bound {bound:g}", fill="gray")
    for name, s in summary.items():
        px, py = at(s["content_error"], s["style_error"])
        colour = "red" if name == highlight else ("blue" if name.startswith("sw ") else "darkgreen")
        draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
        draw.text((px + 6, py - 6), name, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)


def main_merge(args) -> int:
    reports = [json.loads(Path(p).read_text()) for p in args.merge]
    # A candidate run twice on a pair (a later run topping up an earlier one) counts once: the last run.
    latest = {(row["candidate"], row["pair"]): row for report in reports for row in report["results"]}
    rows = list(latest.values())
    lost = {row["pair"]: row["style_content_error"] for row in rows if "style_content_error" in row}
    for row in rows:
        if row["pair"] in lost:
            row["style_content_error"] = lost[row["pair"]]
    summary = medians(rows)
    for pair in sorted({row["pair"] for row in rows}, key=[row["pair"] for row in rows].index):
        own = next(row["content_style_error"] for row in rows if row["pair"] == pair)
        print(
            f"{pair}: the content's own style error {own:.3f},"
            f" the style's own content error {lost.get(pair, float('nan')):.3f}",
            file=sys.stderr,
        )
    for name, s in summary.items():
        print(
            f"{name:18s} pairs {s['pairs']}  content {s['content_error']:.3f}"
            f" (max {s['max_content_error']:.3f})  style {s['style_error']:.3f}"
            f"  fall {100 * s['style_fall']:5.1f}% (min {100 * s['min_style_fall']:5.1f}%)"
            f"  {s['seconds']:6.1f} s",
            file=sys.stderr,
        )
    if args.markdown:
        pairs = sorted({row["pair"] for row in rows}, key=[row["pair"] for row in rows].index)
        print("| candidate | " + " | ".join(pairs) + " | median |", file=sys.stderr)
        print("| --- |" + " --- |" * (len(pairs) + 1), file=sys.stderr)
        cell = {(r["candidate"], r["pair"]): r for r in rows}
        for name, s in summary.items():
            cells = []
            for pair in pairs:
                r = cell.get((name, pair))
                cells.append(
                    f"{r['content_error']:.3f} / {r['style_error']:.3f} / {100 * r['style_fall']:.0f}%"
                    f" / {r['seconds']:.0f} s"
                    if r
                    else "-"
                )
            median = (f"**{s['content_error']:.3f} / {s['style_error']:.3f} / {100 * s['style_fall']:.0f}%"
                      f" / {s['seconds']:.0f} s**")  # fmt: skip
            print(f"| {name} | " + " | ".join(cells) + f" | {median} |", file=sys.stderr)
    if args.plot:
        plot(summary, Path(args.plot), args.highlight, args.bound)
    json.dump(
        {"benchmark": "quality", "machine": reports[0]["machine"], "edge": reports[0]["edge"],
         "commands": [r.get("command") for r in reports], "medians": summary, "results": rows},
        sys.stdout, indent=2,
    )  # fmt: skip
    print()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edge", type=int, default=128, help="output edge of every job (default 128)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--candidates", nargs="+", metavar="NAME", help="run only these candidates")
    parser.add_argument("--pairs", type=int, default=len(PAIRS), help=f"pairs to run (all {len(PAIRS)})")
    parser.add_argument("--first-pair", type=int, default=0, help="index of the first pair (default 0)")
    parser.add_argument("--save", metavar="DIR", help="write every output image there as PNG")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="combine the JSON of earlier runs instead")
    parser.add_argument("--plot", metavar="PNG", help="with --merge: draw the front there")
    parser.add_argument("--highlight", default="defaults", help="with --plot: the candidate drawn in red")
    parser.add_argument("--bound", type=float, help="with --plot: the content bound, drawn as a line")
    parser.add_argument("--markdown", action="store_true", help="with --merge: a markdown table on stderr")
    args = parser.parse_args(argv)
    return main_merge(args) if args.merge else main_run(args)


if __name__ == "__main__":
    raise SystemExit(main())
