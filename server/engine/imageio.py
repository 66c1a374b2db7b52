"""PIL images <-> float tensors, the engine's image type: [3, H, W] RGB in [0, 1] on the CPU.

Decoding policy: the EXIF orientation is applied (a phone photo comes out upright);
transparency is composited onto white (what a viewer shows for a transparent PNG, and
VGG has no alpha channel); every other mode (grey, palette, CMYK, 16-bit) is converted
to 8-bit RGB by PIL.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def pil_to_tensor(image: Image.Image) -> Tensor:
    image = ImageOps.exif_transpose(image)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)


def tensor_to_pil(image: Tensor) -> Image.Image:
    """[3, H, W] (or [1, 3, H, W]) float in [0, 1], any device -> 8-bit RGB image (values clipped)."""
    if image.dim() == 4:
        image = image.squeeze(0)
    array = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu()
    return Image.fromarray(array.numpy())
