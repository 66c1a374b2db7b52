"""The bundled sample images (assets/samples/) as the engine takes them: float RGB tensors [3, H, W]."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from stylize.server.engine.imageio import pil_to_tensor

SAMPLES = Path(__file__).resolve().parent.parent / "assets" / "samples"


def sample(name: str, edge: int) -> torch.Tensor:
    """A sample with its longest edge at most `edge`, its aspect kept."""
    image = Image.open(SAMPLES / name)
    image.thumbnail((edge, edge))
    return pil_to_tensor(image)


def sample_sized(name: str, size: tuple[int, int]) -> torch.Tensor:
    """A sample resized to exactly `size` (width, height)."""
    return pil_to_tensor(Image.open(SAMPLES / name).convert("RGB").resize(size))
