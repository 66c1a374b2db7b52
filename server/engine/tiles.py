"""Losses and their gradient computed a tile at a time, so memory is bounded by the tile, not the image.

Every style statistic is a sum over positions (a Gram matrix, a mean and a second moment, each over the
image's positions), so the tiles' shares add up to the image's statistic exactly. The gradient of a loss
L(S) of such a statistic at a tile's features is that of the tile's share s(F) taken against the fixed
dL/dS, because dL/dF = dL/dS . dS/dF and only the tile's share of S depends on its features. The content
loss is a sum over positions too; the total variation works on pixels and is computed on the whole image.
So one evaluation is:

1. every tile forward without gradients: the statistics and the loss values;
2. dL/dS from the statistics (small: channels x channels per layer);
3. every tile forward and backward on  sum <dL/dS, s(F)> + its content share, its input's gradient added
   into the image's.

A tile is its core (the pixels whose features it contributes) and a halo of context around it: a core
feature near the tile's edge sees the halo instead of the neighbouring pixels the whole image would show,
so the gradient is exact up to the receptive field the halo cuts (docs/tiles.md measures it). Tile edges
fall on multiples of the deepest layer's downsampling, so every pooling window and every feature position
of a tile is one of the whole image's. The grid moves every iteration, so no pixel sits at a tile border
twice in a row.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from stylize.api.options import TILE_ALIGN

from .losses import ContentLoss, GramStyleLoss, LayerSum, MeanCovarianceStyleLoss, Objective

# The network's features of an input crop [1, C, h, w], by layer.
FeaturesFn = Callable[[Tensor], Mapping[str, Tensor]]
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

    def core_features(self, downsampling: int) -> tuple[slice, slice]:
        """The core in the crop's feature map of a layer `downsampling` times smaller than the input."""
        return tuple(  # type: ignore[return-value]  # two slices
            slice((core.start - crop.start) // downsampling, (core.stop - crop.start) // downsampling)
            for core, crop in zip(self.core, self.crop, strict=True)
        )

    def image_features(self, downsampling: int) -> tuple[slice, slice]:
        """The core in the whole image's feature map of that layer."""
        return tuple(  # type: ignore[return-value]  # two slices
            slice(core.start // downsampling, core.stop // downsampling) for core in self.core
        )


def _cuts(length: int, tile: int, offset: int) -> list[int]:
    inner = range(tile - offset, length, tile)
    return [0, *(cut for cut in inner if cut > 0), length]


def tile_grid(
    height: int, width: int, *, tile: int, halo: int, shift: tuple[int, int] = (0, 0)
) -> list[Tile]:
    """Tiles covering an image: cores of `tile` pixels (smaller at the edges), the grid moved by `shift`
    (any integers: reduced to multiples of TILE_ALIGN below `tile`); each crop adds `halo` pixels of
    context on every side, inside the image. `tile` and `halo` are multiples of TILE_ALIGN."""
    if tile <= 0 or tile % TILE_ALIGN or halo % TILE_ALIGN:
        raise ValueError(f"tile {tile} and halo {halo} must be multiples of {TILE_ALIGN}")
    steps = tile // TILE_ALIGN
    rows, columns = (
        _cuts(length, tile, shift_by % steps * TILE_ALIGN)
        for length, shift_by in zip((height, width), shift, strict=True)
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
    """A new grid shift for every iteration (tile_grid's `shift`): seeded, so a job is reproducible."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        rows, columns = torch.randint(0, 2**20, (2,), generator=generator).tolist()
        yield rows, columns


def largest_tile(halo: int, device: torch.device) -> int:
    """The largest tile (a multiple of TILE_ALIGN, at least 2 of them) whose crop a pass can plan for
    within the memory free on `device`."""
    crop = math.isqrt(int(MEMORY_SHARE * free_memory(device) / BYTES_PER_PIXEL))
    return max(2 * TILE_ALIGN, (crop - 2 * halo) // TILE_ALIGN * TILE_ALIGN)


def positions(size: tuple[int, int], downsampling: int) -> int:
    """Positions of a layer's feature map for an input of `size` (height, width): floor pooling."""
    return (size[0] // downsampling) * (size[1] // downsampling)


def _crop(image: Tensor, tile: Tile) -> Tensor:
    return image[..., tile.crop[0], tile.crop[1]]


def statistics_by_tiles(
    image: Tensor,
    tiles: Sequence[Tile],
    features_of: FeaturesFn,
    statistics: Mapping[str, StatisticFn],
    downsampling: Mapping[str, int],
) -> dict[str, Any]:
    """Each layer's statistic of the whole image, summed over the tiles' shares (no gradients)."""
    size = (image.shape[-2], image.shape[-1])
    totals: dict[str, Any] = {}
    with torch.no_grad():
        for tile in tiles:
            _accumulate(
                totals, _shares(features_of(_crop(image, tile)), tile, statistics, size, downsampling)
            )
    return totals


def _shares(
    features: Mapping[str, Tensor],
    tile: Tile,
    statistics: Mapping[str, StatisticFn],
    size: tuple[int, int],
    downsampling: Mapping[str, int],
) -> dict[str, Any]:
    """Each layer's statistic of a tile's core over the whole image's positions (size: height, width)."""
    shares = {}
    for name, statistic in statistics.items():
        rows, columns = tile.core_features(downsampling[name])
        shares[name] = statistic(features[name][..., rows, columns], positions(size, downsampling[name]))
    return shares


def _accumulate(totals: dict[str, Any], shares: Mapping[str, Any]) -> None:
    for name, share in shares.items():
        totals[name] = share if name not in totals else _add(totals[name], share)


def features_by_tiles(
    image: Tensor, tiles: Sequence[Tile], features_of: FeaturesFn, downsampling: Mapping[str, int]
) -> dict[str, Tensor]:
    """The whole image's feature maps of the given layers, assembled from the tiles' cores."""
    size = (image.shape[-2], image.shape[-1])
    found: dict[str, Tensor] = {}
    with torch.no_grad():
        for tile in tiles:
            features = features_of(_crop(image, tile))
            for name, d in downsampling.items():
                part = features[name].float()
                if name not in found:
                    found[name] = part.new_zeros((*part.shape[:2], size[0] // d, size[1] // d))
                rows, columns = tile.core_features(d)
                target_rows, target_columns = tile.image_features(d)
                found[name][..., target_rows, target_columns] = part[..., rows, columns]
    return found


def _add(total: Any, share: Any) -> Any:
    if isinstance(total, Tensor):
        return total + share
    return tuple(a + b for a, b in zip(total, share, strict=True))


def _leaves(statistic: Any) -> tuple[Tensor, ...]:
    return (statistic,) if isinstance(statistic, Tensor) else tuple(statistic)


def _content_share(
    content: LayerSum, features: Mapping[str, Tensor], tile: Tile, downsampling: Mapping[str, int]
) -> Tensor:
    terms = []
    for name, loss in content.losses.items():
        assert isinstance(loss, ContentLoss)
        rows, columns = tile.core_features(downsampling[name])
        target_rows, target_columns = tile.image_features(downsampling[name])
        share = loss.part(features[name][..., rows, columns], target_rows, target_columns)
        terms.append(share * content.weights[name])
    return torch.stack(terms).sum() if terms else torch.zeros(())


def tiled_terms(
    objective: Objective,
    image: Tensor,
    tiles: Sequence[Tile],
    features_of: FeaturesFn,
    downsampling: Mapping[str, int],
    *,
    gradient: bool,
) -> Tensor:
    """[total, content, style, total_variation] at `image` ([1, C, H, W]), as Objective gives them for the
    whole image; with `gradient`, the total's gradient is added to image.grad (image requires grad)."""
    style_losses = cast(Mapping[str, GramStyleLoss | MeanCovarianceStyleLoss], objective.style.losses)
    style_statistics = {name: loss.statistics for name, loss in style_losses.items()}
    size = (image.shape[-2], image.shape[-1])
    detached = image.detach()
    content = image.new_zeros(())
    totals: dict[str, Any] = {}
    with torch.no_grad():
        for tile in tiles:  # pass 1: statistics and values
            features = features_of(_crop(detached, tile))
            content = content + _content_share(objective.content, features, tile, downsampling).to(content)
            _accumulate(totals, _shares(features, tile, style_statistics, size, downsampling))
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
        assert image.grad is not None
        for tile in tiles:  # pass 2: each tile's share of the gradient
            crop = _crop(detached, tile).clone().requires_grad_(True)
            features = features_of(crop)
            surrogate = (
                _content_share(objective.content, features, tile, downsampling) * objective.content_weight
            )
            for name, share in _shares(features, tile, style_statistics, size, downsampling).items():
                for leaf, part in zip(leaves[name], _leaves(share), strict=True):
                    surrogate = surrogate + (slopes[leaf] * part).sum()
            surrogate.backward()
            assert crop.grad is not None
            image.grad[..., tile.crop[0], tile.crop[1]] += crop.grad
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
