"""The proto documents the engine's defaults; api/options.py holds them. They must agree."""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import fields
from enum import StrEnum
from pathlib import Path

import pytest

from stylize.api import options as engine_options
from stylize.v1 import stylize_pb2

_spec = importlib.util.spec_from_file_location(
    "gen_docs", Path(__file__).resolve().parent.parent / "scripts" / "gen_docs.py"
)
gen_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_docs)


def documented_defaults(message: str) -> dict[str, str]:
    """Field name -> the text after "Default:" in the proto comment of that field of `message`."""
    return {
        name: comment.split("Default:", 1)[1].strip().rstrip(".")
        for name, comment in gen_docs.field_comments(message).items()
        if "Default:" in comment
    }


def agrees(documented: str, value: object) -> bool:
    if isinstance(value, StrEnum):
        return documented.split()[0].rstrip(".").upper() == value.name
    if isinstance(value, bool | int | float):
        return math.isclose(float(documented.split()[0].rstrip(".,")), float(value), rel_tol=1e-6)
    if isinstance(value, tuple):  # layer lists: every name, in order, with its weight
        names = re.findall(r"(?:conv|relu|pool)\d(?:_\d)?", documented)
        return names == [name for name, _ in value]
    return documented.split()[0].lower() == str(value).lower()


@pytest.mark.parametrize(
    ("message", "defaults"),
    [("StyleOptions", engine_options.DEFAULTS), ("PreviewOptions", engine_options.DEFAULT_PREVIEW)],
)
def test_every_option_is_documented_with_the_engine_default(message: str, defaults: object) -> None:
    documented = documented_defaults(message)
    names = [f.name for f in fields(defaults)]
    assert set(documented) == set(names), (
        "fields without a 'Default:' comment, or comments for unknown fields"
    )
    wrong = {
        n: (documented[n], getattr(defaults, n))
        for n in names
        if not agrees(documented[n], getattr(defaults, n))
    }
    assert not wrong, f"proto comment disagrees with options.py: {wrong}"


@pytest.mark.parametrize(
    ("message", "dataclass_type"),
    [("StyleOptions", engine_options.StyleOptions), ("PreviewOptions", engine_options.PreviewOptions)],
)
def test_proto_and_engine_have_the_same_fields(message: str, dataclass_type: type) -> None:
    proto_fields = set(stylize_pb2.DESCRIPTOR.message_types_by_name[message].fields_by_name)
    assert proto_fields == {f.name for f in fields(dataclass_type)}


@pytest.mark.parametrize(
    ("proto_enum", "engine_enum"),
    [
        ("StyleLoss", engine_options.StyleLoss),
        ("LossNormalization", engine_options.LossNormalization),
        ("StyleResize", engine_options.StyleResize),
        ("Backbone", engine_options.Backbone),
        ("Optimizer", engine_options.Optimizer),
        ("Init", engine_options.Init),
        ("ColorMode", engine_options.ColorMode),
        ("Pooling", engine_options.Pooling),
        ("Padding", engine_options.Padding),
        ("Precision", engine_options.Precision),
    ],
)
def test_enums_match(proto_enum: str, engine_enum: type[StrEnum]) -> None:
    descriptor = stylize_pb2.DESCRIPTOR.enum_types_by_name[proto_enum]
    prefix = re.sub(r"(?<!^)([A-Z])", r"_\1", proto_enum).upper() + "_"
    proto_names = {v.name.removeprefix(prefix) for v in descriptor.values if v.number != 0}
    assert proto_names == {member.name for member in engine_enum}


def test_agrees_can_fail() -> None:
    assert not agrees("512", 256)
    assert not agrees("GRAM", engine_options.StyleLoss.MEAN_COVARIANCE)
    assert not agrees("relu4_2 (1.0)", (("relu4_1", 1.0),))


def test_readme_options_table_is_current() -> None:
    readme = gen_docs.README.read_text()
    assert gen_docs.render_readme(readme) == readme, "README options table is stale: run scripts/gen_docs.py"
