"""Coarse-to-fine schedule: the output sizes of the scales and the iterations spent at each.

Pure Python (no torch) so that option validation can count iterations and pixels
before any work. The first scale has `min_size` as its longest edge, the last
exactly `size`; in between the edge grows geometrically by a ratio as close to
`scale_factor` as fits a whole number of steps. Every scale keeps the content's
aspect ratio. The first scale starts from scratch and runs `initial_iterations`;
each later one starts from the previous result, upsampled, and runs `iterations`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # options validates with the schedule, so the schedule cannot import options at run time
    from stylize.api.options import StyleOptions


@dataclass(frozen=True)
class Scale:
    width: int
    height: int
    iterations: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def scale_count(size: int, min_size: int, scale_factor: float) -> int:
    """Number of scales, without building them (validation uses it to refuse absurd schedules)."""
    if size <= min_size:
        return 1
    return 1 + max(1, round(math.log(size / min_size) / math.log(scale_factor)))


def scale_edges(size: int, min_size: int, scale_factor: float) -> list[int]:
    """Longest edge of each scale, strictly increasing, first `min_size`, last `size`."""
    steps = scale_count(size, min_size, scale_factor) - 1
    if steps == 0:
        return [size]
    ratio = (size / min_size) ** (1.0 / steps)
    edges = [round(min_size * ratio**k) for k in range(steps)] + [size]
    return sorted(set(edges))  # rounding can merge neighbours when the ratio is barely above 1


def fit(edge: int, content_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) with longest edge `edge` and the aspect ratio of `content_size` (width, height)."""
    width, height = content_size
    if width >= height:
        return edge, max(1, round(edge * height / width))
    return max(1, round(edge * width / height)), edge


def plan(
    *,
    size: int,
    min_size: int,
    scale_factor: float,
    iterations: int,
    initial_iterations: int,
    content_size: tuple[int, int],
) -> list[Scale]:
    edges = scale_edges(size, min_size, scale_factor)
    return [
        Scale(*fit(edge, content_size), iterations=initial_iterations if index == 0 else iterations)
        for index, edge in enumerate(edges)
    ]


def plan_for(options: StyleOptions, content_size: tuple[int, int]) -> list[Scale]:
    """The scales of a job with these options on a content image of content_size (width, height)."""
    return plan(
        size=options.size,
        min_size=options.min_size,
        scale_factor=options.scale_factor,
        iterations=options.iterations,
        initial_iterations=options.initial_iterations,
        content_size=content_size,
    )


def total_iterations(*, iterations: int, initial_iterations: int, scales: int) -> int:
    return initial_iterations + (scales - 1) * iterations
