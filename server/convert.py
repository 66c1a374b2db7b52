"""Between the wire (stylize.v1 protos) and the engine's records.

Presence matters: an unset `optional` field, an UNSPECIFIED enum or an empty list means "the default":
the request's preset's value (stylize.api.presets), or without a preset the engine's default
(stylize.api.options); neither is restated here. Field paths in errors are the proto's
("options.size", "options.style_layers[1].layer", "styles[0].weight", "preview.every").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from enum import StrEnum

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from PIL import Image

from stylize.api import options as engine_options
from stylize.api.options import (
    DEFAULT_PREVIEW,
    DEFAULTS,
    Backbone,
    ColorMode,
    FieldViolation,
    Init,
    Limits,
    LossNormalization,
    Optimizer,
    OptionsError,
    Padding,
    Pooling,
    Precision,
    PreviewOptions,
    StyleLoss,
    StyleOptions,
    StyleResize,
    with_canonical_layers,
)
from stylize.api.presets import PRESETS, apply_preset, unknown_preset
from stylize.server.engine.records import Losses, Progress, Started
from stylize.v1 import stylize_pb2 as pb

from .codec import decode_image

MAX_CLIENT_TAG = 128
# The proto's documented default for LayerWeight.weight and StyleImage.weight.
DEFAULT_WEIGHT = 1.0
OUTPUT_DEFAULT_ENCODING = "png"

# StyleOptions fields that are proto enums, with the engine's StrEnum and the proto enum's value prefix.
_ENUM_FIELDS: dict[str, tuple[type[StrEnum], str]] = {
    "style_loss": (StyleLoss, "STYLE_LOSS_"),
    "loss_normalization": (LossNormalization, "LOSS_NORMALIZATION_"),
    "style_resize": (StyleResize, "STYLE_RESIZE_"),
    "backbone": (Backbone, "BACKBONE_"),
    "optimizer": (Optimizer, "OPTIMIZER_"),
    "init": (Init, "INIT_"),
    "color": (ColorMode, "COLOR_MODE_"),
    "pooling": (Pooling, "POOLING_"),
    "padding": (Padding, "PADDING_"),
    "precision": (Precision, "PRECISION_"),
}
_LAYER_FIELDS = ("content_layers", "style_layers")
_ENCODING_BY_FORMAT = {pb.IMAGE_FORMAT_PNG: "png", pb.IMAGE_FORMAT_JPEG: "jpeg", pb.IMAGE_FORMAT_WEBP: "webp"}
_FORMAT_BY_ENCODING = {name: number for number, name in _ENCODING_BY_FORMAT.items()}


@dataclass(frozen=True)
class JobRequest:
    """A decoded, validated request: what a worker needs to run the job (no protos, no tensors)."""

    content: Image.Image
    # (image, blend weight); the weights sum to 1.
    styles: tuple[tuple[Image.Image, float], ...]
    options: StyleOptions
    preview: PreviewOptions
    output_encoding: str
    client_tag: str


def _enum_from_proto(
    message: Message, name: str, kind: type[StrEnum], prefix: str, path: str
) -> StrEnum | None:
    """The engine enum of a proto enum field, None for UNSPECIFIED; OptionsError for unknown numbers."""
    number = getattr(message, name)
    if number == 0:
        return None
    value = message.DESCRIPTOR.fields_by_name[name].enum_type.values_by_number.get(number)
    if value is None:
        raise OptionsError([FieldViolation(path, f"unknown enum value {number}")])
    return kind(value.name.removeprefix(prefix).lower())


def _enum_to_proto(value: StrEnum, prefix: str) -> str:
    return prefix + value.value.upper()


def from_float32(value: float) -> float:
    """The shortest decimal that is this float32: a caller's 0.02 arrives as 0.019999999552965164 and is 0.02
    again here, so wire values compare equal to the same numbers written in Python."""
    return float(str(np.float32(value)))


def _weight(message: pb.LayerWeight | pb.StyleImage) -> float:
    return from_float32(message.weight) if message.HasField("weight") else DEFAULT_WEIGHT


def _layers_from_proto(layers: Sequence[pb.LayerWeight]) -> tuple[tuple[str, float], ...]:
    return tuple((layer.layer, _weight(layer)) for layer in layers)


def options_from_proto(message: pb.StyleOptions, path: str = "options", preset: str = "") -> StyleOptions:
    """StyleOptions with the fields set in `message` over `preset` (a name; "" for none: the engine's
    defaults); raises OptionsError for unknown enum values and an unknown preset only (the engine's
    validate() checks the rest)."""
    values: dict[str, object] = {}
    violations: list[FieldViolation] = []
    for field in fields(StyleOptions):
        name = field.name
        if name in _ENUM_FIELDS:
            kind, prefix = _ENUM_FIELDS[name]
            try:
                enum_value = _enum_from_proto(message, name, kind, prefix, f"{path}.{name}")
            except OptionsError as error:
                violations += error.violations
                continue
            if enum_value is not None:
                values[name] = enum_value
        elif name in _LAYER_FIELDS:
            layers = getattr(message, name)
            if layers:
                values[name] = _layers_from_proto(layers)
        elif message.HasField(name):
            value = getattr(message, name)
            is_float = message.DESCRIPTOR.fields_by_name[name].type == FieldDescriptor.TYPE_FLOAT
            values[name] = from_float32(value) if is_float else value
    if preset and preset not in PRESETS:
        violations.append(unknown_preset(preset))
    if violations:
        raise OptionsError(violations)
    return apply_preset(preset, values)


def options_to_proto(options: StyleOptions) -> pb.StyleOptions:
    """Every field set explicitly (ServerInfo.default_options lists the defaults in full)."""
    message = pb.StyleOptions()
    for field in fields(StyleOptions):
        value = getattr(options, field.name)
        if field.name in _ENUM_FIELDS:
            setattr(message, field.name, _enum_to_proto(value, _ENUM_FIELDS[field.name][1]))
        elif field.name in _LAYER_FIELDS:
            getattr(message, field.name).extend(pb.LayerWeight(layer=n, weight=w) for n, w in value)
        else:
            setattr(message, field.name, value)
    return message


def preview_from_proto(message: pb.PreviewOptions, limits: Limits, path: str = "preview") -> PreviewOptions:
    violations: list[FieldViolation] = []
    values: dict[str, object] = {}
    for name in ("every", "max_size", "quality"):
        if message.HasField(name):
            values[name] = getattr(message, name)
    if message.format != pb.IMAGE_FORMAT_UNSPECIFIED:
        encoding = _ENCODING_BY_FORMAT.get(message.format)
        if encoding is None:
            violations.append(FieldViolation(f"{path}.format", f"unknown enum value {message.format}"))
        else:
            values["format"] = encoding
    preview = replace(DEFAULT_PREVIEW, **values)
    if preview.every > limits.max_iterations:
        violations.append(
            FieldViolation(f"{path}.every", f"must be at most {limits.max_iterations}, got {preview.every}")
        )
    if preview.max_size > limits.max_size:
        violations.append(
            FieldViolation(f"{path}.max_size", f"must be at most {limits.max_size}, got {preview.max_size}")
        )
    if not 1 <= preview.quality <= 100:
        violations.append(FieldViolation(f"{path}.quality", f"must be 1..100, got {preview.quality}"))
    if violations:
        raise OptionsError(violations)
    return preview


def _request_field(field: str) -> str:
    """validate() names option fields relative to StyleOptions and the inputs "content" and "styles..."."""
    if field == "content":
        return "content_image"
    if field.startswith("styles"):
        return field
    return f"options.{field}"


def _decode_all(
    request: pb.StylizeRequest, limits: Limits, violations: list[FieldViolation]
) -> tuple[Image.Image | None, list[Image.Image]]:
    def decode(data: bytes, field: str) -> Image.Image | None:
        try:
            return decode_image(
                data, field, max_bytes=limits.max_image_bytes, max_pixels=limits.max_input_pixels
            )
        except OptionsError as error:
            violations.extend(error.violations)
            return None

    content = decode(request.content_image, "content_image")
    if not 1 <= len(request.styles) <= limits.max_styles:
        return content, []  # validate() reports the count; decoding a flood of images would be wasted work
    styles = [decode(style.image, f"styles[{index}].image") for index, style in enumerate(request.styles)]
    return content, [image for image in styles if image is not None]


def request_from_proto(request: pb.StylizeRequest, limits: Limits) -> JobRequest:
    """Decode and validate a whole request, collecting every violation before raising OptionsError.

    Decoding is CPU work (call it off the event loop); no torch here.
    """
    violations: list[FieldViolation] = []
    content, style_images = _decode_all(request, limits, violations)
    style_weights = [_weight(style) for style in request.styles]

    options = DEFAULTS
    try:
        options = options_from_proto(request.options, preset=request.preset)
    except OptionsError as error:
        violations += error.violations
    else:
        try:
            engine_options.validate(
                options,
                limits,
                content_size=content.size if content else None,
                styles=len(request.styles),
                style_weights=style_weights,
            )
        except OptionsError as error:
            violations += [replace(v, field=_request_field(v.field)) for v in error.violations]

    preview = DEFAULT_PREVIEW
    try:
        preview = preview_from_proto(request.preview, limits)
    except OptionsError as error:
        violations += error.violations

    output_encoding = OUTPUT_DEFAULT_ENCODING
    if request.output_format != pb.IMAGE_FORMAT_UNSPECIFIED:
        if request.output_format in _ENCODING_BY_FORMAT:
            output_encoding = _ENCODING_BY_FORMAT[request.output_format]
        else:
            violations.append(FieldViolation("output_format", f"unknown enum value {request.output_format}"))
    if len(request.client_tag) > MAX_CLIENT_TAG:
        violations.append(
            FieldViolation(
                "client_tag", f"at most {MAX_CLIENT_TAG} characters, got {len(request.client_tag)}"
            )
        )

    if violations or content is None or len(style_images) != len(request.styles):
        raise OptionsError(violations)
    total = sum(style_weights)
    return JobRequest(
        content=content,
        styles=tuple(
            (image, weight / total) for image, weight in zip(style_images, style_weights, strict=True)
        ),
        options=with_canonical_layers(options),
        preview=preview,
        output_encoding=output_encoding,
        client_tag=request.client_tag,
    )


# ---------------------------------------------------------------- events


def encoded_image(data: bytes, encoding: str, width: int, height: int) -> pb.EncodedImage:
    return pb.EncodedImage(data=data, format=_FORMAT_BY_ENCODING[encoding], width=width, height=height)


def losses_to_proto(losses: Losses) -> pb.Losses:
    return pb.Losses(
        total=losses.total, content=losses.content, style=losses.style, total_variation=losses.total_variation
    )


def queued_event(position: int) -> pb.JobEvent:
    return pb.JobEvent(queued=pb.Queued(position=position))


def started_event(device: str, started: Started, targets_backend: str, attempt: int = 1) -> pb.JobEvent:
    return pb.JobEvent(
        started=pb.Started(
            attempt=attempt,
            device=device,
            scales=[pb.Size(width=w, height=h) for w, h in started.scales],
            iterations_total=started.iterations_total,
            targets_backend=targets_backend,
            precision=started.precision,
            precision_reason=started.precision_reason,
            warnings=started.warnings,
        )
    )


def retrying_event(attempt: int, max_attempts: int, reason: str) -> pb.JobEvent:
    return pb.JobEvent(retrying=pb.Retrying(attempt=attempt, max_attempts=max_attempts, reason=reason))


def progress_event(progress: Progress, preview: pb.EncodedImage | None) -> pb.JobEvent:
    return pb.JobEvent(
        progress=pb.Progress(
            iteration=progress.iteration,
            iterations_total=progress.iterations_total,
            scale=progress.scale,
            scales=progress.scales,
            size=pb.Size(width=progress.width, height=progress.height),
            losses=losses_to_proto(progress.losses),
            eta_seconds=progress.eta_seconds,
            preview=preview,
        )
    )


def completed_event(
    image: pb.EncodedImage, losses: Losses, iterations: int, run_seconds: float, queue_seconds: float
) -> pb.JobEvent:
    return pb.JobEvent(
        completed=pb.Completed(
            image=image,
            losses=losses_to_proto(losses),
            iterations=iterations,
            run_seconds=run_seconds,
            queue_seconds=queue_seconds,
        )
    )
