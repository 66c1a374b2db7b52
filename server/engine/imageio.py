"""PIL images <-> float tensors, the engine's image type: [3, H, W] RGB in [0, 1] on the CPU.

Decoding policy: the EXIF orientation is applied (a phone photo comes out upright);
transparency is composited onto white (what a viewer shows for a transparent PNG, and
VGG has no alpha channel); single-channel modes wider than 8 bits (16-bit and 32-bit integer
grey, float grey) are scaled by the value that means white, because PIL's own RGB conversion
clips them to 8 bits (a 16-bit gradient comes out almost all white); every other mode (grey,
palette, CMYK, 16-bit RGB) is converted to 8-bit RGB by PIL.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

# The value that means white in each wide single-channel mode. "I" is what PNG's 16-bit grey decodes to in
# some Pillow versions, so it is read on the 16-bit scale; "F" on the 8-bit scale PIL's own conversion uses.
WIDE_GREY_WHITE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 255}


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def pil_to_tensor(image: Image.Image) -> Tensor:
    image = ImageOps.exif_transpose(image)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode in WIDE_GREY_WHITE:
        grey = np.asarray(image, dtype=np.float64) / WIDE_GREY_WHITE[image.mode]
        return torch.from_numpy(np.clip(grey, 0, 1)).float().expand(3, -1, -1).contiguous()
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)


def tensor_to_pil(image: Tensor) -> Image.Image:
    """[3, H, W] (or [1, 3, H, W]) float in [0, 1], any device -> 8-bit RGB image (values clipped)."""
    if image.dim() == 4:
        image = image.squeeze(0)
    # One float copy (clamp), scaled and rounded in place, then bytes: a large output is not copied in float
    # again for each step.
    scaled = image.detach().float().clamp(0, 1).mul_(255).round_()
    array = scaled.to(torch.uint8).permute(1, 2, 0).cpu()
    return Image.fromarray(array.numpy())
