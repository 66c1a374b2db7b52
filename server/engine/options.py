"""The engine's options, their defaults and the hard limits: the one place they are defined.

The proto (proto/stylize/v1/stylize.proto) documents these defaults in its
comments; the service, the CLI and the docs read them from here, and
tests/test_options.py checks that the proto comments agree.

This module imports nothing heavy (no torch), so the client and CLI can read
the defaults without the server's dependencies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from enum import StrEnum

# The layers the VGG19 extractor can tap, in network order. Kept here (not in
# the model module) because validation and the client need them without torch.
VGG19_LAYERS: tuple[str, ...] = (
    "conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1",
    "conv2_1", "relu2_1", "conv2_2", "relu2_2", "pool2",
    "conv3_1", "relu3_1", "conv3_2", "relu3_2", "conv3_3", "relu3_3", "conv3_4", "relu3_4", "pool3",
    "conv4_1", "relu4_1", "conv4_2", "relu4_2", "conv4_3", "relu4_3", "conv4_4", "relu4_4", "pool4",
    "conv5_1", "relu5_1", "conv5_2", "relu5_2", "conv5_3", "relu5_3", "conv5_4", "relu5_4", "pool5",
)  # fmt: skip

DEFAULT_CONTENT_LAYERS: tuple[tuple[str, float], ...] = (("relu4_2", 1.0),)
DEFAULT_STYLE_LAYERS: tuple[tuple[str, float], ...] = tuple(
    (name, 1.0) for name in ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
)
# Layers the exported artifact taps: the union of the default content and style layers.
DEFAULT_EXPORT_LAYERS: tuple[str, ...] = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu4_2", "relu5_1")


class StyleLoss(StrEnum):
    GRAM = "gram"
    MEAN_COVARIANCE = "mean_covariance"


class Optimizer(StrEnum):
    LBFGS = "lbfgs"
    ADAM = "adam"


class Init(StrEnum):
    CONTENT = "content"
    NOISE = "noise"
    GRAY = "gray"
    STYLE_STATS = "style_stats"


class ColorMode(StrEnum):
    NONE = "none"
    LUMINANCE = "luminance"
    HISTOGRAM = "histogram"


class Pooling(StrEnum):
    MAX = "max"
    AVERAGE = "average"


class Padding(StrEnum):
    ZEROS = "zeros"
    REPLICATE = "replicate"


class Precision(StrEnum):
    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"


@dataclass(frozen=True)
class StyleOptions:
    """Everything that shapes one style-transfer job. Field names match the proto's StyleOptions."""

    size: int = 512
    min_size: int = 128
    scale_factor: float = math.sqrt(2.0)
    iterations: int = 100
    initial_iterations: int = 200

    content_weight: float = 1.0
    style_weight: float = 10000.0
    tv_weight: float = 1.0
    content_layers: tuple[tuple[str, float], ...] = DEFAULT_CONTENT_LAYERS
    style_layers: tuple[tuple[str, float], ...] = DEFAULT_STYLE_LAYERS
    style_loss: StyleLoss = StyleLoss.GRAM

    optimizer: Optimizer = Optimizer.LBFGS
    learning_rate: float = 0.02
    ema_decay: float = 0.9
    lbfgs_history: int = 50

    init: Init = Init.CONTENT
    seed: int = 0

    style_scale: float = 1.0
    color: ColorMode = ColorMode.NONE

    pooling: Pooling = Pooling.MAX
    padding: Padding = Padding.ZEROS
    precision: Precision = Precision.AUTO


@dataclass(frozen=True)
class PreviewOptions:
    """When and how previews are produced. Field names match the proto's PreviewOptions."""

    every: int = 0
    max_size: int = 256
    format: str = "jpeg"
    quality: int = 85


@dataclass(frozen=True)
class Limits:
    """Hard limits checked before any work is done. The server's flags override them."""

    max_size: int = 2048
    max_pixels: int = 2048 * 2048
    max_iterations: int = 5000
    max_styles: int = 8
    # Encoded bytes of one input image, and decoded pixels of one input image
    # (checked from the header, before decoding: decompression bombs).
    max_image_bytes: int = 32 * 1024 * 1024
    max_input_pixels: int = 40_000_000


@dataclass(frozen=True)
class FieldViolation:
    """One problem with one request field; `field` is a dotted path such as "options.size"."""

    field: str
    description: str


class OptionsError(ValueError):
    """Options or inputs that break a rule or a limit; carries every violation found."""

    def __init__(self, violations: list[FieldViolation]):
        self.violations = violations
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))


def option_names() -> list[str]:
    return [f.name for f in fields(StyleOptions)]


DEFAULTS = StyleOptions()
DEFAULT_PREVIEW = PreviewOptions()
DEFAULT_LIMITS = Limits()
