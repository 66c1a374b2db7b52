"""The one mapping between the stylize.v1 protos and the option records (StyleOptions, PreviewOptions).

The server reads requests with it, the client writes them with it, and both read ServerInfo's default
options with it. Torch- and numpy-free.

Presence matters: an unset `optional` field, an UNSPECIFIED enum or an empty list is left out of the
values read, so the reader applies its default (the request's preset or the engine's, stylize.api). A proto
enum's value names are its UNSPECIFIED value's prefix + the engine's value in capitals
("STYLE_LOSS_GRAM" <-> StyleLoss.GRAM), so no table restates them.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import fields
from enum import StrEnum
from typing import Any, cast

from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor

from stylize.api.options import DEFAULT_PREVIEW, DEFAULTS, FieldViolation, PreviewOptions, StyleOptions
from stylize.v1 import stylize_pb2 as pb

# The gRPC port a server listens on and a client calls, unless told otherwise.
DEFAULT_PORT = 50051
# The gRPC message limit both sides set by default: a maximum-size input image plus a few styles.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# The encoding of a result whose request left output_format unset, as the proto documents.
DEFAULT_OUTPUT_FORMAT = "png"
# The proto's documented default for LayerWeight.weight and StyleImage.weight.
DEFAULT_WEIGHT = 1.0
_FORMAT_ENUM: EnumDescriptor = pb.ImageFormat.DESCRIPTOR


def enum_prefix(enum: EnumDescriptor) -> str:
    """ "STYLE_LOSS_" for StyleLoss."""
    return str(enum.values_by_number[0].name).removesuffix("UNSPECIFIED")


def enum_to_proto(enum: EnumDescriptor, choice: str) -> int:
    """The number of an engine choice ("gram", or a StrEnum member); KeyError for an unknown one."""
    return int(enum.values_by_name[enum_prefix(enum) + str(choice).upper()].number)


def enum_from_proto(enum: EnumDescriptor, number: int) -> str | None:
    """The engine's choice for a proto enum number; None for UNSPECIFIED; KeyError for a number this
    proto does not define (a newer peer's)."""
    if number == 0:
        return None
    return str(enum.values_by_number[number].name).removeprefix(enum_prefix(enum)).lower()


# Encodings of images on the wire, in the proto's order: "png", "jpeg", "webp". Pillow's format names are
# the same in capitals.
IMAGE_FORMATS: tuple[str, ...] = tuple(
    str(value.name).removeprefix(enum_prefix(_FORMAT_ENUM)).lower()
    for value in _FORMAT_ENUM.values
    if value.number
)
PIL_FORMATS: tuple[str, ...] = tuple(name.upper() for name in IMAGE_FORMATS)


def image_format_to_proto(encoding: str) -> pb.ImageFormat:
    """The ImageFormat of "png", "jpeg" or "webp"; ValueError for another."""
    return cast(pb.ImageFormat, pb.ImageFormat.Value(enum_prefix(_FORMAT_ENUM) + encoding.upper()))


def image_format_from_proto(number: int) -> str | None:
    """ "png", "jpeg" or "webp"; None for UNSPECIFIED; KeyError for an unknown number."""
    return enum_from_proto(_FORMAT_ENUM, number)


def from_float32(value: float) -> float:
    """The shortest decimal that is the same float32: a caller's 0.02 travels as 0.019999999552965164 and is
    0.02 again here, so wire values compare equal to the same numbers written in Python."""
    single: float = struct.unpack("f", struct.pack("f", value))[0]
    for digits in range(1, 10):
        candidate = float(f"{single:.{digits}g}")
        if struct.unpack("f", struct.pack("f", candidate))[0] == single:
            return candidate
    return single


def _weight(message: pb.LayerWeight | pb.StyleImage) -> float:
    return from_float32(message.weight) if message.HasField("weight") else DEFAULT_WEIGHT


def style_weights(request: pb.StylizeRequest) -> list[float]:
    """Each style image's blend weight as given (unnormalized)."""
    return [_weight(style) for style in request.styles]


def _kinds(record: StyleOptions | PreviewOptions) -> dict[str, type]:
    """Each field of an options record with the type its values have (read off the defaults)."""
    return {field.name: type(getattr(record, field.name)) for field in fields(record)}


# By proto message: the record's fields and their kinds, worked out once.
_KINDS = {
    pb.StyleOptions.DESCRIPTOR.full_name: _kinds(DEFAULTS),
    pb.PreviewOptions.DESCRIPTOR.full_name: _kinds(DEFAULT_PREVIEW),
}


def values_from_proto(
    message: pb.StyleOptions | pb.PreviewOptions, path: str
) -> tuple[dict[str, object], list[FieldViolation]]:
    """The fields set in `message` by the record's names, as the record holds them (enums as the engine's
    StrEnums, formats as "png"..., layers as (name, weight) pairs, float32 as its shortest decimal), and a
    violation for each enum number this proto does not define. Field paths start with `path`."""
    values: dict[str, object] = {}
    violations: list[FieldViolation] = []
    for name, kind in _KINDS[message.DESCRIPTOR.full_name].items():
        descriptor = message.DESCRIPTOR.fields_by_name[name]
        if descriptor.message_type is pb.LayerWeight.DESCRIPTOR:
            if layers := getattr(message, name):
                values[name] = tuple((layer.layer, _weight(layer)) for layer in layers)
        elif descriptor.enum_type is not None:
            number = getattr(message, name)
            try:
                choice = enum_from_proto(descriptor.enum_type, number)
            except KeyError:
                violations.append(FieldViolation(f"{path}.{name}", f"unknown enum value {number}"))
                continue
            if choice is not None:
                values[name] = kind(choice) if issubclass(kind, StrEnum) else choice
        elif message.HasField(name):
            value = getattr(message, name)
            values[name] = from_float32(value) if descriptor.type == FieldDescriptor.TYPE_FLOAT else value
    return values, violations


def set_fields(message: pb.StyleOptions | pb.PreviewOptions, values: Mapping[str, Any]) -> None:
    """Set each of `values` (the record's names and kinds, already checked) on `message`."""
    for name, value in values.items():
        descriptor = message.DESCRIPTOR.fields_by_name[name]
        if descriptor.message_type is pb.LayerWeight.DESCRIPTOR:
            getattr(message, name).extend(pb.LayerWeight(layer=n, weight=w) for n, w in value)
        elif descriptor.enum_type is not None:
            setattr(message, name, enum_to_proto(descriptor.enum_type, value))
        else:
            setattr(message, name, value)


def options_to_proto(options: StyleOptions) -> pb.StyleOptions:
    """Every field set explicitly (ServerInfo.default_options lists the defaults in full)."""
    message = pb.StyleOptions()
    set_fields(message, {field.name: getattr(options, field.name) for field in fields(StyleOptions)})
    return message
