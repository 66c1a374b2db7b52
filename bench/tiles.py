"""Tiled optimization (server/engine/tiles.py): how exact its gradient is, its memory and its cost.

    python -m bench.tiles exactness [--edge 384] [--tiles 128 192] [--halos 0 32 64 96 128]
    python -m bench.tiles memory [--edges 512 1024 2048 4096] [--tile 256]
    python -m bench.tiles speed [--edge 1024] [--tile 256] [--repeats 3]

exactness: the relative L2 error ||g_tiled - g_whole|| / ||g_whole|| of the image gradient of one
evaluation, by loss term alone (content, Gram style, mean-covariance style, total variation) and all
together, on the real ImageNet VGG19 (`make weights`), chelsea and the Hubble field, fp32.
memory: peak RSS of one evaluation (forward and backward) tiled and whole, in a fresh process per row.
speed: seconds per megapixel-iteration tiled against whole, interleaved, medians.
JSON on stdout; a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from bench.machine import machine_info
from bench.quality import load
from stylize.api.options import DEFAULT_STYLE_LAYERS, LossNormalization
from stylize.model.vgg import VGGFeatures
from stylize.model.weights import resolve_weights
from stylize.server.engine import tiles
from stylize.server.engine.losses import (
    ContentLoss,
    GramStyleLoss,
    LayerSum,
    MeanCovarianceStyleLoss,
    Objective,
    gram_matrix,
    mean_and_second_moment,
)
from stylize.server.engine.run import _resize

CONTENT_LAYER = "relu4_2"
STYLE_LAYERS = tuple(name for name, _ in DEFAULT_STYLE_LAYERS)
LAYERS = (*STYLE_LAYERS[:4], CONTENT_LAYER, STYLE_LAYERS[4])
DOWNSAMPLING = {"relu1_1": 1, "relu2_1": 2, "relu3_1": 4, "relu4_1": 8, "relu4_2": 8, "relu5_1": 16}
TERMS = {
    "content": {"content_weight": 1.0, "style_weight": 0.0, "tv_weight": 0.0},
    "gram": {"content_weight": 0.0, "style_weight": 10.0, "tv_weight": 0.0},
    "mean_covariance": {"content_weight": 0.0, "style_weight": 10.0, "tv_weight": 0.0},
    "tv": {"content_weight": 0.0, "style_weight": 0.0, "tv_weight": 10.0},
    "all (gram)": {"content_weight": 1.0, "style_weight": 10.0, "tv_weight": 10.0},
}


def network() -> VGGFeatures:
    weights = resolve_weights("imagenet-q8")
    return VGGFeatures(layers=LAYERS, normalization=weights.normalization).load_weights(weights.state_dict)


def objective(
    vgg: VGGFeatures, content: Tensor, style: Tensor, loss: str, weights: Mapping[str, float]
) -> Objective:
    with torch.no_grad():
        content_features, style_features = vgg(content), vgg(style)
    kind, statistic = (
        (MeanCovarianceStyleLoss, mean_and_second_moment)
        if loss == "mean_covariance"
        else (GramStyleLoss, gram_matrix)
    )
    style_losses = {
        name: kind(statistic(style_features[name]), LossNormalization.RELATIVE) for name in STYLE_LAYERS
    }
    return Objective(
        LayerSum({CONTENT_LAYER: ContentLoss(content_features[CONTENT_LAYER])}, {CONTENT_LAYER: 1.0}),
        LayerSum(style_losses, dict.fromkeys(STYLE_LAYERS, 1.0)),
        content_weight=weights["content_weight"],
        style_weight=weights["style_weight"],
        tv_weight=weights["tv_weight"],
    )


def whole_gradient(objective: Objective, vgg: VGGFeatures, image: Tensor) -> tuple[Tensor, Tensor]:
    image = image.clone().requires_grad_(True)
    terms = objective(vgg(image), image)
    terms[0].backward()
    assert image.grad is not None
    return terms.detach(), image.grad


def tiled_gradient(
    objective: Objective, vgg: VGGFeatures, image: Tensor, tile: int, halo: int, shift: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    image = image.clone().requires_grad_(True)
    image.grad = torch.zeros_like(image)
    grid = tiles.tile_grid(*image.shape[-2:], tile=tile, halo=halo, shift=shift)
    terms = tiles.tiled_terms(objective, image, grid, vgg, DOWNSAMPLING, gradient=True)
    return terms, image.grad


def relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def fit(image: Tensor, edge: int) -> Tensor:
    """`image` with its longest edge `edge` and both edges multiples of 32 (a whole number of tiles)."""
    height, width = image.shape[-2:]
    scale = edge / max(height, width)
    return _resize(image, max(32, round(height * scale / 32) * 32), max(32, round(width * scale / 32) * 32))


def images(edge: int) -> tuple[Tensor, Tensor, Tensor]:
    content, style = (fit(load(name)[None], edge) for name in ("chelsea.png", "hubble_deep_field.jpg"))
    # The point where the gradient is taken: the content with noise, as an image part-way through a job.
    noisy = (content + 0.1 * torch.randn(content.shape, generator=torch.Generator().manual_seed(0))).clamp(
        0, 1
    )
    return content, style, noisy


def exactness(args: argparse.Namespace) -> dict[str, Any]:
    vgg = network()
    content, style, image = images(args.edge)
    rows = []
    for term, weights in TERMS.items():
        loss = "mean_covariance" if term == "mean_covariance" else "gram"
        made = objective(vgg, content, style, loss, weights)
        whole_terms, whole = whole_gradient(made, vgg, image)
        for tile in args.tiles:
            for halo in args.halos:
                tiled_terms, tiled = tiled_gradient(made, vgg, image, tile, halo, (1, 2))
                row = {
                    "term": term,
                    "tile": tile,
                    "halo": halo,
                    "gradient_error": relative(tiled, whole),
                    "loss_error": relative(tiled_terms[0], whole_terms[0]),
                }
                rows.append(row)
                print(
                    f"{term:16} tile {tile:4} halo {halo:4}: gradient {row['gradient_error']:.2e}, "
                    f"loss {row['loss_error']:.1e}",
                    file=sys.stderr,
                )
    return {"edge": args.edge, "image": list(image.shape[-2:]), "rows": rows}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_evaluation(edge: int, tile: int, halo: int) -> dict[str, Any]:
    """One evaluation at `edge` (tile 0: whole), in this process; for `memory`'s child processes."""
    vgg = network()
    torch.manual_seed(0)
    side = max(edge * 3 // 4 // 32 * 32, 32)  # chelsea's aspect, 4:3
    content = torch.rand(1, 3, side, edge)
    style = torch.rand(1, 3, min(side, 512), min(edge, 512))
    before = _peak_rss_mib()
    began = time.perf_counter()
    made = objective(vgg, content, style, "gram", TERMS["all (gram)"])
    if tile:
        # The targets by tiles too, as the engine reads a large content image.
        grid = tiles.tile_grid(side, edge, tile=tile, halo=halo)
        target = tiles.features_by_tiles(content, grid, vgg, {CONTENT_LAYER: DOWNSAMPLING[CONTENT_LAYER]})
        made.content.losses[CONTENT_LAYER].target = target[CONTENT_LAYER]
        tiled_gradient(made, vgg, content, tile, halo, (0, 0))
    else:
        whole_gradient(made, vgg, content)
    return {
        "edge": edge,
        "pixels": side * edge,
        "tile": tile,
        "halo": halo,
        "peak_rss_mib": _peak_rss_mib(),
        "rss_before_mib": before,
        "seconds": time.perf_counter() - began,
    }


def memory(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for edge in args.edges:
        for tile in (0, args.tile):
            if tile == 0 and edge > args.largest_whole:
                continue
            command = [sys.executable, "-m", "bench.tiles", "one", str(edge), str(tile), str(args.halo)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            row = json.loads(done.stdout)
            rows.append(row)
            kind = f"tile {tile}" if tile else "whole"
            print(
                f"{edge:5} px {kind:9}: peak RSS {row['peak_rss_mib']:8.0f} MiB, {row['seconds']:.1f} s",
                file=sys.stderr,
            )
    return {"halo": args.halo, "rows": rows}


def speed(args: argparse.Namespace) -> dict[str, Any]:
    vgg = network()
    content, style, image = images(args.edge)
    made = objective(vgg, content, style, "gram", TERMS["all (gram)"])
    megapixels = image.shape[-1] * image.shape[-2] / 1e6
    times: dict[str, list[float]] = {"whole": [], "tiled": []}
    for repeat in range(args.repeats + 1):
        for kind in times:
            began = time.perf_counter()
            if kind == "whole":
                whole_gradient(made, vgg, image)
            else:
                tiled_gradient(made, vgg, image, args.tile, args.halo, (repeat, repeat))
            if repeat:  # the first round warms up
                times[kind].append((time.perf_counter() - began) / megapixels)
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    ratio = medians["tiled"] / medians["whole"]
    print(
        f"{args.edge} px, tile {args.tile}, halo {args.halo}: whole {medians['whole']:.2f} s/Mpx-it, "
        f"tiled {medians['tiled']:.2f} s/Mpx-it, ratio {ratio:.2f}",
        file=sys.stderr,
    )
    return {
        "edge": args.edge,
        "tile": args.tile,
        "halo": args.halo,
        "seconds_per_megapixel_iteration": medians,
        "runs": times,
        "tiled_over_whole": ratio,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tiles", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    exact = commands.add_parser("exactness")
    exact.add_argument("--edge", type=int, default=384)
    exact.add_argument("--tiles", type=int, nargs="+", default=[128, 192])
    exact.add_argument("--halos", type=int, nargs="+", default=[0, 32, 64, 96, 128])
    mem = commands.add_parser("memory")
    mem.add_argument("--edges", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    mem.add_argument("--tile", type=int, default=256)
    mem.add_argument("--halo", type=int, default=64)
    mem.add_argument("--largest-whole", type=int, default=2048, help="largest edge to run whole")
    fast = commands.add_parser("speed")
    fast.add_argument("--edge", type=int, default=1024)
    fast.add_argument("--tile", type=int, default=256)
    fast.add_argument("--halo", type=int, default=64)
    fast.add_argument("--repeats", type=int, default=3)
    one = commands.add_parser("one")
    one.add_argument("edge", type=int)
    one.add_argument("tile", type=int)
    one.add_argument("halo", type=int)
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    if args.command == "one":
        print(json.dumps(one_evaluation(args.edge, args.tile, args.halo)))
        return 0
    run = {"exactness": exactness, "memory": memory, "speed": speed}[args.command]
    result = {"machine": machine_info(), "command": " ".join(sys.argv), **run(args)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
