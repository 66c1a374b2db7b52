"""How fast-preview and quality were chosen: time to a result and the loss it reaches, per candidate.

    python -m bench.presets [--edge 256] [--device cpu]

Every candidate stylizes the same content (chelsea.png, square crop) with the same style
(hubble_deep_field.jpg) at the same output edge; schedules are scaled to `--edge` (the presets'
own sizes, 512 and 1024 px, are for GPUs). Each result is then scored with ONE reference
objective, whatever the candidate optimized: the engine's default loss (relative normalization,
content relu4_2, style relu1_1..relu5_1, default weights) in fp32 at the output size. Lower is
better; equal scores mean equally good optimizations of that objective. The VGG weights are random
(seeded), so the score measures optimization progress, not beauty.

Prints one JSON document on stdout and a table on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from bench.engine import load, square
from bench.machine import machine_info
from stylize.api.options import DEFAULTS, StyleOptions
from stylize.api.presets import PRESETS
from stylize.model.vgg import VGGFeatures, random_state_dict
from stylize.server.engine.losses import ContentLoss, GramStyleLoss, LayerSum, Objective, gram_matrix
from stylize.server.engine.records import Result
from stylize.server.engine.run import stylize


def candidates(edge: int) -> dict[str, StyleOptions]:
    """fast-preview candidates (bf16, coarse-to-fine from edge/4 in x2 steps, few iterations), the engine's
    defaults, and quality candidates (fp32, sqrt 2 steps, the defaults' iterations and twice them)."""
    fast = dataclasses.replace(PRESETS["fast-preview"].options, size=edge, min_size=edge // 4)
    quality = dataclasses.replace(PRESETS["quality"].options, size=edge, min_size=edge // 4)
    return {
        "fast lbfgs 40+20": fast,
        "fast lbfgs 20+10": dataclasses.replace(fast, initial_iterations=20, iterations=10),
        "fast lbfgs 30+15": dataclasses.replace(fast, initial_iterations=30, iterations=15),
        "fast lbfgs 60+30": dataclasses.replace(fast, initial_iterations=60, iterations=30),
        "fast adam 60+30": dataclasses.replace(fast, optimizer="adam", initial_iterations=60, iterations=30),
        "fast single-scale lbfgs 60": dataclasses.replace(fast, min_size=edge, initial_iterations=60),
        "defaults (bf16 auto)": dataclasses.replace(DEFAULTS, size=edge, min_size=edge // 4),
        "defaults fp32": dataclasses.replace(DEFAULTS, size=edge, min_size=edge // 4, precision="fp32"),
        "quality fp32 400+200": dataclasses.replace(quality, initial_iterations=400, iterations=200),
        "quality fp32 200+100": dataclasses.replace(quality, initial_iterations=200, iterations=100),
        "quality fp32 200+100 zero padding": dataclasses.replace(
            quality, initial_iterations=200, iterations=100, padding="zeros"
        ),
        "quality fp32 400+200 zero padding": dataclasses.replace(
            quality, initial_iterations=400, iterations=200, padding="zeros"
        ),
    }


def reference_score(image: torch.Tensor, content: torch.Tensor, style: torch.Tensor, extractor) -> float:
    """The engine's default objective in fp32 at the image's size (the style at the same longest edge)."""
    height, width = image.shape[-2:]
    resize = torch.nn.functional.interpolate
    content = resize(content[None], size=(height, width), mode="bicubic", antialias=True).clamp(0, 1)
    scale = max(height, width) / max(style.shape[-2:])
    style_size = (round(style.shape[-2] * scale), round(style.shape[-1] * scale))
    style = resize(style[None], size=style_size, mode="bicubic", antialias=True).clamp(0, 1)
    content_layers, style_layers = dict(DEFAULTS.content_layers), dict(DEFAULTS.style_layers)
    network = extractor.configured(layers=[*content_layers, *style_layers])
    with torch.no_grad():
        content_features, style_features, features = network(content), network(style), network(image[None])
        objective = Objective(
            LayerSum({n: ContentLoss(content_features[n]) for n in content_layers}, content_layers),
            LayerSum({n: GramStyleLoss(gram_matrix(style_features[n])) for n in style_layers}, style_layers),
            content_weight=DEFAULTS.content_weight,
            style_weight=DEFAULTS.style_weight,
            tv_weight=DEFAULTS.tv_weight,
        )
        return float(objective(features, image[None])[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edge", type=int, default=256, help="output edge of every candidate (default 256)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="+", help="run only these candidates")
    args = parser.parse_args()
    device = torch.device(args.device)
    extractor = VGGFeatures().load_weights(random_state_dict(0)).to(device)
    content, style = square(load("chelsea.png")), load("hubble_deep_field.jpg")
    # Warm-up: the first bf16 and fp32 runs of a process pay for kernel selection, not for the candidate.
    for precision in ("bf16", "fp32"):
        warm = dataclasses.replace(
            DEFAULTS, size=args.edge, min_size=args.edge, initial_iterations=2, precision=precision
        )
        list(stylize(content, [(style, 1.0)], warm, extractor, device=device))
    rows = []
    for name, options in candidates(args.edge).items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        result = None
        for record in stylize(content, [(style, 1.0)], options, extractor, device=device):
            result = record if isinstance(record, Result) else result
        seconds = time.perf_counter() - start
        score = reference_score(result.image.to(device), content.to(device), style.to(device), extractor)
        rows.append({"candidate": name, "seconds": round(seconds, 2), "iterations": result.iterations,
                     "reference_loss": round(score, 4)})  # fmt: skip
        print(f"{name:30s} {seconds:8.1f} s {result.iterations:5d} it  reference loss {score:8.4f}",
              file=sys.stderr, flush=True)  # fmt: skip
    json.dump(
        {"machine": machine_info(), "edge": args.edge, "device": str(device), "weights": "random (seeded)",
         "results": rows},
        sys.stdout, indent=2,
    )  # fmt: skip
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
