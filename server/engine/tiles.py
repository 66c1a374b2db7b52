"""Losses and their gradient computed a tile at a time, so memory is bounded by the tile, not the image.

Every style statistic is a sum over positions (a Gram matrix, a mean and a second moment, each over the
image's positions), so the tiles' shares add up to the image's statistic exactly. The gradient of a loss
L(S) of such a statistic at a tile's features is that of the tile's share s(F) taken against the fixed
dL/dS, because dL/dF = dL/dS . dS/dF and only the tile's share of S depends on its features. The content
loss is a sum over positions too; the total variation works on pixels and is computed on the whole image.
So one evaluation is:

1. every tile forward without gradients: the statistics and the loss values (the last tile keeps its
   graph, and step 3 starts with it);
2. dL/dS from the statistics (small: channels x channels per layer);
3. every tile forward and backward on  sum <dL/dS, s(F)> + its content share, its input's gradient added
   into the image's.

A tile is its core (the pixels whose features it contributes) and a halo of context around it: a core
feature near the tile's edge sees the halo instead of the neighbouring pixels the whole image would show,
so the gradient is exact up to the receptive field the halo cuts (docs/tiles.md measures it). A pass
computes no more than the core's features depend on: the crop, and each map after a pooling, are cut to
the context the network's taps need (VGGFeatures.context: 70 px around the core at the input for
relu5_1). Tile edges fall on multiples of the deepest layer's downsampling, so every pooling window and
every feature position of a tile is one of the whole image's. The grid moves every iteration, so no pixel
sits at a tile border twice in a row.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from stylize.api.options import TILE_ALIGN

from .losses import ContentLoss, GramStyleLoss, LayerSum, MeanCovarianceStyleLoss, Objective

if TYPE_CHECKING:
    from stylize.model.vgg import Trim

# A style statistic of features over a given number of positions (losses.gram_matrix, ...).
StatisticFn = Callable[[Tensor, int | None], Any]

# Bytes one optimized pixel takes in a forward and backward pass through VGG19 to relu5_1 (the saved
# activations, fp32); docs/tiles.md measures it. bf16 autocast keeps most activations at half that.
BYTES_PER_PIXEL = 3400
# Of the memory free when a scale starts, the share a whole-image pass may plan to use.
MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class Tile:
    """Rows and columns of the image: `crop` is what the network sees (core and halo, inside the image),
    `core` the pixels whose features this tile contributes."""

    crop: tuple[slice, slice]
    core: tuple[slice, slice]

    def image_features(self, downsampling: int) -> tuple[slice, slice]:
        """The core in the whole image's feature map of that layer."""
        return tuple(  # type: ignore[return-value]  # two slices
            slice(core.start // downsampling, core.stop // downsampling) for core in self.core
        )


@dataclass(frozen=True)
class TileNetwork:
    """What the tiled passes need of a network: its features of an input crop [1, C, h, w] by layer,
    every layer's map cut by a Trim on the way (VGGFeatures' forward), and its `context`
    (VGGFeatures.context: each layer's downsampling and the context its taps need)."""

    features: Callable[[Tensor, Trim], Mapping[str, Tensor]]
    context: Sequence[tuple[str, int, int]]


class _Cut(torch.autograd.Function):
    """A map's rows and columns, a view; its gradient is the cut's padded with zeros in the map's own
    memory layout (slicing's own backward makes a contiguous zero tensor, which every layer of a
    channels-last network before it would convert back)."""

    @staticmethod
    def forward(ctx: Any, layer_map: Tensor, rows: slice, columns: slice) -> Tensor:
        height, width = layer_map.shape[-2:]
        ctx.padding = (columns.start, width - columns.stop, rows.start, height - rows.stop)
        return layer_map[..., rows, columns]

    @staticmethod
    def backward(ctx: Any, gradient: Tensor) -> tuple[Tensor, None, None]:
        return torch.nn.functional.pad(gradient, ctx.padding), None, None


def _cut(layer_map: Tensor, rows: slice, columns: slice) -> Tensor:
    return cast(Tensor, _Cut.apply(layer_map, rows, columns))  # type: ignore[no-untyped-call]


class TileMaps:
    """One pass of the network over a tile, as its Trim: the crop it reads, and each map cut to the context
    the taps need around the core (VGGFeatures.context) where a pooling has just made it: the context a
    run of convolutions needs is the most at its start, and one cut there costs less than one per
    layer. A cut keeps an even context on each side, so the next pooling reads from a window's start.
    Maps are kept on the image's grid: a map's origin is its first position's in the image's map of that
    layer."""

    def __init__(self, tile: Tile, context: Sequence[tuple[str, int, int]]):
        self.tile = tile
        self._context = {name: (downsampling, positions) for name, downsampling, positions in context}
        self._downsampling = 1
        origin = (tile.crop[0].start, tile.crop[1].start)
        extent = (tile.crop[0].stop - origin[0], tile.crop[1].stop - origin[1])
        self.crop = self._kept("input", origin, extent)  # of the image, in pixels
        self._origin = (self.crop[0].start, self.crop[1].start)
        self._origins: dict[str, tuple[int, int]] = {}

    def _kept(self, name: str, origin: tuple[int, int], extent: tuple[int, int]) -> tuple[slice, slice]:
        """What a map of `name` from `origin` with `extent` positions keeps: the core, and on each side of
        it the context rounded up to even or all the map has there (rounded down to even before the core:
        the origin stays on the poolings' grid; at the image's edge what there is is even already)."""
        downsampling, context = self._context[name]
        context += context % 2
        kept = []
        for core, start, size in zip(self.tile.core, origin, extent, strict=True):
            first, last = core.start // downsampling, core.stop // downsampling
            before = min(first - start, context)
            kept.append(slice(first - before + before % 2, min(start + size, last + context)))
        return tuple(kept)  # type: ignore[return-value]  # two slices

    def input(self, image: Tensor) -> Tensor:
        """The crop of `image` ([1, C, H, W]) this pass reads."""
        return image[..., self.crop[0], self.crop[1]]

    def __call__(self, name: str, layer_map: Tensor) -> Tensor:
        downsampling = self._context[name][0]
        scale = downsampling // self._downsampling  # 2 after a pooling
        origin = (self._origin[0] // scale, self._origin[1] // scale)
        if scale == 1:
            self._origins[name] = origin
            return layer_map
        assert all(o % scale == 0 for o in self._origin), (name, self._origin)  # the pooling was aligned
        rows, columns = self._kept(name, origin, (layer_map.shape[-2], layer_map.shape[-1]))
        self._downsampling, self._origin = downsampling, (rows.start, columns.start)
        self._origins[name] = self._origin
        rows = slice(rows.start - origin[0], rows.stop - origin[0])
        columns = slice(columns.start - origin[1], columns.stop - origin[1])
        return _cut(layer_map, rows, columns)

    def _core(self, name: str) -> tuple[slice, slice]:
        """The core's positions in this pass's map of layer `name`."""
        downsampling = self._context[name][0]
        return tuple(  # type: ignore[return-value]  # two slices
            slice(core.start // downsampling - start, core.stop // downsampling - start)
            for core, start in zip(self.tile.core, self._origins[name], strict=True)
        )

    def core_of(self, name: str, layer_map: Tensor) -> Tensor:
        """The core's part of this pass's map of layer `name`."""
        return _cut(layer_map, *self._core(name))


def _offsets(length: int, tile: int, cuts: Sequence[int]) -> list[int]:
    """The moves of all inner `cuts` together, multiples of TILE_ALIGN of at most half a segment's even
    share of `length`, that keep every segment within 1..tile pixels."""
    share = length // (len(cuts) + 1)
    found = []
    for move in range(-(share // 2) // TILE_ALIGN * TILE_ALIGN, share // 2 + 1, TILE_ALIGN):
        edges = [0, *(cut + move for cut in cuts), length]
        if all(0 < b - a <= tile for a, b in itertools.pairwise(edges)):
            found.append(move)
    return found


def _bounce(step: int, count: int) -> int:
    """0, 1, ..., count - 1, count - 2, ..., 1, 0, 1, ...: consecutive steps one apart, never a jump."""
    period = 2 * (count - 1)
    phase = step % period
    return phase if phase < count else period - phase


def _cuts(length: int, tile: int, shift: int) -> list[int]:
    """One axis's segment edges: the fewest near-even segments of at most `tile` pixels whose inner cuts
    can move together (or one more segment, where they could not), all moved by one of the moves they
    allow, the `shift`-th going back and forth (_bounce), so consecutive shifts move every cut by
    TILE_ALIGN. Where neither count leaves room (tiles of a few TILE_ALIGN), cores of `tile` from an
    origin the shift moves, a part-tile at each end."""
    if length <= tile:
        return [0, length]
    fewest = -(-length // tile)
    for count in (fewest, fewest + 1):
        cuts = [round(k * length / count / TILE_ALIGN) * TILE_ALIGN for k in range(1, count)]
        moves = _offsets(length, tile, cuts)
        if len(moves) > 1:
            return [0, *(cut + moves[_bounce(shift, len(moves))] for cut in cuts), length]
    steps = tile // TILE_ALIGN
    offset = (_bounce(shift, steps) if steps > 1 else 0) * TILE_ALIGN
    return [0, *(cut for cut in range(tile - offset, length, tile) if cut > 0), length]


def tile_grid(
    height: int, width: int, *, tile: int, halo: int, shift: tuple[int, int] = (0, 0)
) -> list[Tile]:
    """Tiles covering an image: on each axis about the fewest cores of at most `tile` pixels, their
    borders moved by `shift` (any integers; see _cuts; tiles of TILE_ALIGN cannot move); each crop adds
    `halo` pixels of context on every side, inside the image. `tile` and `halo` are multiples of
    TILE_ALIGN."""
    if tile <= 0 or tile % TILE_ALIGN or halo % TILE_ALIGN:
        raise ValueError(f"tile {tile} and halo {halo} must be multiples of {TILE_ALIGN}")
    rows, columns = (
        _cuts(length, tile, shift_by) for length, shift_by in zip((height, width), shift, strict=True)
    )
    tiles = []
    for top, bottom in itertools.pairwise(rows):
        for left, right in itertools.pairwise(columns):
            crop = (
                slice(max(0, top - halo), min(height, bottom + halo)),
                slice(max(0, left - halo), min(width, right + halo)),
            )
            tiles.append(Tile(crop, (slice(top, bottom), slice(left, right))))
    return tiles


def moving_shifts(seed: int) -> Iterator[tuple[int, int]]:
    """A grid shift for every iteration (tile_grid's `shift`), each one step on from the last, so
    consecutive grids differ wherever their borders can move; seeded, so a job is reproducible."""
    start = int(torch.randint(0, 2**20, (1,), generator=torch.Generator().manual_seed(seed)))
    for step in itertools.count(start):
        yield step, step


def largest_tile(halo: int, device: torch.device) -> int:
    """The largest tile (a multiple of TILE_ALIGN, at least 2 of them) whose crop a pass can plan for
    within the memory free on `device`."""
    crop = math.isqrt(int(MEMORY_SHARE * free_memory(device) / BYTES_PER_PIXEL))
    return max(2 * TILE_ALIGN, (crop - 2 * halo) // TILE_ALIGN * TILE_ALIGN)


def positions(size: tuple[int, int], downsampling: int) -> int:
    """Positions of a layer's feature map for an input of `size` (height, width): floor pooling."""
    return (size[0] // downsampling) * (size[1] // downsampling)


def _downsampling(network: TileNetwork) -> dict[str, int]:
    return {name: downsampling for name, downsampling, _ in network.context}


def _forward(
    tile: Tile, image: Tensor, network: TileNetwork, *, gradient: bool
) -> tuple[TileMaps, Tensor, Mapping[str, Tensor]]:
    """A tile's pass: its maps, the crop it read (a leaf that requires grad, with `gradient`) and its
    features."""
    maps = TileMaps(tile, network.context)
    crop = maps.input(image.detach())
    with torch.set_grad_enabled(gradient):
        if gradient:
            crop = crop.clone().requires_grad_(True)
        return maps, crop, network.features(crop, maps)


def statistics_by_tiles(
    image: Tensor, tiles: Sequence[Tile], network: TileNetwork, statistics: Mapping[str, StatisticFn]
) -> dict[str, Any]:
    """Each layer's statistic of the whole image, summed over the tiles' shares (no gradients)."""
    size = (image.shape[-2], image.shape[-1])
    downsampling = _downsampling(network)
    totals: dict[str, Any] = {}
    with torch.no_grad():
        for tile in tiles:
            maps, _, features = _forward(tile, image, network, gradient=False)
            _accumulate(totals, _shares(features, maps, statistics, size, downsampling))
    return totals


def _shares(
    features: Mapping[str, Tensor],
    maps: TileMaps,
    statistics: Mapping[str, StatisticFn],
    size: tuple[int, int],
    downsampling: Mapping[str, int],
) -> dict[str, Any]:
    """Each layer's statistic of a tile's core over the whole image's positions (size: height, width)."""
    shares = {}
    for name, statistic in statistics.items():
        shares[name] = statistic(maps.core_of(name, features[name]), positions(size, downsampling[name]))
    return shares


def _accumulate(totals: dict[str, Any], shares: Mapping[str, Any]) -> None:
    for name, share in shares.items():
        totals[name] = share if name not in totals else _add(totals[name], share)


def features_by_tiles(
    image: Tensor, tiles: Sequence[Tile], network: TileNetwork, layers: Sequence[str]
) -> dict[str, Tensor]:
    """The whole image's feature maps of `layers`, assembled from the tiles' cores."""
    size = (image.shape[-2], image.shape[-1])
    downsampling = _downsampling(network)
    found: dict[str, Tensor] = {}
    with torch.no_grad():
        for tile in tiles:
            maps, _, features = _forward(tile, image, network, gradient=False)
            for name in layers:
                d = downsampling[name]
                part = features[name].float()
                if name not in found:
                    found[name] = part.new_zeros((*part.shape[:2], size[0] // d, size[1] // d))
                target_rows, target_columns = tile.image_features(d)
                found[name][..., target_rows, target_columns] = maps.core_of(name, part)
    return found


def _add(total: Any, share: Any) -> Any:
    if isinstance(total, Tensor):
        return total + share
    return tuple(a + b for a, b in zip(total, share, strict=True))


def _leaves(statistic: Any) -> tuple[Tensor, ...]:
    return (statistic,) if isinstance(statistic, Tensor) else tuple(statistic)


def _content_share(
    content: LayerSum, features: Mapping[str, Tensor], maps: TileMaps, downsampling: Mapping[str, int]
) -> Tensor:
    terms = []
    for name, loss in content.losses.items():
        assert isinstance(loss, ContentLoss)
        target_rows, target_columns = maps.tile.image_features(downsampling[name])
        share = loss.part(maps.core_of(name, features[name]), target_rows, target_columns)
        terms.append(share * content.weights[name])
    return torch.stack(terms).sum() if terms else torch.zeros(())


def tiled_terms(
    objective: Objective, image: Tensor, tiles: Sequence[Tile], network: TileNetwork, *, gradient: bool
) -> Tensor:
    """[total, content, style, total_variation] at `image` ([1, C, H, W]), as Objective gives them for the
    whole image; with `gradient`, the total's gradient is added to image.grad (image requires grad)."""
    style_losses = cast(Mapping[str, GramStyleLoss | MeanCovarianceStyleLoss], objective.style.losses)
    style_statistics = {name: loss.statistics for name, loss in style_losses.items()}
    size = (image.shape[-2], image.shape[-1])
    downsampling = _downsampling(network)
    content = image.new_zeros(())
    totals: dict[str, Any] = {}
    # Pass 1: statistics and values. Its last tile keeps its graph (with `gradient`), and pass 2 starts
    # with it instead of passing it again.
    kept: tuple[TileMaps, Tensor, Mapping[str, Tensor]] | None = None
    for index, tile in enumerate(tiles):
        keep = gradient and index == len(tiles) - 1
        maps, crop, features = _forward(tile, image, network, gradient=keep)
        with torch.no_grad():
            content = content + _content_share(objective.content, features, maps, downsampling).to(content)
            _accumulate(totals, _shares(features, maps, style_statistics, size, downsampling))
        if keep:
            kept = maps, crop, features
    leaves = {
        name: tuple(t.detach().requires_grad_(gradient) for t in _leaves(v)) for name, v in totals.items()
    }
    statistics = {name: v[0] if isinstance(totals[name], Tensor) else v for name, v in leaves.items()}
    with torch.set_grad_enabled(gradient):
        style = objective.style.of_statistics(statistics).to(content) * objective.style_weight
        tv = objective.tv(image) * objective.tv_weight
    content = content * objective.content_weight
    if gradient:
        flat = [leaf for parts in leaves.values() for leaf in parts]
        slopes = dict(zip(flat, torch.autograd.grad(style, flat), strict=True)) if flat else {}
        tv.backward()  # image.grad exists from here on
        assert image.grad is not None and kept is not None
        ready = [kept]  # pass 2 starts with the kept tile; popping it hands its graph to the pass
        del kept
        for tile in (tiles[-1], *tiles[:-1]):  # pass 2: each tile's share of the gradient
            maps, crop, features = ready.pop() if ready else _forward(tile, image, network, gradient=True)
            surrogate = (
                _content_share(objective.content, features, maps, downsampling) * objective.content_weight
            )
            for name, share in _shares(features, maps, style_statistics, size, downsampling).items():
                for leaf, part in zip(leaves[name], _leaves(share), strict=True):
                    surrogate = surrogate + (slopes[leaf] * part).sum()
            surrogate.backward()
            assert crop.grad is not None
            image.grad[..., maps.crop[0], maps.crop[1]] += crop.grad
            del maps, crop, features, surrogate  # the next tile's pass runs without them
    return torch.stack([content + style.detach() + tv.detach(), content, style.detach(), tv.detach()])


def free_memory(device: torch.device) -> int:
    """Bytes free for a job on `device` now: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # not Linux: the free pages, without the page cache the kernel would give up
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def whole_image_fits(pixels: int, device: torch.device) -> bool:
    """Whether a whole-image pass over `pixels` is planned within the memory free on `device`."""
    return pixels * BYTES_PER_PIXEL <= MEMORY_SHARE * free_memory(device)
