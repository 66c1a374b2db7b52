"""Typed records the optimization loop reports through, and its exceptions."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Losses:
    """Weighted loss terms of one iteration (the total is their sum)."""

    total: float
    content: float
    style: float
    total_variation: float


@dataclass(frozen=True)
class Started:
    """The job's plan, the first record of every job: what runs, before any iteration does."""

    # (width, height) of each scale, coarse to fine.
    scales: tuple[tuple[int, int], ...]
    iterations_total: int
    # The precision the network really runs in ("fp32" or "bf16"; never "auto"), and why.
    precision: str
    precision_reason: str
    # Things the caller should know, such as bf16 asked for on hardware that emulates it.
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Progress:
    """One optimizer iteration. `image` (3 x H x W, float in [0, 1], on the CPU) is set only
    when a preview was due at this iteration."""

    iteration: int  # 1-based, over all scales
    iterations_total: int
    scale: int  # 0-based
    scales: int
    width: int
    height: int
    losses: Losses
    elapsed_seconds: float
    eta_seconds: float
    image: torch.Tensor | None = None


@dataclass(frozen=True)
class Result:
    """The finished job: the output image (3 x H x W, float in [0, 1], on the CPU)."""

    image: torch.Tensor
    losses: Losses
    iterations: int
    elapsed_seconds: float
    # The part of elapsed_seconds spent computing content and style targets (all scales).
    target_seconds: float = 0.0


class Cancelled(Exception):
    """The job's cancel flag was set; raised within one iteration of it."""


# The options that drive each loss term, the suspects when it stops being finite.
TERM_OPTIONS: dict[str, tuple[str, ...]] = {
    "content": ("content_weight", "content_layers"),
    "style": ("style_weight", "style_layers", "style_scale"),
    "total_variation": ("tv_weight",),
    "total": ("content_weight", "style_weight", "tv_weight"),
}


class NonFiniteLoss(Exception):
    """A loss term is NaN or infinite: the job cannot produce a meaningful image, and never reports one."""

    def __init__(self, term: str, iteration: int):
        self.term = term
        self.iteration = iteration
        self.options = TERM_OPTIONS[term]
        super().__init__(
            f"the {term.replace('_', ' ')} loss is not finite at iteration {iteration}; "
            f"the options most likely responsible: {', '.join(self.options)}"
        )


def finite_losses(values: list[float], iteration: int) -> Losses:
    """The four loss terms as a record; NonFiniteLoss naming the first term (content, style, total
    variation, then the total) that is not finite."""
    losses = Losses(*values)
    for term in ("content", "style", "total_variation", "total"):
        if not math.isfinite(getattr(losses, term)):
            raise NonFiniteLoss(term, iteration)
    return losses
