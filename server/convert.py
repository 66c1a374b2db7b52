"""A request off the wire: decoded images, validated options (read by stylize.api.wire, the one
proto<->options mapping) and the job's record; and the events' protos.

Unset fields mean "the default": the request's preset's value (stylize.api.presets), or without a preset
the engine's default (stylize.api.options); neither is restated here. Field paths in errors are the proto's
("options.size", "options.style_layers[1].layer", "styles[0].weight", "preview.every").
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from PIL import Image

from stylize.api import options as engine_options
from stylize.api import wire
from stylize.api.options import (
    DEFAULT_PREVIEW,
    CheckedOptions,
    FieldViolation,
    Limits,
    OptionsError,
    PreviewOptions,
    StyleOptions,
)
from stylize.api.presets import PRESETS, apply_preset, unknown_preset
from stylize.server.engine.records import Losses, Progress, Started
from stylize.v1 import stylize_pb2 as pb

from .codec import load_image, open_image


@dataclass(frozen=True)
class JobRequest:
    """A decoded, validated request: what a worker needs to run the job (no protos, no tensors)."""

    content: Image.Image
    # (image, blend weight as given); the engine makes the weights shares.
    styles: tuple[tuple[Image.Image, float], ...]
    checked: CheckedOptions
    preview: PreviewOptions
    output_encoding: str
    client_tag: str

    @property
    def options(self) -> StyleOptions:
        return self.checked.options

    @property
    def pixels(self) -> int:
        """Decoded pixels of its images (width x height, summed): what it holds while it waits."""
        images = (self.content, *(image for image, _ in self.styles))
        return sum(image.width * image.height for image in images)


def options_from_proto(message: pb.StyleOptions, path: str = "options", preset: str = "") -> StyleOptions:
    """StyleOptions with the fields set in `message` over `preset` (a name; "" for none: the engine's
    defaults); raises OptionsError for unknown enum values and an unknown preset only (validate() checks
    the rest)."""
    values, violations = wire.values_from_proto(message, path)
    if preset and preset not in PRESETS:
        violations.append(unknown_preset(preset))
    if violations:
        raise OptionsError(violations)
    return apply_preset(preset, values)


def preview_from_proto(message: pb.PreviewOptions, limits: Limits, path: str = "preview") -> PreviewOptions:
    values, violations = wire.values_from_proto(message, path)
    preview = replace(DEFAULT_PREVIEW, **values)
    violations += [
        replace(v, field=f"{path}.{v.field}") for v in engine_options.preview_violations(preview, limits)
    ]
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


def _images(request: pb.StylizeRequest, limits: Limits) -> list[tuple[bytes, str]]:
    """The request's encoded images and their fields; no styles when their number is out of bounds
    (validate() reports it, and opening a flood of images would be wasted work)."""
    images = [(request.content_image, "content_image")]
    if 1 <= len(request.styles) <= limits.max_styles:
        images += [(style.image, f"styles[{index}].image") for index, style in enumerate(request.styles)]
    return images


def _open_all(
    request: pb.StylizeRequest, limits: Limits, violations: list[FieldViolation]
) -> list[Image.Image | None]:
    """Every image opened, its header checked (no pixel decoded); None where it failed."""
    opened: list[Image.Image | None] = []
    for data, field in _images(request, limits):
        try:
            opened.append(
                open_image(data, field, max_bytes=limits.max_image_bytes, max_pixels=limits.max_input_pixels)
            )
        except OptionsError as error:
            violations.extend(error.violations)
            opened.append(None)
    return opened


def input_pixels(request: pb.StylizeRequest, limits: Limits) -> int:
    """The decoded pixels (width x height, summed) the request's images would hold, from their headers
    alone; OptionsError naming the images whose header is unusable."""
    violations: list[FieldViolation] = []
    opened = _open_all(request, limits, violations)
    if violations:
        raise OptionsError(violations)
    return sum(image.width * image.height for image in opened if image is not None)


def _decode_all(
    request: pb.StylizeRequest, limits: Limits, violations: list[FieldViolation]
) -> tuple[Image.Image | None, list[Image.Image]]:
    """Every header first, then, only when all of them passed, the pixels: one bad header costs no
    decoding."""
    opened = _open_all(request, limits, violations)
    if violations:
        return None, []
    fields = [field for _, field in _images(request, limits)]
    decoded: list[Image.Image | None] = []
    for image, field in zip(opened, fields, strict=True):
        assert image is not None  # no violations: every header passed
        try:
            decoded.append(load_image(image, field))
        except OptionsError as error:
            violations.extend(error.violations)
            decoded.append(None)
    content, styles = decoded[0], decoded[1:]
    return content, [image for image in styles if image is not None]


def request_from_proto(request: pb.StylizeRequest, limits: Limits) -> JobRequest:
    """Decode and validate a whole request, collecting every violation before raising OptionsError.

    Decoding is CPU work (call it off the event loop); no torch here.
    """
    violations: list[FieldViolation] = []
    content, style_images = _decode_all(request, limits, violations)
    style_weights = wire.style_weights(request)

    checked = None
    try:
        options = options_from_proto(request.options, preset=request.preset)
    except OptionsError as error:
        violations += error.violations
    else:
        try:
            checked = engine_options.validate(
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

    output_encoding = wire.DEFAULT_OUTPUT_FORMAT
    try:
        output_encoding = wire.image_format_from_proto(request.output_format) or wire.DEFAULT_OUTPUT_FORMAT
    except KeyError:
        violations.append(FieldViolation("output_format", f"unknown enum value {request.output_format}"))
    violations += engine_options.client_tag_violations(request.client_tag)

    if violations or checked is None or content is None or len(style_images) != len(request.styles):
        raise OptionsError(violations)
    return JobRequest(
        content=content,
        styles=tuple(zip(style_images, style_weights, strict=True)),
        checked=checked,
        preview=preview,
        output_encoding=output_encoding,
        client_tag=request.client_tag,
    )


# ---------------------------------------------------------------- events


def encoded_image(data: bytes, encoding: str, width: int, height: int) -> pb.EncodedImage:
    return pb.EncodedImage(data=data, format=wire.image_format_to_proto(encoding), width=width, height=height)


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
