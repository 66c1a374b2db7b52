"""Render the README's row of preset outputs: assets/presets/<preset>.png, 128 px, from the bundled samples.

    .venv/bin/python scripts/make_preset_gallery.py [--weights-dir DIR] [--max-iterations 100]

Content assets/samples/chelsea.png, style assets/samples/hubble_deep_field.jpg. Each preset runs in
process through the engine at a 128 px output (its coarsest scale shrunk in proportion), with at most
`--max-iterations` per scale so the whole row takes minutes on a CPU. The network weights come from
the artifacts in --weights-dir (vgg19 and vgg16, as stylize-export writes them) when given, else they
are seeded random weights, and the README's caption must say so: random weights make textures that
test the plumbing, not art.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from PIL import Image

from stylize.export.artifact import load_artifact
from stylize.export.vgg import VGGFeatures, random_state_dict
from stylize.server.engine.imageio import pil_to_tensor, tensor_to_pil
from stylize.server.engine.options import Backbone, StyleOptions
from stylize.server.engine.presets import PRESETS
from stylize.server.engine.records import Result
from stylize.server.engine.run import stylize

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "assets" / "samples"
OUT = REPO / "assets" / "presets"
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


def extractor(arch: Backbone, weights_dir: Path | None) -> VGGFeatures:
    if weights_dir is not None:
        return load_artifact(weights_dir, arch).build_extractor()
    return VGGFeatures(arch=arch).load_weights(random_state_dict(0, arch))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights-dir", type=Path, help="model directory with vgg19/vgg16 artifacts")
    parser.add_argument("--max-iterations", type=int, default=100, help="cap per scale (default 100)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    content = pil_to_tensor(Image.open(SAMPLES / "chelsea.png"))
    style = pil_to_tensor(Image.open(SAMPLES / "hubble_deep_field.jpg"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    networks = {arch: extractor(arch, args.weights_dir) for arch in Backbone}
    for name, preset in PRESETS.items():
        options = small(preset.options, args.max_iterations)
        network = networks[Backbone(options.backbone)]
        result = None
        for record in stylize(content, [(style, 1.0)], options, network, device=device):
            result = record if isinstance(record, Result) else result
        path = args.out / f"{name}.png"
        tensor_to_pil(result.image).save(path, optimize=True)
        print(f"{path.relative_to(REPO)}: {result.iterations} iterations, loss {result.losses.total:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
