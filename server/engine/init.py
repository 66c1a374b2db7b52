"""The starting image of the first scale.

Randomness comes only from a torch.Generator seeded with the job's seed, on the CPU (so a
seed gives the same picture on every device); the global RNG is never touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor

from stylize.api.options import Init


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def initial_image(
    init: Init, content: Tensor, styles: Sequence[tuple[Tensor, float]], *, seed: int
) -> Tensor:
    """[C, H, W] in [0, 1], shaped like `content` (already at the first scale's size); `styles` are
    (image, share) pairs whose shares sum to 1.

    - content: the content itself;
    - noise: uniform noise;
    - gray: mid-gray;
    - style_stats: Gaussian noise with the per-channel mean and standard deviation of the
      styles (blended by weight), so the colours start where the style loss wants them.
    """
    if init == Init.CONTENT:
        return content.clone()
    if init == Init.NOISE:
        return torch.rand(tuple(content.shape), generator=_generator(seed)).to(content.device)
    if init == Init.GRAY:
        return torch.full_like(content, 0.5)
    # sum() of tensors is a tensor (there is at least one style); mypy sees `Tensor | Literal[0]`.
    mean = cast(Tensor, sum(style.mean(dim=(1, 2)) * share for style, share in styles))
    # Population statistics (correction 0): a one-pixel style has spread 0, not the NaN of n - 1 = 0.
    spreads = (style.std(dim=(1, 2), correction=0) * share for style, share in styles)
    std = cast(Tensor, sum(spreads))
    normal = torch.randn(tuple(content.shape), generator=_generator(seed)).to(content.device)
    return (normal * std[:, None, None] + mean[:, None, None]).clamp(0, 1)
