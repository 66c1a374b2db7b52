"""How long a job will run, from what this server's workers measured, and the figure a Stylize deadline is
judged by.

The workers record the seconds each optimizer iteration took, per kind of job (JobKind: the backbone, the
precision the network really ran in, how deep into the network its layers reach) and per size class (the
scale's output pixels, in steps of 4x). The first progress record of each scale is not recorded: it holds
that scale's targets and the first run of new tensor shapes, which the issue's 73.8 s estimate for a 7.5 s
job came from.

An Estimate of a planned job has two figures:
- `expected`: each scale's iterations at the seconds per iteration interpolated, by pixels, between the
  size classes measured for its kind (extrapolated beyond them, see _interpolate);
- `lower`: what the job cannot run faster than. It rests on two properties of the cost, true of convolutions
  on any device: an iteration at more pixels, or through more layers, never takes less time; and at more
  pixels it never costs more per pixel. So an iteration measured at t seconds on q pixels bounds one at p
  pixels from below by t * min(1, p / q), for every kind of the same backbone and precision that is no
  deeper. Each size class keeps its fastest measurement (per pixel), and the bound is divided by
  CONSERVATIVE_FACTOR for measurement noise and what the two properties leave out (cache sizes, more loss
  layers on a shallower network).

A deadline shorter than `lower` is refused up front (stylize.server.service): a call that could have finished
is never refused. Without a measurement that applies there is no estimate, and every deadline is accepted.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from stylize.api.options import LAYERS, Backbone, Precision, StyleOptions
from stylize.api.schedule import Scale
from stylize.server.engine.run import active_layers

# Weight of the newest measurement in a size class's smoothed seconds per pixel-iteration.
SPEED_SMOOTHING = 0.2
# The lower bound is the measured bound divided by this.
CONSERVATIVE_FACTOR = 2.0


@dataclass(frozen=True)
class JobKind:
    """What sets the cost of an iteration besides its pixels."""

    backbone: str
    precision: str  # as run: fp32 or bf16, never auto
    depth: int  # modules of the network an iteration runs through (its deepest active layer's index + 1)


def network_depth(options: StyleOptions) -> int:
    """How many modules of the backbone's network the job's iterations run: up to its deepest layer that
    weighs anything (the engine computes no deeper)."""
    layers = LAYERS[Backbone(options.backbone)]
    content, style = active_layers(options)
    return max((layers.index(name) + 1 for name in (*content, *style)), default=0)


def job_kinds(options: StyleOptions, auto_precisions: Iterable[str]) -> list[JobKind]:
    """The kinds a job may run as: its precision, or when it asks for auto, what auto resolves to on each
    device (`auto_precisions`)."""
    precisions = (
        sorted(set(auto_precisions)) if options.precision == Precision.AUTO else [str(options.precision)]
    )
    depth = network_depth(options)
    return [JobKind(str(options.backbone), precision, depth) for precision in precisions]


def size_class(pixels: int) -> int:
    """Class c holds the scales of 4^(c-1) to 4^c output pixels (a 2x step in edge)."""
    return max(0, math.ceil(math.log(max(1, pixels), 4) - 1e-9))


@dataclass
class _Measured:
    """One size class of one kind."""

    # The smoothed figures: seconds per pixel-iteration, and the pixels they were measured at.
    rate: float
    pixels: float
    # The fastest iteration per pixel seen, as (pixels, seconds).
    fastest_pixels: int
    fastest_seconds: float


@dataclass(frozen=True)
class Estimate:
    expected_seconds: float
    lower_seconds: float


class RunTimeEstimator:
    """The measurements of one server's workers (thread-safe: workers record, the event loop estimates)."""

    def __init__(
        self, smoothing: float = SPEED_SMOOTHING, conservative_factor: float = CONSERVATIVE_FACTOR
    ) -> None:
        self._smoothing = smoothing
        self._factor = conservative_factor
        self._measured: dict[JobKind, dict[int, _Measured]] = {}
        self._lock = threading.Lock()

    def record(self, kind: JobKind, pixels: int, seconds_per_iteration: float) -> None:
        if pixels < 1 or not seconds_per_iteration > 0:
            return
        rate = seconds_per_iteration / pixels
        with self._lock:
            classes = self._measured.setdefault(kind, {})
            measured = classes.get(size_class(pixels))
            if measured is None:
                classes[size_class(pixels)] = _Measured(rate, pixels, pixels, seconds_per_iteration)
                return
            measured.rate += self._smoothing * (rate - measured.rate)
            measured.pixels += self._smoothing * (pixels - measured.pixels)
            if rate < measured.fastest_seconds / measured.fastest_pixels:
                measured.fastest_pixels, measured.fastest_seconds = pixels, seconds_per_iteration

    def estimate(self, kinds: Sequence[JobKind], plan: Sequence[Scale]) -> Estimate | None:
        """The job's figures if it runs as any of `kinds` (the smallest of each); None when one of them has
        no measurement that bounds it (it might run as that kind, at any speed)."""
        with self._lock:
            figures = [self._estimate(kind, plan) for kind in kinds]
        if not figures or any(figure is None for figure in figures):
            return None
        known = [figure for figure in figures if figure is not None]
        return Estimate(
            min(figure.expected_seconds for figure in known), min(figure.lower_seconds for figure in known)
        )

    def _estimate(self, kind: JobKind, plan: Sequence[Scale]) -> Estimate | None:
        bounding = [
            measured
            for other, classes in self._measured.items()
            if other.backbone == kind.backbone
            and other.precision == kind.precision
            and other.depth <= kind.depth
            for measured in classes.values()
        ]
        if not bounding:
            return None
        lower = sum(
            scale.iterations
            * max(m.fastest_seconds * min(1.0, scale.pixels / m.fastest_pixels) for m in bounding)
            for scale in plan
        )
        lower /= self._factor
        own = sorted((m.pixels, m.rate * m.pixels) for m in self._measured.get(kind, {}).values())
        if own:
            expected = sum(scale.iterations * _interpolate(own, scale.pixels) for scale in plan)
        else:  # only shallower kinds measured: the job takes at least what they bound
            expected = lower * self._factor
        return Estimate(max(expected, lower), lower)


def _interpolate(points: Sequence[tuple[float, float]], pixels: int) -> float:
    """Seconds per iteration at `pixels` from (pixels, seconds) points sorted by pixels: on the line through
    the two points around it, or beyond the outermost on the line through the two outermost, kept within
    what the two properties of the cost allow there (between the outermost point's time and that time
    scaled by pixels); proportional to pixels from a single point."""
    if len(points) == 1:
        ((p0, t0),) = points
        return t0 * pixels / p0
    if pixels <= points[0][0]:
        (p0, t0), (p1, t1) = points[0], points[1]
        low, high = t0 * pixels / p0, t0
    elif pixels >= points[-1][0]:
        (p0, t0), (p1, t1) = points[-2], points[-1]
        low, high = t1, t1 * pixels / p1
    else:
        (p0, t0), (p1, t1) = next((a, b) for a, b in itertools.pairwise(points) if pixels <= b[0])
        low, high = 0.0, math.inf
    line = t0 + (t1 - t0) * (pixels - p0) / (p1 - p0)
    return min(max(line, low), high)
