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
3. every tile forward and backward on  sum <dL/dS, s(F)> + its content share, in reverse order, its
   input's gradient added into the image's.

Tiles lie in rows and columns. Down a column, rows are streamed (TileMaps): each tile computes the rows of
every layer that its own rows make whole and hands the last rows of each map a convolution or pooling
reads to the tile below, so every feature is computed once, from the whole image's rows; in step 3 the
gradients of those rows go back up, from each tile to the one above. Across columns a tile takes context
instead: its core (the pixels whose features it contributes) and a halo of columns each side, of which a
pass computes no more than the core's features depend on (VGGFeatures.context: 70 px for relu5_1), each
map cut to that after a pooling. So the gradient is exact up to the receptive field the halo cuts
(docs/tiles.md measures it), and the automatic tiles, rows of the image's whole width, need no context at
all. Tile edges fall on multiples of the deepest layer's downsampling, so every pooling window and feature
position of a tile is one of the whole image's. The grid moves every iteration wherever the tiles leave
room, so no pixel sits at a tile border twice in a row (rows of TileNetwork.least_rows may have none; a
row border, being streamed, cuts nothing).
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
    """Rows and columns of the image: `crop` is what the network sees (core and context, inside the image),
    `core` the pixels whose features this tile contributes."""

    crop: tuple[slice, slice]
    core: tuple[slice, slice]


@dataclass(frozen=True)
class TileBounds:
    """The most rows and columns a tile's core takes (multiples of TILE_ALIGN, or the image's own)."""

    rows: int
    columns: int


@dataclass(frozen=True)
class TileNetwork:
    """What the tiled passes need of a network: its features of an input crop [1, C, h, w] by layer,
    every layer's map cut by a Trim on the way (VGGFeatures' forward), and its `context`
    (VGGFeatures.context: each layer's downsampling and the context its taps need)."""

    features: Callable[[Tensor, Trim], Mapping[str, Tensor]]
    context: Sequence[tuple[str, int, int]]

    @property
    def least_rows(self) -> int:
        """The fewest rows a tile may take: a column's first tile loses the context's rows at its foot on
        the way down the network (they come from the next tile) and must still hand two rows of its
        deepest layer's input on."""
        _, _, context = self.context[0]
        deepest = max(downsampling for _, downsampling, _ in self.context)
        return -(-(context + 2 * deepest) // TILE_ALIGN) * TILE_ALIGN


class _Cut(torch.autograd.Function):
    """A map's rows and columns, a view; its gradient is the cut's, with zeros where the cut left the map,
    in the map's own memory layout (slicing's own backward makes a contiguous zero tensor, which every
    layer of a channels-last network before it would convert back). Only the margins are zeroed: a cut
    often drops a row or two of a large map."""

    @staticmethod
    def forward(ctx: Any, layer_map: Tensor, rows: slice, columns: slice) -> Tensor:
        ctx.shape, ctx.rows, ctx.columns = layer_map.shape, rows, columns
        channels_last = layer_map.dim() == 4 and layer_map.is_contiguous(memory_format=torch.channels_last)
        ctx.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        return layer_map[..., rows, columns]

    @staticmethod
    def backward(ctx: Any, gradient: Tensor) -> tuple[Tensor, None, None]:
        full = torch.empty(
            ctx.shape, dtype=gradient.dtype, device=gradient.device, memory_format=ctx.memory_format
        )
        rows, columns = ctx.rows, ctx.columns
        full[..., : rows.start, :].zero_()
        full[..., rows.stop :, :].zero_()
        full[..., rows, : columns.start].zero_()
        full[..., rows, columns.stop :].zero_()
        full[..., rows, columns] = gradient
        return full, None, None


def _cut(layer_map: Tensor, rows: slice, columns: slice) -> Tensor:
    return cast(Tensor, _Cut.apply(layer_map, rows, columns))  # type: ignore[no-untyped-call]


# Rows of its input above an output row that a 3x3 convolution reads: what a tile hands the tile below
# it for each convolution (and reads of the image above its core, for the first).
_CONVOLUTION_ROWS = 2


class TileMaps:
    """One pass of the network over a tile, as its Trim.

    Rows are streamed down a column of tiles: a tile computes each layer's rows that its own rows of the
    layer before make whole, and hands the last rows of each map a convolution or pooling reads (`handed`)
    to the tile below, which puts them on top of its own (`carried`, from the tile above; before the ReLU
    that makes the map, where one does: _joins). So every
    feature is computed once, from the whole image's rows, and a tile reads only two rows of the image
    above its core. Columns take context instead: the crop, and each map where a pooling has just made
    it, are cut to the context the taps need on each side of the core (VGGFeatures.context), rounded up to
    even so the next pooling reads from a window's start. Maps are kept on the image's grid: a map's
    origin is its first position's in the image's map of that layer."""

    def __init__(
        self, tile: Tile, context: Sequence[tuple[str, int, int]], height: int, carried: Mapping[str, Tensor]
    ):
        self.tile = tile
        self._context = {name: (downsampling, positions) for name, downsampling, positions in context}
        self._joins = _joins([name for name, _, _ in context])
        self._above, self._below = tile.core[0].start > 0, tile.core[0].stop < height
        self.carried = carried  # the tile above's rows, by the layer that reads them
        self.handed: dict[str, Tensor] = {}  # rows for the tile below, by the layer that reads them
        self._downsampling = 1
        start = tile.crop[1].start
        self.crop = (tile.crop[0], self._kept("input", start, tile.crop[1].stop - start))  # of the image
        self._row, self._column = self.crop[0].start, self.crop[1].start
        self._own_row = self._row  # the first row of the current map that is the tile's own
        # Per layer: its map's first row and first column, and the rows of the tile's own part of it.
        self._origins: dict[str, tuple[int, int]] = {}
        self._own_rows: dict[str, slice] = {}

    def _kept(self, name: str, start: int, size: int) -> slice:
        """The columns a map of `name` from column `start` with `size` columns keeps: the core, and on
        each side of it the context rounded up to even or all the map has there (rounded down to even
        before the core: the origin stays on the poolings' grid; at the image's edge what there is is
        even already)."""
        downsampling, context = self._context[name]
        context += context % 2
        core = self.tile.core[1]
        first, last = core.start // downsampling, core.stop // downsampling
        before = min(first - start, context)
        return slice(first - before + before % 2, min(start + size, last + context))

    def input(self, image: Tensor) -> Tensor:
        """The crop of `image` ([1, C, H, W]) this pass reads."""
        return image[..., self.crop[0], self.crop[1]]

    def __call__(self, name: str, layer_map: Tensor) -> Tensor:
        rows, columns = slice(0, layer_map.shape[-2]), slice(0, layer_map.shape[-1])
        if name.startswith("conv"):  # its first and last rows read rows the tiles above and below have
            rows = slice(int(self._above), layer_map.shape[-2] - int(self._below))
            self._row += int(self._above)
            self._own_row = self._row
        elif name.startswith("pool"):
            assert self._row % 2 == 0 and self._column % 2 == 0, (name, self._row, self._column)
            kept = self._kept(name, self._column // 2, layer_map.shape[-1])
            columns = slice(kept.start - self._column // 2, kept.stop - self._column // 2)
            self._row, self._column = self._row // 2, kept.start
            self._own_row = self._row
        if rows != slice(0, layer_map.shape[-2]) or columns != slice(0, layer_map.shape[-1]):
            layer_map = _cut(layer_map, rows, columns)
        reader = self._joins.get(name)
        if reader is not None:
            above = self.carried.get(reader)
            if above is not None:
                layer_map = torch.cat([above, layer_map], dim=-2)
                self._row -= above.shape[-2]
            # A convolution's next output row reads the last two; a pooling leaves an odd row unpaired.
            handed = _CONVOLUTION_ROWS if reader.startswith("conv") else layer_map.shape[-2] % 2
            if self._below and handed:  # a copy: a view would keep the whole map to the pass's end
                self.handed[reader] = layer_map[..., layer_map.shape[-2] - handed :, :].clone()
        self._origins[name] = (self._row, self._column)
        self._own_rows[name] = slice(self._own_row - self._row, layer_map.shape[-2])
        return layer_map

    def _core(self, name: str) -> tuple[slice, slice]:
        """The tile's own positions in this pass's map of layer `name`."""
        downsampling = self._context[name][0]
        core = self.tile.core[1]
        start = self._origins[name][1]
        return self._own_rows[name], slice(
            core.start // downsampling - start, core.stop // downsampling - start
        )

    def core_of(self, name: str, layer_map: Tensor) -> Tensor:
        """The tile's own part of this pass's map of layer `name`."""
        return _cut(layer_map, *self._core(name))

    def core_positions(self, name: str) -> tuple[slice, slice]:
        """The tile's own part of layer `name` in the whole image's map of it."""
        rows, columns = self._core(name)
        row, column = self._origins[name]
        return slice(rows.start + row, rows.stop + row), slice(columns.start + column, columns.stop + column)


def _joins(names: Sequence[str]) -> dict[str, str]:
    """For each convolution or pooling but the first (which reads the image), where the rows from the tile
    above join the map it reads: the map itself, or, where a ReLU made it, the map the ReLU reads (a
    convolution's, which nothing saves for the backward; a ReLU's output is saved by the ReLU and the
    reader alike, and joining after it would save a second, joined copy). Keyed by where they join."""
    joins = {}
    for made_by, reader in itertools.pairwise(names):
        if reader.startswith(("conv", "pool")) and made_by != "input":
            joins[names[names.index(made_by) - 1] if made_by.startswith("relu") else made_by] = reader
    return joins


def _offsets(length: int, tile: int, cuts: Sequence[int], least: int) -> list[int]:
    """The moves of all inner `cuts` together, multiples of TILE_ALIGN of at most half a segment's even
    share of `length`, that keep every segment within least..tile pixels."""
    share = length // (len(cuts) + 1)
    found = []
    for move in range(-(share // 2) // TILE_ALIGN * TILE_ALIGN, share // 2 + 1, TILE_ALIGN):
        edges = [0, *(cut + move for cut in cuts), length]
        if all(least <= b - a <= tile for a, b in itertools.pairwise(edges)):
            found.append(move)
    return found


def _bounce(step: int, count: int) -> int:
    """0, 1, ..., count - 1, count - 2, ..., 1, 0, 1, ...: consecutive steps one apart, never a jump."""
    period = 2 * (count - 1)
    phase = step % period
    return phase if phase < count else period - phase


def _even_cuts(length: int, count: int) -> list[int]:
    return [round(k * length / count / TILE_ALIGN) * TILE_ALIGN for k in range(1, count)]


def _cuts(length: int, tile: int, shift: int, least: int = 1) -> list[int]:
    """One axis's segment edges: the fewest near-even segments of least..tile pixels whose inner cuts
    can move together (or one more segment, where they could not), all moved by one of the moves they
    allow, the `shift`-th going back and forth (_bounce), so consecutive shifts move every cut by
    TILE_ALIGN. Where neither count leaves room: with a `least`, the most near-even segments of at least
    that, unmoved; else cores of `tile` from an origin the shift moves, a part-tile at each end."""
    tile = max(tile, least)
    if length <= tile:
        return [0, length]
    fewest = -(-length // tile)
    for count in (fewest, fewest + 1):
        cuts = _even_cuts(length, count)
        moves = _offsets(length, tile, cuts, least)
        if len(moves) > 1:
            return [0, *(cut + moves[_bounce(shift, len(moves))] for cut in cuts), length]
    if least > 1:
        for count in range(fewest, 1, -1):
            edges = [0, *_even_cuts(length, count), length]
            if all(b - a >= least for a, b in itertools.pairwise(edges)):
                return edges
        return [0, length]
    steps = tile // TILE_ALIGN
    offset = (_bounce(shift, steps) if steps > 1 else 0) * TILE_ALIGN
    return [0, *(cut for cut in range(tile - offset, length, tile) if cut > 0), length]


def tile_grid(
    height: int,
    width: int,
    *,
    bounds: TileBounds,
    halo: int,
    least_rows: int,
    shift: tuple[int, int] = (0, 0),
) -> list[Tile]:
    """Tiles covering an image, in rows from the top, each row from the left: on each axis about the
    fewest cores within `bounds` (rows at least `least_rows`: TileNetwork.least_rows), their borders moved
    by `shift` (any integers; see _cuts); each crop adds `halo` columns of context on each side and the
    two rows of the image above its core that its first convolution reads, inside the image. Bounds and
    halo are multiples of TILE_ALIGN."""
    if any(b <= 0 or b % TILE_ALIGN for b in (bounds.rows, bounds.columns)) or halo % TILE_ALIGN:
        raise ValueError(f"tile bounds {bounds} and halo {halo} must be multiples of {TILE_ALIGN}")
    rows = _cuts(height, bounds.rows, shift[0], least_rows)
    columns = _cuts(width, bounds.columns, shift[1])
    tiles = []
    for top, bottom in itertools.pairwise(rows):
        for left, right in itertools.pairwise(columns):
            crop = (
                slice(max(0, top - _CONVOLUTION_ROWS), bottom),
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


def largest_bounds(width: int, halo: int, least_rows: int, device: torch.device) -> TileBounds:
    """The largest tiles a pass can plan for within the memory free on `device`: rows of the image's
    whole width where `least_rows` of them fit, else square cores (multiples of TILE_ALIGN, at least 2 of
    them) whose crops with `halo` fit."""
    pixels = int(MEMORY_SHARE * free_memory(device) / BYTES_PER_PIXEL)
    edge = max(2 * TILE_ALIGN, (math.isqrt(pixels) - 2 * halo) // TILE_ALIGN * TILE_ALIGN)
    return whole_width_rows(width, pixels, least_rows) or TileBounds(edge, edge)


def whole_width_rows(width: int, pixels: int, least_rows: int) -> TileBounds | None:
    """Rows of the image's whole width whose crops (each also reads the rows above its core its first
    convolution needs) hold at most `pixels`, where at least `least_rows` of them do; else None. Such rows
    have no columns, so no context to compute twice: the cheapest tiles for a memory bound."""
    rows = (pixels // width - _CONVOLUTION_ROWS) // TILE_ALIGN * TILE_ALIGN
    return TileBounds(rows, -(-width // TILE_ALIGN) * TILE_ALIGN) if rows >= least_rows else None


def positions(size: tuple[int, int], downsampling: int) -> int:
    """Positions of a layer's feature map for an input of `size` (height, width): floor pooling."""
    return (size[0] // downsampling) * (size[1] // downsampling)


def _downsampling(network: TileNetwork) -> dict[str, int]:
    return {name: downsampling for name, downsampling, _ in network.context}


def _forward(
    tile: Tile, image: Tensor, network: TileNetwork, carried: Mapping[str, Tensor], *, gradient: bool
) -> tuple[TileMaps, Tensor, Mapping[str, Tensor]]:
    """A tile's pass on the rows `carried` from the tile above: its maps, the crop it read (a leaf that
    requires grad, with `gradient`) and its features."""
    maps = TileMaps(tile, network.context, image.shape[-2], carried)
    crop = maps.input(image.detach())
    with torch.set_grad_enabled(gradient):
        if gradient:
            crop = crop.clone().requires_grad_(True)
        return maps, crop, network.features(crop, maps)


def _column(tile: Tile) -> tuple[int, int]:
    return tile.core[1].start, tile.core[1].stop


def _passes(
    image: Tensor, tiles: Sequence[Tile], network: TileNetwork, *, keep_last: bool = False
) -> Iterator[tuple[TileMaps, Tensor, Mapping[str, Tensor], Mapping[str, Tensor]]]:
    """Every tile's pass without gradients, in the grid's order, each on the rows the tile above it
    handed down; with `keep_last`, the last one's with its graph (its carried rows leaves that require
    grad). Yields the maps, crop and features and the rows carried in (detached, for a later pass)."""
    handed: dict[tuple[int, int], dict[str, Tensor]] = {}
    for index, tile in enumerate(tiles):
        received = handed.pop(_column(tile), {})
        keep = keep_last and index == len(tiles) - 1
        carried = _carried_leaves(received) if keep else received
        maps, crop, features = _forward(tile, image, network, carried, gradient=keep)
        handed[_column(tile)] = {name: rows.detach() for name, rows in maps.handed.items()}
        yield maps, crop, features, received


def _carried_leaves(received: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rows carried into a pass with gradients: leaves whose gradients go to the tile above."""
    return {name: rows.detach().requires_grad_(True) for name, rows in received.items()}


def statistics_by_tiles(
    image: Tensor, tiles: Sequence[Tile], network: TileNetwork, statistics: Mapping[str, StatisticFn]
) -> dict[str, Any]:
    """Each layer's statistic of the whole image, summed over the tiles' shares (no gradients)."""
    size = (image.shape[-2], image.shape[-1])
    downsampling = _downsampling(network)
    totals: dict[str, Any] = {}
    with torch.no_grad():
        for maps, _, features, _ in _passes(image, tiles, network):
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
        for maps, _, features, _ in _passes(image, tiles, network):
            for name in layers:
                d = downsampling[name]
                part = features[name].float()
                if name not in found:
                    found[name] = part.new_zeros((*part.shape[:2], size[0] // d, size[1] // d))
                found[name][..., maps.core_positions(name)[0], maps.core_positions(name)[1]] = maps.core_of(
                    name, part
                )
    return found


def _add(total: Any, share: Any) -> Any:
    if isinstance(total, Tensor):
        return total + share
    return tuple(a + b for a, b in zip(total, share, strict=True))


def _leaves(statistic: Any) -> tuple[Tensor, ...]:
    return (statistic,) if isinstance(statistic, Tensor) else tuple(statistic)


def _content_share(content: LayerSum, features: Mapping[str, Tensor], maps: TileMaps) -> Tensor:
    terms = []
    for name, loss in content.losses.items():
        assert isinstance(loss, ContentLoss)
        share = loss.part(maps.core_of(name, features[name]), *maps.core_positions(name))
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
    received: list[Mapping[str, Tensor]] = []
    for maps, crop, features, carried in _passes(image, tiles, network, keep_last=gradient):
        with torch.no_grad():
            content = content + _content_share(objective.content, features, maps).to(content)
            _accumulate(totals, _shares(features, maps, style_statistics, size, downsampling))
        received.append(carried)
        if gradient and len(received) == len(tiles):
            kept = maps, crop, features
    del maps, crop, features
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
        # The gradients of the rows each column's last pass received, for the tile above it.
        owed: dict[tuple[int, int], dict[str, Tensor]] = {}
        for index in reversed(range(len(tiles))):  # pass 2: each tile's share, from the bottom up
            if ready:
                maps, crop, features = ready.pop()
            else:
                rows_above = _carried_leaves(received[index])
                maps, crop, features = _forward(tiles[index], image, network, rows_above, gradient=True)
            surrogate = _content_share(objective.content, features, maps) * objective.content_weight
            for name, share in _shares(features, maps, style_statistics, size, downsampling).items():
                for leaf, part in zip(leaves[name], _leaves(share), strict=True):
                    surrogate = surrogate + (slopes[leaf] * part).sum()
            below = owed.pop(_column(tiles[index]), {})
            crop_gradient, *carried_gradients = torch.autograd.grad(
                [surrogate, *(maps.handed[name] for name in below)],
                [crop, *maps.carried.values()],
                [None, *below.values()],
                allow_unused=True,
            )
            image.grad[..., maps.crop[0], maps.crop[1]] += crop_gradient
            # Copies: a carried row's gradient is a view of the gradient of the whole map it joined.
            owed[_column(tiles[index])] = {
                name: gradient.clone()
                for name, gradient in zip(maps.carried, carried_gradients, strict=True)
                if gradient is not None
            }
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
