"""Tiled optimization (server/engine/tiles.py): how exact its gradient is, its memory and its cost.

    python -m bench.tiles exactness [--edge 384] [--tiles 128 192] [--halos 0 32 64 96 128]
    python -m bench.tiles memory [--edges 512 1024 2048 4096] [--tile 512] [--halo 96] [--mmap-threshold N]
    python -m bench.tiles speed [--edge 1024] [--tiles 384 512 768] [--rows 352] [--halo 96] [--repeats 3]
    python -m bench.tiles job [--edge 4096] [--iterations 2] [--tile 0] [--precision auto]

exactness: the relative L2 error ||g_tiled - g_whole|| / ||g_whole|| of the image gradient of one
evaluation, by loss term alone (content, Gram style, mean-covariance style, total variation) and all
together, on the real ImageNet VGG19 (`make weights`), chelsea and the Hubble field, fp32. Every
command runs the network in the engine's layout (channels-last).
memory: peak RSS of one evaluation (forward and backward) tiled and whole, in a fresh process per row.
speed: seconds per megapixel-iteration whole, by tiles of each size and by rows of the whole width,
interleaved rounds, medians.
job: a whole job through the engine (one scale, Adam), its peak RSS and time.
JSON on stdout; a table on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
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
from bench.report import print_report
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
from stylize.server.engine.run import NETWORK_MEMORY_FORMAT, _resize, to_network_layout

CONTENT_LAYER = "relu4_2"
STYLE_LAYERS = tuple(name for name, _ in DEFAULT_STYLE_LAYERS)
LAYERS = (*STYLE_LAYERS[:4], CONTENT_LAYER, STYLE_LAYERS[4])
TERMS = {
    "content": {"content_weight": 1.0, "style_weight": 0.0, "tv_weight": 0.0},
    "gram": {"content_weight": 0.0, "style_weight": 10.0, "tv_weight": 0.0},
    "mean_covariance": {"content_weight": 0.0, "style_weight": 10.0, "tv_weight": 0.0},
    "tv": {"content_weight": 0.0, "style_weight": 0.0, "tv_weight": 10.0},
    "all (gram)": {"content_weight": 1.0, "style_weight": 10.0, "tv_weight": 10.0},
}


def network() -> VGGFeatures:
    """The real VGG19 in the engine's layout (channels-last weights; inputs made so by `layout`)."""
    weights = resolve_weights("imagenet-q8")
    vgg = VGGFeatures(layers=LAYERS, normalization=weights.normalization).load_weights(weights.state_dict)
    to_network_layout(vgg)
    return vgg


def layout(image: Tensor) -> Tensor:
    return image.contiguous(memory_format=NETWORK_MEMORY_FORMAT)


def on_tiles(vgg: VGGFeatures) -> tiles.TileNetwork:
    return tiles.TileNetwork(lambda crop, trim: vgg(layout(crop), trim), vgg.context())


def grid(
    vgg: VGGFeatures, image: Tensor, tile: int | tiles.TileBounds, halo: int, shift: tuple[int, int] = (0, 0)
) -> list[tiles.Tile]:
    """The engine's grid of cores of at most `tile` pixels or within `tile`'s bounds (rows: at least the
    network's least_rows)."""
    return tiles.tile_grid(
        *image.shape[-2:],
        bounds=tile if isinstance(tile, tiles.TileBounds) else tiles.TileBounds(tile, tile),
        halo=halo,
        least_rows=on_tiles(vgg).least_rows,
        shift=shift,
    )


def objective(
    vgg: VGGFeatures,
    content: Tensor,
    style: Tensor,
    loss: str,
    weights: Mapping[str, float],
    tile: tuple[int, int] | None = None,
) -> Objective:
    """The loss of a job on `content` and `style`; with `tile` (edge, halo) the content's features are read
    by tiles, as the engine reads a content image too large to pass whole."""
    with torch.no_grad():
        style_features = vgg(style)
        if tile is None:
            content_features = vgg(content)
        else:
            cores = grid(vgg, content, *tile)
            content_features = tiles.features_by_tiles(content, cores, on_tiles(vgg), [CONTENT_LAYER])
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
    terms = objective(vgg(layout(image)), image)
    terms[0].backward()
    assert image.grad is not None
    return terms.detach(), image.grad


def tiled_gradient(
    objective: Objective,
    vgg: VGGFeatures,
    image: Tensor,
    tile: int | tiles.TileBounds,
    halo: int,
    shift: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    image = image.clone().requires_grad_(True)
    image.grad = torch.zeros_like(image)
    cores = grid(vgg, image, tile, halo, shift)
    terms = tiles.tiled_terms(objective, image, cores, on_tiles(vgg), gradient=True)
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
    for term in args.terms:
        weights = TERMS[term]
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
    made = objective(vgg, content, style, "gram", TERMS["all (gram)"], (tile, halo) if tile else None)
    if tile:
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
    """Each row in a fresh process; with --mmap-threshold N, glibc serves every allocation of N bytes or
    more by its own mmap and unmaps it when freed (MALLOC_MMAP_THRESHOLD_), so the peak RSS is that of
    the tensors alive, not what the heap keeps of freed ones."""
    environment = dict(os.environ)
    if args.mmap_threshold:
        environment["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    rows = []
    for edge in args.edges:
        for tile in (0, args.tile):
            if tile == 0 and edge > args.largest_whole:
                continue
            command = [sys.executable, "-m", "bench.tiles", "one", str(edge), str(tile), str(args.halo)]
            done = subprocess.run(command, capture_output=True, text=True, check=True, env=environment)
            row = json.loads(done.stdout)
            rows.append(row)
            kind = f"tile {tile}" if tile else "whole"
            print(
                f"{edge:5} px {kind:9}: peak RSS {row['peak_rss_mib']:8.0f} MiB, {row['seconds']:.1f} s",
                file=sys.stderr,
            )
    return {"halo": args.halo, "mmap_threshold": args.mmap_threshold, "rows": rows}


def job(args: argparse.Namespace) -> dict[str, Any]:
    """A whole job through the engine at `edge` x `edge`, one scale: its peak RSS and time."""
    from stylize.api.options import DEFAULTS, Limits
    from stylize.server.engine.records import Progress, Result
    from stylize.server.engine.run import stylize

    vgg = network()
    content = _resize(load("coffee.png")[None], args.edge, args.edge)[0]  # square: 4096 x 4096
    style = load("hubble_deep_field.jpg")
    options = dataclasses.replace(
        DEFAULTS,
        size=args.edge,
        min_size=args.edge,
        initial_iterations=args.iterations,
        optimizer="adam",  # L-BFGS keeps 2 x 50 image-sized vectors: 20 GB at 4096 x 4096
        precision=args.precision,
        tile_size=args.tile,
    )
    began = time.perf_counter()
    limits = Limits(max_size=args.edge, max_pixels=args.edge * args.edge)
    records = list(stylize(content, [(style, 1.0)], options, vgg, device=torch.device("cpu"), limits=limits))
    result = records[-1]
    assert isinstance(result, Result)
    steps = [r.elapsed_seconds for r in records if isinstance(r, Progress)]
    row = {
        "edge": args.edge,
        "iterations": result.iterations,
        "tile_size": args.tile,
        "precision": args.precision,
        "peak_rss_mib": _peak_rss_mib(),
        "seconds": time.perf_counter() - began,
        "target_seconds": result.target_seconds,
        "iteration_seconds": [b - a for a, b in zip([result.target_seconds, *steps], steps, strict=False)],
        "losses": dataclasses.asdict(result.losses),
    }
    print(
        f"{args.edge}x{args.edge} job: peak RSS {row['peak_rss_mib']:.0f} MiB, {row['seconds']:.0f} s",
        file=sys.stderr,
    )
    return row


def speed(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per megapixel-iteration whole, with each tile size and in rows of the whole width of each
    height (the automatic tiles): in every round each kind twice in a row, the second timed (as a job's
    iterations follow one another: the first after another kind pays for the allocator's reshaping of
    memory), medians over the rounds."""
    vgg = network()
    content, style, image = images(args.edge)
    made = objective(vgg, content, style, "gram", TERMS["all (gram)"])
    megapixels = image.shape[-1] * image.shape[-2] / 1e6
    width = image.shape[-1]
    kinds: dict[str, tiles.TileBounds | None] = {
        "whole": None,
        **{f"tile {tile}": tiles.TileBounds(tile, tile) for tile in args.tiles},
        **{f"rows {rows}": tiles.TileBounds(rows, width) for rows in args.rows},
    }
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for repeat in range(args.repeats):
        for kind, bounds in kinds.items():
            for shift in (2 * repeat, 2 * repeat + 1):
                began = time.perf_counter()
                if bounds:
                    tiled_gradient(made, vgg, image, bounds, args.halo, (shift, shift))
                else:
                    whole_gradient(made, vgg, image)
            times[kind].append((time.perf_counter() - began) / megapixels)
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    grids = {kind: len(grid(vgg, image, bounds, args.halo)) for kind, bounds in kinds.items() if bounds}
    for kind, median in medians.items():
        print(
            f"{args.edge} px ({image.shape[-1]}x{image.shape[-2]}), halo {args.halo}, {kind:9}"
            f" ({grids.get(kind, 1)} tiles): {median:.2f} s/Mpx-it, {median / medians['whole']:.2f}x whole",
            file=sys.stderr,
        )
    return {
        "edge": args.edge,
        "image": list(image.shape[-2:]),
        "halo": args.halo,
        "tiles_per_grid": grids,
        "seconds_per_megapixel_iteration": medians,
        "over_whole": {kind: median / medians["whole"] for kind, median in medians.items()},
        "runs": times,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tiles", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    exact = commands.add_parser("exactness")
    exact.add_argument("--edge", type=int, default=384)
    exact.add_argument("--tiles", type=int, nargs="+", default=[128, 192])
    exact.add_argument("--halos", type=int, nargs="+", default=[0, 32, 64, 96, 128])
    exact.add_argument("--terms", nargs="+", choices=list(TERMS), default=list(TERMS))
    mem = commands.add_parser("memory")
    mem.add_argument("--edges", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    mem.add_argument("--tile", type=int, default=512)
    mem.add_argument("--halo", type=int, default=96)
    mem.add_argument("--largest-whole", type=int, default=2048, help="largest edge to run whole")
    mem.add_argument("--mmap-threshold", type=int, default=0, help="MALLOC_MMAP_THRESHOLD_ (0: glibc's)")
    fast = commands.add_parser("speed")
    fast.add_argument("--edge", type=int, default=1024)
    fast.add_argument("--tiles", type=int, nargs="*", default=[384, 512, 768])
    fast.add_argument("--rows", type=int, nargs="*", default=[352], help="rows of the whole width")
    fast.add_argument("--halo", type=int, default=96)
    fast.add_argument("--repeats", type=int, default=3)
    whole_job = commands.add_parser("job")
    whole_job.add_argument("--edge", type=int, default=4096)
    whole_job.add_argument("--iterations", type=int, default=2)
    whole_job.add_argument("--tile", type=int, default=0, help="tile_size (0: as memory requires)")
    whole_job.add_argument("--precision", default="auto")
    one = commands.add_parser("one")
    one.add_argument("edge", type=int)
    one.add_argument("tile", type=int)
    one.add_argument("halo", type=int)
    args = parser.parse_args(argv)
    if args.command == "one":
        print(json.dumps(one_evaluation(args.edge, args.tile, args.halo)))
        return 0
    run = {"exactness": exactness, "memory": memory, "speed": speed, "job": job}[args.command]
    result = {"machine": machine_info(), "command": " ".join(sys.argv), **run(args)}
    print_report(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
