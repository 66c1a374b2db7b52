"""Decoding request images safely and encoding results.

Decoding untrusted bytes is the service's main attack surface. Checks, in order: the encoded size, the
format (PNG, JPEG or WebP only), then the pixel count from the header BEFORE the pixels are decoded (a
20 kB PNG can inflate to gigabytes: a decompression bomb), in open_image; then the decode itself (truncated
or corrupt data), in load_image. Every failure names the request field.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from stylize.api.options import FieldViolation, OptionsError, one_line
from stylize.api.wire import IMAGE_FORMATS, PIL_FORMATS

# PIL reports truncated or corrupt streams, in the header (at open) as well as in the pixel data (at load),
# with whatever its parser hit: OSError ("image file is truncated", "could not create decoder object"),
# SyntaxError (broken PNG chunks), ValueError ("Truncated IHDR chunk"), struct.error, EOFError, ... Every
# exception while decoding untrusted bytes means "this image is unusable", never a server error.
_CORRUPT = "could not be decoded (truncated or corrupt)"


def _reject(field: str, description: str) -> OptionsError:
    return OptionsError([FieldViolation(field, description)])


def open_image(data: bytes, field: str, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Open `data` and check its header (bytes, format, size, pixels) without decoding a pixel, raising
    OptionsError naming `field` when it is unusable."""
    if not data:
        raise _reject(field, "is required: encoded PNG, JPEG or WebP bytes")
    if len(data) > max_bytes:
        raise _reject(field, f"is {len(data)} bytes; the limit is {max_bytes}")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit (below) is stricter than PIL's warning threshold.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    except Image.DecompressionBombError:
        # PIL refuses headers over twice its own threshold before we can read the size.
        raise _reject(field, f"has more than {max_pixels} pixels (a decompression bomb)") from None
    except UnidentifiedImageError:
        raise _reject(field, "is not a PNG, JPEG or WebP image") from None
    except Exception as error:  # see _CORRUPT
        raise _reject(field, f"{_CORRUPT}: {(one_line(error)[:200] or type(error).__name__)}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise _reject(field, f"has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise _reject(field, f"is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    return image


def decode_image(data: bytes, field: str, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Check and decode `data` (upright per EXIF): open_image, then load_image."""
    return load_image(open_image(data, field, max_bytes=max_bytes, max_pixels=max_pixels), field)


def load_image(image: Image.Image, field: str) -> Image.Image:
    """Decode an image open_image() accepted (upright per EXIF), raising OptionsError naming `field` when
    its data is unusable."""
    try:
        image.load()
        # Upright now, so the size the schedule plans with is the size the engine sees; in place, so that
        # an image without an orientation tag is not copied (a 40 Mpx copy, freed at once, stayed in the
        # decoding thread's heap and doubled what a queued request cost). Colour modes and alpha are left
        # to the engine's pil_to_tensor (one policy for every caller).
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as error:  # see _CORRUPT
        raise _reject(field, f"{_CORRUPT}: {(one_line(error)[:200] or type(error).__name__)}") from None
    return image


def fit_within(image: Image.Image, max_size: int) -> Image.Image:
    """Shrink so the longest edge is at most `max_size` (0: unchanged); never enlarges."""
    if max_size <= 0 or max(image.size) <= max_size:
        return image
    scale = max_size / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def encode_image(image: Image.Image, encoding: str, *, quality: int) -> bytes:
    """Encode as png, jpeg or webp; `quality` applies to the lossy formats."""
    buffer = io.BytesIO()
    if encoding == "png":
        image.save(buffer, format="PNG", compress_level=6)
    elif encoding == "jpeg":
        image.save(buffer, format="JPEG", quality=quality)
    elif encoding == "webp":
        image.save(buffer, format="WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"unknown encoding {encoding!r}; expected one of {', '.join(IMAGE_FORMATS)}")
    return buffer.getvalue()
