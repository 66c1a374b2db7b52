"""Building a StylizeRequest from what a caller has at hand: paths, bytes or PIL images, and keywords.

Images go on the wire encoded. Bytes and files in a format the API accepts (PNG, JPEG, WebP) are sent
as they are; PIL images, and files in other formats PIL reads (BMP, TIFF, ...), are encoded as PNG
here. Every problem found before sending (a missing file, an unreadable image, an unknown option)
is reported at once as one InvalidArgument naming each field, like the server would.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from stylize.api.options import FieldViolation, client_tag_violations
from stylize.api.wire import PIL_FORMATS
from stylize.client.errors import InvalidArgument
from stylize.client.options import (
    check_preset,
    image_format_to_proto,
    preview_options_to_proto,
    style_options_to_proto,
)
from stylize.v1 import stylize_pb2

ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image
# A style image, or (style image, relative weight).
StyleSource = ImageSource | tuple[ImageSource, float]

# Keywords of stylize()/submit() that shape previews, mapped onto PreviewOptions' fields.
PREVIEW_KEYWORDS = {
    "preview_every": "every",
    "preview_max_size": "max_size",
    "preview_format": "format",
    "preview_quality": "quality",
}


class _Problem(Exception):
    def __init__(self, description: str):
        self.description = description


def _png(image: Image.Image) -> bytes:
    if image.mode not in {"1", "L", "LA", "I", "P", "RGB", "RGBA"}:
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _checked(data: bytes) -> bytes:
    """The bytes if their header is an image in a wire format; PNG if PIL reads another format."""
    if not data:
        raise _Problem("is empty")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except UnidentifiedImageError:
        raise _Problem("is not an image (PNG, JPEG or WebP expected)") from None
    return data if image.format in PIL_FORMATS else _png(image)


def encode_image(source: object) -> bytes:
    """Encoded bytes for one image input; raises _Problem with what is wrong with it."""
    if isinstance(source, Image.Image):
        return _png(source)
    if isinstance(source, bytes | bytearray | memoryview):
        return _checked(bytes(source))
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise _Problem(f"no such file: {path}") from None
        except OSError as error:
            raise _Problem(f"cannot read {path}: {error.strerror or error}") from None
        return _checked(data)
    raise _Problem(f"expected a path, bytes or a PIL image, got {type(source).__name__}")


def _style(source: StyleSource) -> tuple[ImageSource, float | None]:
    if isinstance(source, tuple) and len(source) == 2:
        return source[0], source[1]
    return source, None


def build_request(
    content: ImageSource,
    styles: Sequence[StyleSource] | ImageSource,
    *,
    preset: str | None = None,
    output_format: str | None = None,
    client_tag: str = "",
    **settings: object,
) -> stylize_pb2.StylizeRequest:
    """The request for one job.

    `styles` is one image or a list of images or (image, weight) pairs. `settings` are the engine
    options by name (size=256, style_weight=1e4, style_layers=["relu1_1", "block2_conv1:0.5"], ...)
    and preview_every / preview_max_size / preview_format / preview_quality. `preset` names a recipe
    (stylize.api.presets: gatys2016, fast-preview, ...) that fills every option the call
    does not set; without one, unset options take the server's defaults. Raises InvalidArgument
    naming every bad field.
    """
    if isinstance(styles, str | os.PathLike | bytes | bytearray | memoryview | Image.Image):
        styles = [styles]
    violations: list[FieldViolation] = []
    request = stylize_pb2.StylizeRequest(client_tag=client_tag)
    try:
        request.content_image = encode_image(content)
    except _Problem as problem:
        violations.append(FieldViolation("content_image", problem.description))
    if not styles:
        violations.append(FieldViolation("styles", "at least one style image is required"))
    for index, source in enumerate(styles):
        image, weight = _style(source)
        style = request.styles.add()
        try:
            style.image = encode_image(image)
        except _Problem as problem:
            violations.append(FieldViolation(f"styles[{index}].image", problem.description))
        if isinstance(weight, int | float) and not isinstance(weight, bool):
            style.weight = weight
        elif weight is not None:
            violations.append(FieldViolation(f"styles[{index}].weight", f"must be a number, got {weight!r}"))
    try:
        request.preset = check_preset(preset)
    except InvalidArgument as error:
        violations += error.violations
    violations += client_tag_violations(client_tag)
    preview = {PREVIEW_KEYWORDS[k]: settings.pop(k) for k in list(settings) if k in PREVIEW_KEYWORDS}
    preview = {name: value for name, value in preview.items() if value is not None}
    options = {name: value for name, value in settings.items() if value is not None}
    for build, values, target in (
        (style_options_to_proto, options, request.options),
        (preview_options_to_proto, preview, request.preview),
    ):
        try:
            target.CopyFrom(build(values))
        except InvalidArgument as error:
            violations += error.violations
    if output_format is not None:
        try:
            request.output_format = image_format_to_proto(output_format, "output_format")
        except InvalidArgument as error:
            violations += error.violations
    if violations:
        raise InvalidArgument.of(violations)
    return request
