"""The two optimizers, stepped one iteration at a time so the loop can report and cancel per iteration.

Box constraint: both optimizers take a step, then clip the pixels to [0, 1] (projection).
For L-BFGS this is not textbook (its curvature pairs assume the step it proposed), and
neural-style instead lets pixels roam and clips only the output. Measured here (64 px,
200 iterations, random VGG weights, style weights 10 to 10000) the projected run ends with
a 2-4x lower loss *at the clipped output* that the user gets, because unconstrained pixels
drift far outside [0, 1] where the network happily uses them. For Adam, projection is plain projected
gradient descent.

Host-device syncs on CUDA: Adam's step has none. torch's L-BFGS has data-dependent branches
(curvature test, step size on the first iteration), so it syncs a few times per iteration.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

# Computes the loss terms at the current image and leaves the total's gradient in image.grad.
Closure = Callable[[], Tensor]

ADAM_BETAS = (0.9, 0.99)  # faster second-moment adaptation than 0.999 suits a few hundred steps


class Stepper(Protocol):
    image: Tensor

    def step(self, closure: Closure) -> Tensor:
        """One iteration; returns what the closure returned at the point it evaluated."""
        ...

    def output(self) -> Tensor:
        """The image to report, detached, in [0, 1]."""
        ...


class LBFGSStepper:
    """torch.optim.LBFGS with one function evaluation per step() and no line search (the
    classic neural-style setting); its history persists from one step() to the next."""

    def __init__(self, image: Tensor, *, history: int):
        # Contiguous whatever the caller passed: LBFGS flattens the gradient with view(-1).
        self.image = (
            image.detach().clone(memory_format=torch.contiguous_format).clamp(0, 1).requires_grad_(True)
        )
        self._optimizer = torch.optim.LBFGS(
            [self.image],
            lr=1.0,
            max_iter=1,
            history_size=history,
            tolerance_grad=0.0,  # never stop early: every iteration the caller pays for runs
            tolerance_change=0.0,
            line_search_fn=None,
        )

    def step(self, closure: Closure) -> Tensor:
        terms: list[Tensor] = []

        def evaluate() -> Tensor:
            self._optimizer.zero_grad(set_to_none=False)
            terms.append(closure())
            return terms[-1][0]

        self._optimizer.step(evaluate)
        with torch.no_grad():
            self.image.clamp_(0, 1)
        return terms[0]

    def output(self) -> Tensor:
        return self.image.detach().clone()


class AdamStepper:
    """Adam on the pixels, clipped to [0, 1] after each step; the output is a bias-corrected
    exponential moving average of the iterates (ema_decay 0: the last iterate), which removes
    most of the high-frequency noise Adam's steps leave in the image."""

    def __init__(self, image: Tensor, *, learning_rate: float, ema_decay: float):
        self.image = image.detach().clone().clamp(0, 1).requires_grad_(True)
        self._optimizer = torch.optim.Adam([self.image], lr=learning_rate, betas=ADAM_BETAS)
        self._decay = ema_decay
        self._average = torch.zeros_like(self.image)
        self._weight = 0.0  # 1 - decay^steps, the bias correction; a Python float: no sync

    def continue_from(self, previous: AdamStepper) -> None:
        """Carry the previous scale's moment estimates over, resized to this scale, so the first
        steps here are as measured as the last ones there (a fresh Adam moves every pixel by
        about the learning rate at once)."""
        old = previous._optimizer.state[previous.image]
        if not old:
            return
        size = self.image.shape[-2:]
        self._optimizer.state[self.image] = {
            "step": old["step"].clone(),
            "exp_avg": F.interpolate(old["exp_avg"], size=size, mode="bilinear", align_corners=False),
            "exp_avg_sq": F.interpolate(old["exp_avg_sq"], size=size, mode="bilinear", align_corners=False),
        }

    def step(self, closure: Closure) -> Tensor:
        self._optimizer.zero_grad(set_to_none=False)
        terms = closure()
        self._optimizer.step()
        with torch.no_grad():
            self.image.clamp_(0, 1)
            self._average.mul_(self._decay).add_(self.image, alpha=1 - self._decay)
        self._weight = 1 - (1 - self._weight) * self._decay
        return terms

    def output(self) -> Tensor:
        if self._weight == 0.0:
            return self.image.detach().clone()
        return (self._average / self._weight).clamp(0, 1)
