"""Option validation (every rule, every violation reported with its field) and the coarse-to-fine schedule."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest

from stylize.api import schedule
from stylize.api.options import (
    DEFAULT_LIMITS,
    DEFAULTS,
    Limits,
    OptionsError,
    StyleOptions,
    downsampling,
    validate,
)
from stylize.api.presets import PRESETS


def violations(options: StyleOptions, limits: Limits = DEFAULT_LIMITS, **inputs: object) -> dict[str, str]:
    with pytest.raises(OptionsError) as caught:
        validate(options, limits, **inputs)
    return {v.field: v.description for v in caught.value.violations}


def test_defaults_are_valid() -> None:
    validate(DEFAULTS, Limits(), content_size=(451, 300), styles=1, style_weights=[1.0])


def test_every_violation_is_reported_with_its_field() -> None:
    bad = dataclasses.replace(
        DEFAULTS,
        size=4096,
        scale_factor=1.0,
        content_weight=-1.0,
        style_weight=math.nan,
        style_layers=(("relu1_1", 1.0), ("relu9_9", 1.0), ("relu1_1", -2.0)),
        learning_rate=0.0,
        ema_decay=1.0,
        lbfgs_history=0,
        style_scale=5.0,
        optimizer="sgd",
    )
    found = violations(bad, styles=9)
    assert set(found) >= {
        "size",
        "scale_factor",
        "content_weight",
        "style_weight",
        "style_layers[1].layer",
        "style_layers[2].layer",
        "style_layers[2].weight",
        "learning_rate",
        "ema_decay",
        "lbfgs_history",
        "style_scale",
        "optimizer",
        "styles",
    }
    assert "2048" in found["size"]
    assert "relu9_9" in found["style_layers[1].layer"] and "relu4_2" in found["style_layers[1].layer"]
    assert "twice" in found["style_layers[2].layer"]


def test_oversized_output_is_rejected_by_pixels_from_the_content_aspect() -> None:
    limits = Limits(max_size=2048, max_pixels=1000 * 1000)
    options = dataclasses.replace(DEFAULTS, size=1200)
    validate(options, limits, content_size=(1200, 300))  # 1200 x 300 fits
    found = violations(options, limits, content_size=(1200, 1000))
    assert set(found) == {"size"} and "1200x1000" in found["size"]


def test_iterations_are_counted_over_all_scales() -> None:
    options = dataclasses.replace(DEFAULTS, size=512, min_size=128, iterations=1000, initial_iterations=1000)
    scales = schedule.scale_count(512, 128, math.sqrt(2))
    assert scales == 5
    validate(options, Limits(max_iterations=5000))
    found = violations(options, Limits(max_iterations=4999))
    assert set(found) == {"iterations"} and "5000" in found["iterations"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"min_size": 600}, "min_size"),  # larger than size
        ({"size": 8}, "size"),  # relu5_1 needs 16 pixels
        ({"iterations": 0}, "iterations"),
        ({"initial_iterations": -1}, "initial_iterations"),
        ({"tv_weight": math.inf}, "tv_weight"),
        ({"content_layers": (("conv9_1", 1.0),)}, "content_layers[0].layer"),
        ({"content_layers": (("relu4_2", -1.0),)}, "content_layers[0].weight"),
        ({"style_layers": ()}, "style_layers"),
        ({"style_scale": 0.0}, "style_scale"),
        ({"style_scale": 4.0 + 1e-6}, "style_scale"),
        ({"size": 1500, "style_scale": 2.0}, "style_scale"),  # 3000 px style images exceed max_size
        ({"ema_decay": -0.1}, "ema_decay"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"precision": "fp16"}, "precision"),
        # Found by attacking a real server (issue 16): each was INTERNAL or a NaN job before.
        ({"learning_rate": 3e38}, "learning_rate"),
        ({"tv_weight": 3e38}, "tv_weight"),
        ({"style_weight": 1e6 * 1.01}, "style_weight"),
        ({"style_scale": 1e-3}, "style_scale"),
        ({"style_scale": 1e-30}, "style_scale"),
        ({"lbfgs_history": 2**32 - 1}, "lbfgs_history"),
        ({"content_layers": (("relu1_1", 1.0),) * 200_000}, "content_layers"),
    ],
)
def test_single_rule(change: dict, field: str) -> None:
    assert set(violations(dataclasses.replace(DEFAULTS, **change))) == {field}


def test_the_bounds_admit_the_presets_weights_and_their_edges() -> None:
    edges = {"learning_rate": 1.0, "style_weight": 1e6, "tv_weight": 0.0, "lbfgs_history": 5000}
    validate(dataclasses.replace(DEFAULTS, **edges))
    validate(dataclasses.replace(DEFAULTS, style_scale=1 / DEFAULTS.min_size))
    for preset in PRESETS.values():
        validate(preset.options)


def test_a_thousand_unknown_layers_give_short_details() -> None:
    """Each violation names the field and its (truncated) value; the valid names are listed once per
    request, and a list longer than the network is one violation: the details stay far under the 8 KiB
    that gRPC's metadata limit allows."""
    bad = tuple((f"no_such_layer_{i}" * 10, 1.0) for i in range(1000))
    found = violations(dataclasses.replace(DEFAULTS, content_layers=bad))
    assert set(found) == {"content_layers"} and "at most 37 vgg19 layers, got 1000" in found["content_layers"]
    some = tuple((f"{'x' * 500}{i}", 1.0) for i in range(30))
    with pytest.raises(OptionsError) as caught:
        validate(dataclasses.replace(DEFAULTS, style_layers=some))
    details = caught.value.violations
    assert len(details) == 30 and sum(len(v.field) + len(v.description) for v in details) < 8192
    assert "valid: conv1_1" in details[0].description and "conv1_1" not in details[1].description
    assert all(len(v.description) < 700 for v in details)


def test_inputs_are_checked() -> None:
    assert set(violations(DEFAULTS, styles=0)) == {"styles"}
    assert set(violations(DEFAULTS, styles=2, style_weights=[1.0, -1.0])) == {"styles[1].weight"}
    assert set(violations(DEFAULTS, styles=2, style_weights=[0.0, 0.0])) == {"styles"}
    found = violations(dataclasses.replace(DEFAULTS, min_size=128), content_size=(2000, 100))
    assert set(found) == {"min_size"}  # the first scale would be 128 x 6 pixels


@pytest.mark.parametrize(("layer", "edge"), [("pool1", 2), ("pool5", 32), ("relu5_1", 16)])
def test_a_tapped_layer_refuses_an_output_smaller_than_it_needs(layer: str, edge: int) -> None:
    """Issue 16: a pool1 tap at 1x1 or pool5 at 16x16 reached the network ("output size 512x0x0")."""
    taps = {"content_layers": ((layer, 1.0),), "style_layers": ((layer, 1.0),)}
    options = dataclasses.replace(DEFAULTS, **taps, size=edge - 1, min_size=edge - 1)
    found = violations(options)
    assert f"must be an integer >= {edge}" in found["size"] and "min_size" in found
    validate(dataclasses.replace(options, size=edge, min_size=edge))


def test_downsampling_counts_poolings() -> None:
    assert [downsampling(name) for name in ("conv1_1", "relu1_2", "pool1", "relu2_1", "relu5_1")] == [
        1,
        1,
        2,
        2,
        16,
    ]


def test_schedule_grows_from_min_size_to_size_by_about_the_factor() -> None:
    edges = schedule.scale_edges(600, 128, math.sqrt(2))
    assert edges[0] == 128 and edges[-1] == 600
    ratios = [b / a for a, b in itertools.pairwise(edges)]
    assert all(1.3 < r < 1.6 for r in ratios)
    assert schedule.scale_edges(512, 128, math.sqrt(2)) == [128, 181, 256, 362, 512]
    assert schedule.scale_edges(100, 128, 2.0) == [100]
    assert schedule.scale_edges(512, 512, 2.0) == [512]


def test_plan_keeps_the_aspect_ratio_and_spends_initial_iterations_first() -> None:
    plan = schedule.plan(
        size=300, min_size=150, scale_factor=2.0, iterations=7, initial_iterations=11, content_size=(451, 300)
    )
    assert [(s.width, s.height, s.iterations) for s in plan] == [(150, 100, 11), (300, 200, 7)]
    tall = schedule.plan(
        size=64, min_size=64, scale_factor=2.0, iterations=1, initial_iterations=1, content_size=(30, 60)
    )
    assert (tall[0].width, tall[0].height) == (32, 64)
