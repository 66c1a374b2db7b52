"""stylize.api.wire: the one proto<->options mapping the client writes requests with and the server reads
them with."""

from __future__ import annotations

from dataclasses import fields, replace

from stylize.api import wire
from stylize.api.options import DEFAULTS, ColorMode, StyleLoss, StyleOptions
from stylize.client.options import style_options_to_proto
from stylize.server import convert
from stylize.v1 import stylize_pb2 as pb


def test_what_the_client_writes_the_server_reads_as_the_same_options() -> None:
    given = {
        "size": 300,
        "learning_rate": 0.02,
        "style_loss": "mean_covariance",
        "color": ColorMode.LUMINANCE,
    }
    given |= {"style_layers": ["relu1_1:0.3", ("relu2_1", 0.7)]}
    read = convert.options_from_proto(style_options_to_proto(given))
    assert read == replace(
        DEFAULTS,
        size=300,
        learning_rate=0.02,  # exactly: float32 on the wire, the shortest decimal back
        style_loss=StyleLoss.MEAN_COVARIANCE,
        color=ColorMode.LUMINANCE,
        style_layers=(("relu1_1", 0.3), ("relu2_1", 0.7)),
    )


def test_every_option_survives_a_round_trip_and_unset_fields_are_left_out() -> None:
    values, violations = wire.values_from_proto(wire.options_to_proto(DEFAULTS), "options")
    assert not violations and set(values) == {field.name for field in fields(StyleOptions)}
    assert wire.values_from_proto(pb.StyleOptions(), "options") == ({}, [])


def test_an_enum_number_this_proto_lacks_is_a_violation_naming_the_field() -> None:
    unknown = pb.PreviewOptions.FromString(b"\x18\x63")  # field 3 (format) = 99, an open enum
    values, violations = wire.values_from_proto(unknown, "preview")
    assert values == {} and [v.field for v in violations] == ["preview.format"]
    assert "99" in violations[0].description


def test_image_formats_come_from_the_proto_enum() -> None:
    assert wire.IMAGE_FORMATS == ("png", "jpeg", "webp")
    for name in wire.IMAGE_FORMATS:
        assert wire.image_format_from_proto(wire.image_format_to_proto(name)) == name
    assert wire.image_format_from_proto(pb.IMAGE_FORMAT_UNSPECIFIED) is None


def test_float32_values_come_back_as_their_shortest_decimal() -> None:
    assert [wire.from_float32(v) for v in (0.02, 0.9, 1e-3, 3.0)] == [0.02, 0.9, 1e-3, 3.0]
    assert wire.from_float32(2**0.5) != 2**0.5  # a value float32 cannot hold stays rounded
