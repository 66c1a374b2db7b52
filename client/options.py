"""Job options on the client side: their names, kinds, defaults and choices, mapped to and from the proto.

Nothing here defines a default: the names, defaults and enum choices come from the engine's
StyleOptions and PreviewOptions (stylize.api.options, which imports no torch), so the
library, the CLI's flags and their --help read the same values the server uses.

Only the options a caller sets are sent; every other field stays unset and the server applies its
default. Validation here covers what can be decided without the server and would otherwise cost a
round trip: unknown names, wrong types, values the proto cannot carry (a negative number for an
unsigned field), unknown enum choices, unknown presets and unknown layer names (a name of any backbone,
or its Keras alias: which backbone a layer needs is the server's to judge, since a preset the server
applies may choose it). Limits (size, iterations, ...) are the server's to judge, because its operator
can change them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from stylize.api import wire
from stylize.api.options import (
    ALIASES,
    DEFAULT_PREVIEW,
    DEFAULTS,
    LAYERS,
    FieldViolation,
    PreviewOptions,
    StyleOptions,
    layer_names,
)
from stylize.api.presets import PRESETS, unknown_preset
from stylize.api.wire import IMAGE_FORMATS
from stylize.client.errors import InvalidArgument
from stylize.v1 import stylize_pb2

Layers = tuple[tuple[str, float], ...]

# One line of meaning per option, for the CLI's --help (the proto's comments hold the full text).
HELP: dict[str, str] = {
    "size": "longest edge of the output image in pixels",
    "min_size": "longest edge of the first (coarsest) scale; equal to size for a single-scale run",
    "scale_factor": "growth of the edge from one scale to the next",
    "iterations": "optimizer iterations at each scale",
    "initial_iterations": "iterations at the first scale, which starts from scratch",
    "content_weight": "weight of the content loss",
    "style_weight": "weight of the style loss",
    "tv_weight": "weight of the total-variation loss",
    "content_layers": "content layers, each LAYER or LAYER:WEIGHT",
    "style_layers": "style layers, each LAYER or LAYER:WEIGHT",
    "style_loss": "how style statistics are matched",
    "loss_normalization": "how the content and style losses are scaled (what the weights mean)",
    "style_resize": "how a style image is sized: its own aspect, or the output's width and height",
    "backbone": "the network (the server must serve it)",
    "optimizer": "optimizer",
    "learning_rate": "Adam step size, in pixel units of a [0, 1] image",
    "ema_decay": "Adam only: decay of the moving average of the iterates that becomes the output (0: off)",
    "lbfgs_history": "L-BFGS history size",
    "init": "starting image",
    "seed": "seed for every random choice (noise init)",
    "style_scale": "size of the style images relative to the output",
    "color": "colour handling",
    "pooling": "pooling inside VGG",
    "padding": "padding of the first convolution",
    "precision": "numeric precision of the network",
    "tile_size": "tiles of at most N x N pixels (0: tile only where a scale does not fit memory)",
    "tile_halo": "context pixels each side of a tile's columns",
    "every": "send a preview every N iterations (0: no previews)",
    "max_size": "longest edge of a preview in pixels (0: full size)",
    "format": "preview encoding",
    "quality": "JPEG/WebP quality 1..100",
}

# Every layer name a server may accept: each backbone's, and their Keras aliases.
KNOWN_LAYERS: frozenset[str] = frozenset(
    name for backbone in LAYERS for name in (*LAYERS[backbone], *ALIASES[backbone])
)


@dataclass(frozen=True)
class OptionSpec:
    """One option of a proto options message: what the caller may pass and how it goes on the wire."""

    name: str
    default: Any
    # int, float, a StrEnum class, or tuple for a list of (layer, weight) pairs.
    kind: type
    field: FieldDescriptor

    @property
    def choices(self) -> tuple[str, ...]:
        if issubclass(self.kind, StrEnum):
            return tuple(member.value for member in self.kind)
        if self.field.enum_type is not None:  # an enum the engine keeps as a plain string (formats)
            return IMAGE_FORMATS
        return ()

    @property
    def help(self) -> str:
        return HELP[self.name]

    def format_default(self) -> str:
        if isinstance(self.default, tuple):
            return " ".join(f"{name}:{weight:g}" for name, weight in self.default)
        if isinstance(self.default, float):
            return f"{self.default:.6g}"
        return str(self.default)


def _specs(
    defaults: StyleOptions | PreviewOptions,
    message: type[stylize_pb2.StyleOptions] | type[stylize_pb2.PreviewOptions],
) -> dict[str, OptionSpec]:
    descriptor = message.DESCRIPTOR
    specs = {}
    for f in fields(defaults):
        value = getattr(defaults, f.name)
        specs[f.name] = OptionSpec(f.name, value, type(value), descriptor.fields_by_name[f.name])
    return specs


STYLE_OPTIONS: dict[str, OptionSpec] = _specs(DEFAULTS, stylize_pb2.StyleOptions)
PREVIEW_OPTIONS: dict[str, OptionSpec] = _specs(DEFAULT_PREVIEW, stylize_pb2.PreviewOptions)

_UNSIGNED_MAX = {FieldDescriptor.TYPE_UINT32: 2**32 - 1, FieldDescriptor.TYPE_UINT64: 2**64 - 1}


def parse_layers(value: object, field: str) -> tuple[Layers, list[FieldViolation]]:
    """Layers given as "relu4_2", "relu4_2:0.5", ("relu4_2", 0.5), or an iterable of those."""
    items: Iterable[object] = [value] if isinstance(value, str) else value  # type: ignore[assignment]
    if not isinstance(items, Iterable) or isinstance(items, bytes):
        return (), [FieldViolation(field, f"expected a list of LAYER or LAYER:WEIGHT, got {value!r}")]
    layers: list[tuple[str, float]] = []
    violations: list[FieldViolation] = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            name, _, weight_text = item.partition(":")
            weight: object = weight_text or 1.0
        elif isinstance(item, tuple | list) and len(item) == 2:
            name, weight = item
        else:
            expected = "expected LAYER, LAYER:WEIGHT or (LAYER, WEIGHT)"
            violations.append(FieldViolation(f"{field}[{index}]", f"{expected}, got {item!r}"))
            continue
        try:
            weight = float(weight)  # type: ignore[arg-type]  # any object: the TypeError is the check
        except (TypeError, ValueError):
            violations.append(FieldViolation(f"{field}[{index}].weight", f"is not a number: {weight!r}"))
            continue
        if not isinstance(name, str) or name not in KNOWN_LAYERS:
            valid = "; ".join(f"{backbone}: {layer_names(backbone)}" for backbone in LAYERS)
            violations.append(
                FieldViolation(f"{field}[{index}].layer", f"unknown layer {name!r}; valid {valid}")
            )
        elif not math.isfinite(weight):
            violations.append(FieldViolation(f"{field}[{index}].weight", f"must be finite, got {weight}"))
        else:
            layers.append((name, weight))
    if not layers and not violations:
        violations.append(FieldViolation(field, "must name at least one layer"))
    return tuple(layers), violations


def _check_scalar(spec: OptionSpec, value: object, field: str) -> tuple[object, FieldViolation | None]:
    """The value as the options record holds it (a choice by its lower-case name), or a violation."""
    if issubclass(spec.kind, StrEnum) or spec.choices:
        choice = value.value if isinstance(value, StrEnum) else value
        if not isinstance(choice, str) or choice.lower() not in spec.choices:
            return None, FieldViolation(
                field, f"unknown choice {value!r}; expected one of {', '.join(spec.choices)}"
            )
        return choice.lower(), None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None, FieldViolation(field, f"must be a number, got {value!r}")
    if spec.kind is int:
        if isinstance(value, float):
            if not value.is_integer():
                return None, FieldViolation(field, f"must be a whole number, got {value}")
            value = int(value)
        if value < 0:
            return None, FieldViolation(field, f"must be >= 0, got {value}")
        if value > _UNSIGNED_MAX[spec.field.type]:
            return None, FieldViolation(field, f"must be <= {_UNSIGNED_MAX[spec.field.type]}, got {value}")
        return value, None
    if not math.isfinite(value):
        return None, FieldViolation(field, f"must be finite, got {value}")
    return float(value), None


def _fill(
    message: stylize_pb2.StyleOptions | stylize_pb2.PreviewOptions,
    specs: dict[str, OptionSpec],
    values: Mapping[str, object],
    prefix: str,
) -> None:
    violations: list[FieldViolation] = []
    checked: dict[str, object] = {}
    for name, value in values.items():
        field = f"{prefix}.{name}"
        spec = specs.get(name)
        if spec is None:
            violations.append(FieldViolation(field, f"unknown option; options are {', '.join(specs)}"))
        elif spec.kind is tuple:
            layers, problems = parse_layers(value, field)
            violations += problems
            checked[name] = layers
        else:
            converted, problem = _check_scalar(spec, value, field)
            if problem is None:
                checked[name] = converted
            else:
                violations.append(problem)
    wire.set_fields(message, checked)
    if violations:
        raise InvalidArgument.of(violations)


def style_options_to_proto(options: Mapping[str, object]) -> stylize_pb2.StyleOptions:
    """StyleOptions with exactly the given options set; raises InvalidArgument listing every problem."""
    message = stylize_pb2.StyleOptions()
    _fill(message, STYLE_OPTIONS, options, "options")
    return message


def preview_options_to_proto(options: Mapping[str, object]) -> stylize_pb2.PreviewOptions:
    """PreviewOptions with the given fields (every, max_size, format, quality) set."""
    message = stylize_pb2.PreviewOptions()
    _fill(message, PREVIEW_OPTIONS, options, "preview")
    return message


def style_options_from_proto(message: stylize_pb2.StyleOptions) -> dict[str, object]:
    """The options set in a StyleOptions message, by engine name (enums as the engine's StrEnums); a
    choice this client does not know (a newer server's) is left out."""
    values, _unknown = wire.values_from_proto(message, "options")
    return values


def check_preset(name: object) -> str:
    """The preset name as the request carries it ("" for none); InvalidArgument naming "preset"."""
    if name is None or name == "":
        return ""
    if not isinstance(name, str) or name not in PRESETS:
        raise InvalidArgument.of([unknown_preset(str(name))])
    return name


def image_format_to_proto(name: str, field: str) -> stylize_pb2.ImageFormat:
    try:
        return wire.image_format_to_proto(name.lower())
    except ValueError:
        problem = f"unknown format {name!r}; expected one of {', '.join(IMAGE_FORMATS)}"
        raise InvalidArgument.of([FieldViolation(field, problem)]) from None


def image_format_from_proto(number: int) -> str:
    """ "png", "jpeg" or "webp"; the API's default (PNG) for UNSPECIFIED or a format this client does not
    know."""
    try:
        return wire.image_format_from_proto(number) or wire.DEFAULT_OUTPUT_FORMAT
    except KeyError:
        return wire.DEFAULT_OUTPUT_FORMAT
