"""Presets: what each recipe sets, that each runs (64 px, both backbones where it names none), and that
an explicit option overrides one field and keeps the rest, through the proto path and the client."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import pytest
import torch
from samples import SAMPLES, sample

from stylize.api import presets, schedule
from stylize.api.options import (
    DEFAULT_LIMITS,
    DEFAULTS,
    Backbone,
    Init,
    LossNormalization,
    Optimizer,
    OptionsError,
    Pooling,
    Precision,
    StyleOptions,
    StyleResize,
    canonical_layer,
    option_names,
    validate,
)
from stylize.api.presets import INTERACTIVE_PRESET, PRESETS, apply_preset
from stylize.client.errors import InvalidArgument
from stylize.client.request import build_request
from stylize.model.vgg import VGGFeatures, random_state_dict
from stylize.server import convert
from stylize.server.engine.records import Result, Started
from stylize.server.engine.run import stylize
from stylize.v1 import stylize_pb2 as pb

CPU = torch.device("cpu")
# The recipes issue 8 defines with their network; fast-preview and quality run on either.
NAMES_ITS_BACKBONE = {"gatys2016": "vgg19", "johnson-vgg16": "vgg16", "keras-vgg19-adam": "vgg19"}


def runs() -> list[tuple[str, str]]:
    return [
        (name, backbone)
        for name in PRESETS
        for backbone in ([NAMES_ITS_BACKBONE[name]] if name in NAMES_ITS_BACKBONE else list(Backbone))
    ]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def extractors() -> dict[str, VGGFeatures]:
    return {arch: VGGFeatures(arch=arch).load_weights(random_state_dict(0, arch)) for arch in Backbone}


def at_64_px(options: StyleOptions, backbone: str) -> StyleOptions:
    """The preset at a 64 px output with 2 + 1 iterations: coarse-to-fine from 32 px when the preset is
    multi-scale, one scale when it is single-scale."""
    single = options.min_size == options.size
    return dataclasses.replace(
        options, size=64, min_size=64 if single else 32, initial_iterations=2, iterations=1, backbone=backbone
    )


@pytest.mark.parametrize(("name", "backbone"), runs())
def test_every_preset_runs_at_64_px(name, backbone, extractors) -> None:
    options = at_64_px(PRESETS[name].options, backbone)
    content, style = sample("chelsea.png", 64), sample("hubble_deep_field.jpg", 80)
    started, *progress, result = stylize(content, [(style, 1.0)], options, extractors[backbone], device=CPU)
    assert isinstance(started, Started) and isinstance(result, Result)
    assert max(result.image.shape[1:]) == 64 and result.image.shape[0] == 3
    scales = schedule.scale_count(options.size, options.min_size, options.scale_factor)
    assert result.iterations == progress[-1].iterations_total == 2 + (scales - 1)
    assert (scales > 1) == (PRESETS[name].options.min_size < PRESETS[name].options.size)
    assert math.isfinite(result.losses.total) and result.losses.style > 0
    assert (result.losses.total_variation > 0) == (options.tv_weight > 0)


def test_a_backbone_the_extractor_is_not_is_refused(extractors) -> None:
    options = at_64_px(PRESETS["johnson-vgg16"].options, "vgg16")
    with pytest.raises(OptionsError) as caught:
        stylize(sample("chelsea.png", 64), [(sample("coffee.png", 64), 1.0)], options, extractors["vgg19"],
                device=CPU)  # fmt: skip
    assert [v.field for v in caught.value.violations] == ["backbone"]


def test_presets_are_what_the_issue_describes() -> None:
    gatys = PRESETS["gatys2016"].options
    assert (gatys.backbone, gatys.content_layers) == (Backbone.VGG19, (("relu4_2", 1.0),))
    assert gatys.style_layers == tuple((f"relu{b}_1", 1.0) for b in range(1, 6))
    assert (gatys.loss_normalization, gatys.optimizer, gatys.init) == ("gatys", "lbfgs", "noise")
    assert (gatys.pooling, gatys.style_resize, gatys.tv_weight) == (
        Pooling.AVERAGE,
        StyleResize.MATCH_OUTPUT,
        0,
    )

    johnson = PRESETS["johnson-vgg16"].options
    keras_style = ["block1_conv2", "block2_conv2", "block3_conv3", "block4_conv3", "block5_conv3"]
    assert johnson.backbone == Backbone.VGG16
    assert johnson.content_layers == ((canonical_layer("block2_conv2", "vgg16"), 1.0),)
    assert johnson.style_layers == tuple((canonical_layer(n, "vgg16"), 1.0) for n in keras_style)
    assert johnson.tv_weight > 0 and (johnson.optimizer, johnson.init) == (Optimizer.LBFGS, Init.CONTENT)

    keras = PRESETS["keras-vgg19-adam"].options
    assert keras.backbone == Backbone.VGG19
    assert keras.content_layers == ((canonical_layer("block5_conv2", "vgg19"), 1.0),)
    assert keras.style_layers == tuple(
        (canonical_layer(f"block{b}_conv1", "vgg19"), 1.0) for b in range(1, 6)
    )
    assert (keras.optimizer, keras.learning_rate, keras.loss_normalization) == ("adam", 0.02, "positions")
    assert (keras.size, keras.content_weight, keras.style_weight) == (512, 1e4, 1e-2)

    fast, quality = PRESETS["fast-preview"].options, PRESETS["quality"].options
    assert fast.min_size < fast.size and fast.precision == Precision.AUTO
    assert total_pixel_iterations(fast) < total_pixel_iterations(DEFAULTS) < total_pixel_iterations(quality)
    assert quality.precision == Precision.FP32


def total_pixel_iterations(options: StyleOptions) -> int:
    plan = schedule.plan_for(options, (4, 3))
    return sum(scale.pixels * scale.iterations for scale in plan)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_valid_within_the_default_limits(name) -> None:
    validate(PRESETS[name].options, DEFAULT_LIMITS, content_size=(451, 300), styles=1, style_weights=[1.0])


def test_a_preset_must_name_every_option() -> None:
    values = {name: getattr(DEFAULTS, name) for name in option_names() if name != "seed"}
    with pytest.raises(TypeError, match="missing seed"):
        presets._complete(**values)


def test_an_override_keeps_the_rest_of_the_preset() -> None:
    base = PRESETS["keras-vgg19-adam"].options
    assert apply_preset("keras-vgg19-adam", {"iterations": 7}) == dataclasses.replace(base, iterations=7)
    assert apply_preset(None, {"size": 256}) == dataclasses.replace(DEFAULTS, size=256)
    with pytest.raises(OptionsError) as caught:
        apply_preset("gatys2015", {})
    (violation,) = caught.value.violations
    assert violation.field == "preset" and "valid: gatys2016 johnson-vgg16" in violation.description


def test_an_explicit_size_below_the_first_scale_clamps_it() -> None:
    """`stylize a.png b.png --size 64` with the CLI's preset (first scale 128 px) runs one 64 px scale."""
    fast = PRESETS[INTERACTIVE_PRESET].options
    assert fast.min_size > 64
    assert apply_preset(INTERACTIVE_PRESET, {"size": 64}) == dataclasses.replace(fast, size=64, min_size=64)
    assert apply_preset("keras-vgg19-adam", {"size": 256}).min_size == 256  # single-scale 512 px preset
    assert apply_preset(INTERACTIVE_PRESET, {"size": 256}).min_size == fast.min_size  # above it: kept
    explicit = apply_preset(INTERACTIVE_PRESET, {"size": 64, "min_size": 128})
    assert explicit.min_size == 128  # explicit and contradictory: validation names it
    with pytest.raises(OptionsError) as caught:
        validate(explicit)
    assert [v.field for v in caught.value.violations] == ["min_size"]


def request(**fields) -> pb.StylizeRequest:
    return build_request(SAMPLES / "chelsea.png", [SAMPLES / "coffee.png"], **fields)


def test_override_through_the_proto_path_keeps_the_rest() -> None:
    """The client sends the preset's name and only the explicit option; the server's conversion puts
    the option over the preset (proto3 presence, enums, repeated fields alike)."""
    sent = request(preset="gatys2016", style_weight=5.0, optimizer="adam", style_layers=["block1_conv1"])
    assert sent.preset == "gatys2016"
    assert [f.name for f, _ in sent.options.ListFields()] == ["style_weight", "style_layers", "optimizer"]
    job = convert.request_from_proto(sent, DEFAULT_LIMITS)
    expected = dataclasses.replace(
        PRESETS["gatys2016"].options,
        style_weight=5.0,
        optimizer=Optimizer.ADAM,
        style_layers=(("relu1_1", 1.0),),  # the alias arrives as our name
    )
    assert job.options == expected


def test_no_preset_means_the_engine_defaults() -> None:
    job = convert.request_from_proto(request(size=256), DEFAULT_LIMITS)
    assert job.options == dataclasses.replace(DEFAULTS, size=256)


def test_unknown_preset_is_refused_by_the_client_and_by_the_conversion() -> None:
    with pytest.raises(InvalidArgument) as caught:
        request(preset="fast")
    (violation,) = caught.value.violations
    assert violation.field == "preset" and "unknown preset 'fast'; valid: gatys2016" in violation.description
    sent = request()
    sent.preset = "fast"
    with pytest.raises(OptionsError) as refused:
        convert.request_from_proto(sent, DEFAULT_LIMITS)
    assert [v.field for v in refused.value.violations] == ["preset"]


def test_layers_are_judged_against_the_chosen_backbone() -> None:
    sent = request(preset="johnson-vgg16", content_layers=["relu3_4"])  # a VGG19-only layer
    with pytest.raises(OptionsError) as refused:
        convert.request_from_proto(sent, DEFAULT_LIMITS)
    (violation,) = refused.value.violations
    assert violation.field == "options.content_layers[0].layer"
    assert "unknown vgg16 layer 'relu3_4'; valid: conv1_1" in violation.description
    assert "block5_conv3" in violation.description and "block5_conv4" not in violation.description


def test_an_alias_and_its_layer_count_as_one() -> None:
    sent = request(style_layers=["relu4_2", "block4_conv2"])
    with pytest.raises(OptionsError) as refused:
        convert.request_from_proto(sent, DEFAULT_LIMITS)
    assert [v.field for v in refused.value.violations] == ["options.style_layers[1].layer"]


def test_normalization_other_than_relative_needs_the_gram_loss() -> None:
    options = dataclasses.replace(
        DEFAULTS, loss_normalization=LossNormalization.GATYS, style_loss="mean_covariance"
    )
    with pytest.raises(OptionsError) as refused:
        validate(options)
    assert [v.field for v in refused.value.violations] == ["loss_normalization"]


@pytest.mark.parametrize(("resize", "expected"), [("match_output", (48, 64)), ("keep_aspect", (64, 64))])
def test_style_resize(resize, expected, extractors) -> None:
    """The style's size at the targets: the output's width and height, or its own (square) aspect."""
    shapes = []

    def targets(image: torch.Tensor) -> dict[str, torch.Tensor]:
        shapes.append(tuple(image.shape[-2:]))
        return {}  # the engine computes the layers a TargetFn leaves out with torch

    options = dataclasses.replace(DEFAULTS, size=64, min_size=64, initial_iterations=1, style_resize=resize)
    content = torch.rand(3, 48, 64)  # landscape
    square_style = torch.rand(3, 90, 90)
    list(stylize(content, [(square_style, 1.0)], options, extractors["vgg19"], device=CPU, targets=targets))
    assert shapes == [(48, 64), expected]  # content, then the style
