"""Render the README's galleries from the bundled samples, 128 px: a row of preset outputs
(assets/presets/<preset>.png) and a row of the quality benchmark's pairs at the engine's defaults
(assets/pairs/<content>_<style>.png).

    .venv/bin/python -m scripts.make_preset_gallery [--weights-dir DIR] [--max-iterations 100]

Presets: content assets/samples/chelsea.png, style assets/samples/hubble_deep_field.jpg. Each preset runs in
process through the engine at a 128 px output (its coarsest scale shrunk in proportion), with at most
`--max-iterations` per scale so the whole row takes minutes on a CPU. The network weights come from
the artifacts in --weights-dir (vgg19 and vgg16, as stylize-export writes them) when given, else they
are seeded random weights, and the README's caption must say so: random weights make textures that
test the plumbing, not art. Pairs: bench/quality.py's content/style pairs, the engine's defaults at a 128 px
output with the first scale at 32 px (the defaults' 512/128 ratio), iterations capped likewise. Each line
printed gives the wall seconds of the job, for the captions.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from bench.quality import PAIRS, load
from stylize.api.options import DEFAULTS, Backbone, StyleOptions
from stylize.api.presets import PRESETS
from stylize.model.artifact import load_artifact
from stylize.model.vgg import VGGFeatures, random_state_dict
from stylize.server.engine.imageio import tensor_to_pil
from stylize.server.engine.records import Result
from stylize.server.engine.run import stylize

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "assets" / "presets"
PAIRS_OUT = REPO / "assets" / "pairs"
EDGE = 128


def small(options: StyleOptions, max_iterations: int) -> StyleOptions:
    """The preset at a 128 px output: the coarsest scale shrunk in proportion, iterations capped."""
    min_size = max(32, round(options.min_size * EDGE / options.size))
    return dataclasses.replace(
        options,
        size=EDGE,
        min_size=min(min_size, EDGE),
        initial_iterations=min(options.initial_iterations, max_iterations),
        iterations=min(options.iterations, max_iterations),
    )


def extractor(arch: Backbone, weights_dir: Path | None) -> tuple[VGGFeatures, str]:
    """The network of `arch` and its weights kind: the artifact's in weights_dir where there is one, else
    seeded random weights."""
    if weights_dir is not None and (weights_dir / f"{arch}.json").is_file():
        artifact = load_artifact(weights_dir, arch)
        return artifact.build_extractor(), artifact.manifest.weights
    return VGGFeatures(arch=arch).load_weights(random_state_dict(0, arch)), "random"


def render(
    content, style, options: StyleOptions, network: tuple[VGGFeatures, str], device, path: Path
) -> None:
    start = time.perf_counter()
    result = None
    for record in stylize(content, [(style, 1.0)], options, network[0], device=device):
        result = record if isinstance(record, Result) else result
    seconds = time.perf_counter() - start
    tensor_to_pil(result.image).save(path, optimize=True)
    print(
        f"{path.relative_to(REPO)}: weights {network[1]}, {result.iterations} iterations, "
        f"loss {result.losses.total:.4g}, {seconds:.1f} s"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights-dir", type=Path, help="model directory with vgg19/vgg16 artifacts")
    parser.add_argument("--max-iterations", type=int, default=100, help="cap per scale (default 100)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--pairs-out", type=Path, default=PAIRS_OUT)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    networks = {arch: extractor(arch, args.weights_dir) for arch in Backbone}
    args.out.mkdir(parents=True, exist_ok=True)
    content, style = load("chelsea.png"), load("hubble_deep_field.jpg")
    for name, preset in PRESETS.items():
        options = small(preset.options, args.max_iterations)
        network = networks[Backbone(options.backbone)]
        render(content, style, options, network, device, args.out / f"{name}.png")
    args.pairs_out.mkdir(parents=True, exist_ok=True)
    defaults = small(DEFAULTS, args.max_iterations)
    for content_name, style_name in PAIRS:
        path = args.pairs_out / f"{Path(content_name).stem}_{Path(style_name).stem}.png"
        render(load(content_name), load(style_name), defaults, networks[Backbone.VGG19], device, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
