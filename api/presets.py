"""Presets: named recipes, each a complete StyleOptions, that the caller's explicit options override.

Pure Python (no torch): the service applies them to requests (StylizeRequest.preset) and the client
checks names and shows them without the server's dependencies.

Three reproduce the programs this product grew out of, as far as our engine's arithmetic allows
(the README's table says where each comes from and what differs); two are ours, decided by
measurement (bench/presets.py):

- gatys2016: Gatys, Ecker, Bethge, "Image Style Transfer Using Convolutional Neural Networks",
  CVPR 2016.
- johnson-vgg16: the losses of Johnson, Alahi, Fei-Fei, "Perceptual Losses for Real-Time Style
  Transfer and Super-Resolution", ECCV 2016 (VGG16, content relu2_2, style relu1_2 relu2_2 relu3_3
  relu4_3 and relu5_3, total variation), optimized per image as in its optimization baseline.
- keras-vgg19-adam: TensorFlow's "Neural style transfer" tutorial (Keras VGG19, Adam).
- fast-preview: the least time to a usable picture; the `stylize` CLI's default (interactive
  callers); library callers get the engine's defaults unless they name a preset.
- quality: our best result regardless of time.

Each preset names every field itself (`_complete` refuses one that does not), so a change of the
engine's defaults never changes what a preset means.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, cast

from stylize.api.options import (
    DEFAULTS,
    Backbone,
    ColorMode,
    FieldViolation,
    Init,
    LossNormalization,
    Optimizer,
    OptionsError,
    Padding,
    Pooling,
    Precision,
    StyleLoss,
    StyleOptions,
    StyleResize,
    option_names,
)

# The preset the `stylize` CLI applies unless told otherwise (`--preset none`: the server's defaults).
INTERACTIVE_PRESET = "fast-preview"


@dataclass(frozen=True)
class Preset:
    name: str
    options: StyleOptions
    # Where the recipe comes from, for the docs and `stylize --help`.
    source: str


# How a job is carried out, not what it looks like: a preset leaves these at the engine's defaults.
EXECUTION_OPTIONS = ("tile_size", "tile_halo")


def _complete(**values: object) -> StyleOptions:
    missing = [name for name in option_names() if name not in values and name not in EXECUTION_OPTIONS]
    if missing:
        raise TypeError(f"a preset must set every option; missing {', '.join(missing)}")
    return StyleOptions(**values)  # type: ignore[arg-type]


def _layers(*names: str) -> tuple[tuple[str, float], ...]:
    """Equally weighted layers (the weights inside a loss term are normalized to sum 1)."""
    return tuple((name, 1.0) for name in names)


_GATYS_STYLE = _layers("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")

GATYS2016 = Preset(
    "gatys2016",
    _complete(
        # One scale at 512 px (the paper's images), L-BFGS from white noise. 1000 iterations and a history of
        # 100 are neural-style's defaults (Torch's optim.lbfgs), the reference implementation of the paper.
        size=512,
        min_size=512,
        scale_factor=math.sqrt(2.0),
        iterations=500,
        initial_iterations=1000,
        # alpha/beta = 1e-3, the ratio of the paper's Fig. 2 and 3; no total variation term.
        content_weight=1.0,
        style_weight=1e3,
        tv_weight=0.0,
        content_layers=_layers("relu4_2"),
        style_layers=_GATYS_STYLE,
        style_loss=StyleLoss.GRAM,
        loss_normalization=LossNormalization.GATYS,
        optimizer=Optimizer.LBFGS,
        learning_rate=0.02,
        ema_decay=0.0,
        lbfgs_history=100,
        init=Init.NOISE,
        seed=0,
        style_scale=1.0,
        style_resize=StyleResize.MATCH_OUTPUT,
        color=ColorMode.NONE,
        backbone=Backbone.VGG19,
        pooling=Pooling.AVERAGE,
        padding=Padding.ZEROS,
        precision=Precision.FP32,
    ),
    "Gatys et al., CVPR 2016",
)

JOHNSON_VGG16 = Preset(
    "johnson-vgg16",
    _complete(
        size=512,
        min_size=512,
        scale_factor=math.sqrt(2.0),
        iterations=250,
        initial_iterations=500,
        # Johnson et al.'s weights belong to a feed-forward network trained on Caffe's VGG16; these are
        # our relative normalization's measured defaults, which hold for either weight kind.
        content_weight=1.0,
        style_weight=100.0,
        tv_weight=10.0,
        content_layers=_layers("relu2_2"),  # block2_conv2
        # block1_conv2, block2_conv2, block3_conv3, block4_conv3, block5_conv3
        style_layers=_layers("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3"),
        style_loss=StyleLoss.GRAM,
        loss_normalization=LossNormalization.RELATIVE,
        optimizer=Optimizer.LBFGS,
        learning_rate=0.02,
        ema_decay=0.0,
        lbfgs_history=50,
        init=Init.CONTENT,
        seed=0,
        style_scale=1.0,
        style_resize=StyleResize.KEEP_ASPECT,
        color=ColorMode.NONE,
        backbone=Backbone.VGG16,
        pooling=Pooling.MAX,
        padding=Padding.ZEROS,
        precision=Precision.FP32,
    ),
    "Johnson et al., ECCV 2016 (losses), optimized per image",
)

KERAS_VGG19_ADAM = Preset(
    "keras-vgg19-adam",
    _complete(
        # Images loaded with max_dim 512, one scale; 10 epochs of 100 Adam steps at 0.02, reporting the
        # last iterate (no average). The tutorial's Adam has beta_1 0.99 and epsilon 0.1; ours (0.9, 0.99).
        size=512,
        min_size=512,
        scale_factor=math.sqrt(2.0),
        iterations=100,
        initial_iterations=1000,
        content_weight=1e4,
        style_weight=1e-2,
        tv_weight=0.0,
        content_layers=_layers("relu5_2"),  # block5_conv2
        style_layers=_GATYS_STYLE,  # block1_conv1 .. block5_conv1
        style_loss=StyleLoss.GRAM,
        loss_normalization=LossNormalization.POSITIONS,
        optimizer=Optimizer.ADAM,
        learning_rate=0.02,
        ema_decay=0.0,
        lbfgs_history=50,
        init=Init.CONTENT,
        seed=0,
        style_scale=1.0,
        style_resize=StyleResize.KEEP_ASPECT,
        color=ColorMode.NONE,
        backbone=Backbone.VGG19,
        pooling=Pooling.MAX,
        padding=Padding.ZEROS,
        precision=Precision.FP32,
    ),
    'TensorFlow tutorial "Neural style transfer" (Keras VGG19, Adam)',
)

FAST_PREVIEW = Preset(
    "fast-preview",
    _complete(
        # Measured (bench/presets.py, 256 px, scored by the default objective): coarse-to-fine in x2 steps
        # with L-BFGS 40 + 20 per later scale reaches a loss within 16% of the defaults' 600 iterations
        # with 7x fewer pixel-iterations; 20 + 10 ends 3x worse, 60 + 30 only 7% better for 45% more time;
        # Adam and single-scale runs of the same time end 3-6x worse. AUTO: bf16 (the same loss as fp32)
        # only where the hardware has it and it is faster.
        # Weights re-measured on the real VGG19 (bench/quality.py, 128 px, six pairs, docs/quality.md): the
        # defaults' style_weight 10 keeps more content than the old 100 (median relu4_2 error 0.95 against
        # 0.97; the style image itself scores 1.02) for the same style fall (87% against 88%), in 2-3 s.
        size=512,
        min_size=128,
        scale_factor=2.0,
        iterations=20,
        initial_iterations=40,
        content_weight=1.0,
        style_weight=10.0,
        tv_weight=10.0,
        content_layers=_layers("relu4_2"),
        style_layers=_GATYS_STYLE,
        style_loss=StyleLoss.GRAM,
        loss_normalization=LossNormalization.RELATIVE,
        optimizer=Optimizer.LBFGS,
        learning_rate=0.02,
        ema_decay=0.9,
        lbfgs_history=50,
        init=Init.CONTENT,
        seed=0,
        style_scale=1.0,
        style_resize=StyleResize.KEEP_ASPECT,
        color=ColorMode.NONE,
        backbone=Backbone.VGG19,
        pooling=Pooling.MAX,
        padding=Padding.ZEROS,
        precision=Precision.AUTO,
    ),
    "ours: the least time to a usable picture (bench/presets.py)",
)

QUALITY = Preset(
    "quality",
    _complete(
        # Measured (bench/presets.py, 128 px): twice the defaults' iterations (400 + 200) ends 4% lower
        # for twice the time, and more does not help: L-BFGS without line search starts to oscillate after
        # a few hundred iterations at one scale. Replicate padding scored 23x worse under the common
        # objective (which pads with zeros, and random weights cannot show whether its borders look
        # better), so zeros. 1024 px: detail, whatever the time.
        # Weights: the defaults' (bench/quality.py on the real VGG19, 128 px, docs/quality.md). At the old
        # style_weight 100 the content is lost (median relu4_2 error 0.97 over six pairs; the style image's
        # own 1.02); at 10, on chelsea/hubble, 0.92 (the defaults' 0.94) with the style error 92% below
        # the content image's own (the defaults' 92%), in 57 s against the defaults' 20 s.
        size=1024,
        min_size=128,
        scale_factor=math.sqrt(2.0),
        iterations=200,
        initial_iterations=400,
        content_weight=1.0,
        style_weight=10.0,
        tv_weight=10.0,
        content_layers=_layers("relu4_2"),
        style_layers=_GATYS_STYLE,
        style_loss=StyleLoss.GRAM,
        loss_normalization=LossNormalization.RELATIVE,
        optimizer=Optimizer.LBFGS,
        learning_rate=0.02,
        ema_decay=0.9,
        lbfgs_history=50,
        init=Init.CONTENT,
        seed=0,
        style_scale=1.0,
        style_resize=StyleResize.KEEP_ASPECT,
        color=ColorMode.NONE,
        backbone=Backbone.VGG19,
        pooling=Pooling.MAX,
        padding=Padding.ZEROS,
        precision=Precision.FP32,
    ),
    "ours: the lowest loss regardless of time (bench/presets.py)",
)

PRESETS: dict[str, Preset] = {
    p.name: p for p in (GATYS2016, JOHNSON_VGG16, KERAS_VGG19_ADAM, FAST_PREVIEW, QUALITY)
}


def unknown_preset(name: str, field: str = "preset") -> FieldViolation:
    return FieldViolation(field, f"unknown preset {name!r}; valid: {' '.join(PRESETS)}")


def preset_options(name: str) -> StyleOptions:
    """The options of a preset; OptionsError naming the field "preset" and the valid names."""
    if name not in PRESETS:
        raise OptionsError([unknown_preset(name)])
    return PRESETS[name].options


def apply_preset(name: str | None, overrides: Mapping[str, object]) -> StyleOptions:
    """`overrides` (the options a caller set explicitly) on top of preset `name`, or on the engine's
    defaults for no preset (None or "").

    An explicit `size` below the base's `min_size`, with no explicit `min_size`, clamps the first scale
    to `size` (a single scale): asking for a small output is not an error of the preset's schedule."""
    base = preset_options(name) if name else DEFAULTS
    # The overrides' types are the validator's business (validate_options), not replace()'s.
    options = replace(base, **cast(Mapping[str, Any], overrides))
    size = overrides.get("size")
    if "min_size" not in overrides and isinstance(size, int) and 0 < size < base.min_size:
        options = replace(options, min_size=size)
    return options
