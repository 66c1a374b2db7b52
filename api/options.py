"""The engine's options, their defaults and the hard limits: the one place they are defined.

The proto (proto/stylize/v1/stylize.proto) documents these defaults in its
comments; the service, the CLI and the docs read them from here, and
tests/test_options.py checks that the proto comments agree.

This module imports nothing heavy (no torch), so the client and CLI can read
the defaults without the server's dependencies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from typing import Any

from stylize.api import schedule

# The layers each backbone's extractor can tap, in network order, one name per module of
# torchvision's `features` Sequential. Kept here (not in the model module) because validation
# and the client need them without torch.
VGG19_LAYERS: tuple[str, ...] = (
    "conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1",
    "conv2_1", "relu2_1", "conv2_2", "relu2_2", "pool2",
    "conv3_1", "relu3_1", "conv3_2", "relu3_2", "conv3_3", "relu3_3", "conv3_4", "relu3_4", "pool3",
    "conv4_1", "relu4_1", "conv4_2", "relu4_2", "conv4_3", "relu4_3", "conv4_4", "relu4_4", "pool4",
    "conv5_1", "relu5_1", "conv5_2", "relu5_2", "conv5_3", "relu5_3", "conv5_4", "relu5_4", "pool5",
)  # fmt: skip
VGG16_LAYERS: tuple[str, ...] = (
    "conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1",
    "conv2_1", "relu2_1", "conv2_2", "relu2_2", "pool2",
    "conv3_1", "relu3_1", "conv3_2", "relu3_2", "conv3_3", "relu3_3", "pool3",
    "conv4_1", "relu4_1", "conv4_2", "relu4_2", "conv4_3", "relu4_3", "pool4",
    "conv5_1", "relu5_1", "conv5_2", "relu5_2", "conv5_3", "relu5_3", "pool5",
)  # fmt: skip

DEFAULT_CONTENT_LAYERS: tuple[tuple[str, float], ...] = (("relu4_2", 1.0),)
DEFAULT_STYLE_LAYERS: tuple[tuple[str, float], ...] = tuple(
    (name, 1.0) for name in ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
)
# Layers the exported artifact taps: the union of the default content and style layers.
DEFAULT_EXPORT_LAYERS: tuple[str, ...] = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu4_2", "relu5_1")


class Backbone(StrEnum):
    VGG19 = "vgg19"
    VGG16 = "vgg16"


LAYERS: dict[Backbone, tuple[str, ...]] = {Backbone.VGG19: VGG19_LAYERS, Backbone.VGG16: VGG16_LAYERS}


def keras_aliases(layers: Sequence[str]) -> dict[str, str]:
    """Keras' layer names of a backbone -> ours: `blockB_convC` -> `reluB_C`, `blockB_pool` -> `poolB`.

    A Keras Conv2D layer includes its ReLU (activation="relu"), so its output is our post-activation
    `relu` tap, never the pre-activation `conv` one. Derived from the layer list, not typed out.
    """
    aliases = {}
    for name in layers:
        if name.startswith("relu"):
            block, conv = name.removeprefix("relu").split("_")
            aliases[f"block{block}_conv{conv}"] = name
        elif name.startswith("pool"):
            aliases[f"block{name.removeprefix('pool')}_pool"] = name
    return aliases


ALIASES: dict[Backbone, dict[str, str]] = {backbone: keras_aliases(LAYERS[backbone]) for backbone in Backbone}


def canonical_layer(name: str, backbone: str) -> str | None:
    """Our name of a layer given by our name or its Keras alias; None when `backbone` has no such layer."""
    if backbone not in LAYERS:
        return None
    if name in LAYERS[Backbone(backbone)]:
        return name
    return ALIASES[Backbone(backbone)].get(name)


def layer_names(backbone: str) -> str:
    """The valid names for error messages: ours, then the Keras aliases."""
    return f"{' '.join(LAYERS[Backbone(backbone)])} (or Keras' {' '.join(ALIASES[Backbone(backbone)])})"


class StyleLoss(StrEnum):
    GRAM = "gram"
    MEAN_COVARIANCE = "mean_covariance"


class LossNormalization(StrEnum):
    """How the content and style losses are scaled; see stylize.server.engine.losses."""

    RELATIVE = "relative"
    GATYS = "gatys"
    POSITIONS = "positions"


class StyleResize(StrEnum):
    KEEP_ASPECT = "keep_aspect"
    MATCH_OUTPUT = "match_output"


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
    style_weight: float = 10.0
    tv_weight: float = 10.0
    content_layers: tuple[tuple[str, float], ...] = DEFAULT_CONTENT_LAYERS
    style_layers: tuple[tuple[str, float], ...] = DEFAULT_STYLE_LAYERS
    style_loss: StyleLoss = StyleLoss.GRAM
    loss_normalization: LossNormalization = LossNormalization.RELATIVE

    optimizer: Optimizer = Optimizer.LBFGS
    learning_rate: float = 0.02
    ema_decay: float = 0.9
    lbfgs_history: int = 50

    init: Init = Init.CONTENT
    seed: int = 0

    style_scale: float = 1.0
    style_resize: StyleResize = StyleResize.KEEP_ASPECT
    color: ColorMode = ColorMode.NONE

    backbone: Backbone = Backbone.VGG19
    pooling: Pooling = Pooling.MAX
    padding: Padding = Padding.ZEROS
    precision: Precision = Precision.AUTO

    # Tiled optimization (server/engine/tiles.py): 0 tiles a scale only when a whole-image pass would not
    # fit the device's free memory (in rows of the image's whole width); N tiles every scale with an edge
    # above N, in tiles of at most N x N pixels: rows of the whole width where at least 128 of them fit
    # (rows stream down a column and need no context; 128 with taps to relu5_1), else N x N cores.
    tile_size: int = 0
    # Context each side of a tile, in columns (rows stream and need none), pixels: what the tiled
    # gradient's error falls with. 96 covers the 70 pixels around a region that relu5_1's features of it
    # depend on, so the tiled gradient is the whole image's (docs/tiles.md); a tile's pass reads no more
    # context than its taps need.
    tile_halo: int = 96


# Tile edges, tile sizes and halos are multiples of this: the downsampling of pool5, the deepest layer, so
# a tile's pooling windows and feature positions are the whole image's.
TILE_ALIGN = 32
MAX_TILE_HALO = 512
# The largest output edge any server accepts (its --max-size may be lower); above 2048 a scale runs tiled.
HARD_MAX_SIZE = 8192


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


def downsampling(layer: str, backbone: str = Backbone.VGG19) -> int:
    """How many times smaller than the input a layer's feature map is: 2x per pooling up to it, itself
    included (pool5's map is 32 times smaller than the input), so also the smallest input edge it takes."""
    layers = LAYERS[Backbone(backbone)]
    return int(2 ** sum(name.startswith("pool") for name in layers[: layers.index(layer) + 1]))


def with_canonical_layers(options: StyleOptions) -> StyleOptions:
    """The options with Keras aliases replaced by our layer names (unknown names are left as they are)."""
    layers: dict[str, Any] = {
        field: tuple(
            (canonical_layer(name, options.backbone) or name, weight)
            for name, weight in getattr(options, field)
        )
        for field in ("content_layers", "style_layers")
    }
    return replace(options, **layers)


def _real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


_ENUM_FIELDS: dict[str, type[StrEnum]] = {
    "style_loss": StyleLoss,
    "loss_normalization": LossNormalization,
    "style_resize": StyleResize,
    "backbone": Backbone,
    "optimizer": Optimizer,
    "init": Init,
    "color": ColorMode,
    "pooling": Pooling,
    "padding": Padding,
    "precision": Precision,
}


# Bounds of the float options beyond "finite": a loss weight of at most 1e6 times a loss keeps every term far
# from fp32's range (3.4e38) under every loss normalization, and a step of more than the whole [0, 1] pixel
# range is no learning rate.
MAX_LOSS_WEIGHT = 1e6
MAX_LEARNING_RATE = 1.0
# A style image's blend weight (before normalization) and a layer's weight inside its loss: beyond this
# the request is a mistake, and float32 sums start losing the smaller terms.
MAX_RELATIVE_WEIGHT = 1e6
# How much of a caller's value a violation repeats: error details must stay small (gRPC's metadata limit).
ECHO_CHARACTERS = 40


def one_line(text: object) -> str:
    """`text` with every run of whitespace, newlines included, as one space: for one-line messages."""
    return " ".join(str(text).split())


def _echo(value: object) -> str:
    text = repr(value)
    return text if len(text) <= ECHO_CHARACTERS else text[: ECHO_CHARACTERS - 3] + "..."


class _Violations(list[FieldViolation]):
    # Whether a violation already listed the valid layer names: a request lists them once, however many
    # of its layers are unknown.
    listed_layers = False

    def add(self, field: str, description: str) -> None:
        self.append(FieldViolation(field, description))


def _check_layers(
    found: _Violations, name: str, layers: tuple[tuple[str, float], ...], backbone: str
) -> list[str]:
    """Report unknown and repeated layers (a Keras alias repeats the layer it names); returns the
    known layers by our names. Names are judged only once the backbone is known to be valid."""
    known: list[str] = []
    if backbone in LAYERS and len(layers) > len(LAYERS[Backbone(backbone)]):
        found.add(name, f"at most {len(LAYERS[Backbone(backbone)])} {backbone} layers, got {len(layers)}")
        return known
    for index, (layer, weight) in enumerate(layers):
        canonical = canonical_layer(layer, backbone)
        if canonical is None and backbone in LAYERS:
            if found.listed_layers:
                valid = "as listed above (and GetServerInfo.available_layers)"
            else:
                valid = layer_names(backbone)
                found.listed_layers = True
            found.add(f"{name}[{index}].layer", f"unknown {backbone} layer {_echo(layer)}; valid: {valid}")
        elif canonical in known:
            found.add(f"{name}[{index}].layer", f"layer {_echo(layer)} is listed twice")
        elif canonical is not None:
            known.append(canonical)
        if not (_real(weight) and 0 <= weight <= MAX_RELATIVE_WEIGHT):
            found.add(f"{name}[{index}].weight", f"must be in [0, {MAX_RELATIVE_WEIGHT:g}], got {weight}")
    return known


def _check_sizes(found: _Violations, o: StyleOptions, limits: Limits, smallest: int) -> dict[str, bool]:
    """Sizes and scale factor; which of "size", "min_size", "scale_factor" are sound."""
    valid = {}
    for field in ("size", "min_size"):
        value = getattr(o, field)
        valid[field] = _whole(value, smallest)
        if not valid[field]:
            needs = f"must be an integer >= {smallest} (the deepest chosen layer needs it)"
            found.add(field, f"{needs}, got {value}")
    if valid["size"] and o.size > limits.max_size:
        found.add("size", f"{o.size} exceeds this server's limit of {limits.max_size} pixels")
    if valid["size"] and valid["min_size"] and o.min_size > o.size:
        found.add("min_size", f"must be <= size ({o.size}), got {o.min_size}")
        valid["min_size"] = False
    valid["scale_factor"] = _real(o.scale_factor) and o.scale_factor > 1
    if not valid["scale_factor"]:
        found.add("scale_factor", f"must be a finite number > 1, got {o.scale_factor}")
    return valid


def _check_iterations(found: _Violations, o: StyleOptions, limits: Limits, sizes_sound: bool) -> None:
    sound = True
    for field in ("iterations", "initial_iterations"):
        if not _whole(getattr(o, field), 1):
            found.add(field, f"must be an integer >= 1, got {getattr(o, field)}")
            sound = False
    if sound and sizes_sound:
        scales = schedule.scale_count(o.size, o.min_size, o.scale_factor)
        total = schedule.total_iterations(
            iterations=o.iterations, initial_iterations=o.initial_iterations, scales=scales
        )
        if total > limits.max_iterations:
            found.add(
                "iterations",
                f"{total} iterations over {scales} scale(s) exceed this server's limit of "
                f"{limits.max_iterations}",
            )


def _check_content(
    found: _Violations,
    o: StyleOptions,
    limits: Limits,
    content_size: tuple[int, int],
    smallest: int,
    sizes: dict[str, bool],
) -> None:
    width, height = content_size
    if width < 1 or height < 1:
        found.add("content", f"image is empty ({width}x{height})")
        return
    if not sizes["size"] or o.size > limits.max_size:
        return  # already reported
    out_w, out_h = schedule.fit(o.size, content_size)
    if out_w * out_h > limits.max_pixels:
        found.add(
            "size",
            f"an output of {out_w}x{out_h} = {out_w * out_h} pixels exceeds this server's limit of "
            f"{limits.max_pixels}",
        )
    first_w, first_h = schedule.fit(o.min_size, content_size)
    if sizes["min_size"] and min(first_w, first_h) < smallest:
        found.add(
            "min_size",
            f"the first scale ({first_w}x{first_h}) has a short edge below {smallest} pixels, too small "
            "for the deepest chosen layer; raise min_size or use a less elongated content image",
        )


def _check_styles(
    found: _Violations, limits: Limits, styles: int | None, style_weights: Sequence[float] | None
) -> None:
    if styles is not None and not 1 <= styles <= limits.max_styles:
        found.add("styles", f"1 to {limits.max_styles} style images are needed, got {styles}")
    if style_weights is None:
        return
    valid = True
    for index, weight in enumerate(style_weights):
        if not (_real(weight) and 0 <= weight <= MAX_RELATIVE_WEIGHT):
            found.add(f"styles[{index}].weight", f"must be in [0, {MAX_RELATIVE_WEIGHT:g}], got {weight}")
            valid = False
    if valid and style_weights and sum(style_weights) <= 0:
        found.add("styles", "the style weights sum to 0; at least one must be positive")


@dataclass(frozen=True)
class CheckedOptions:
    """What validate() accepted: the options (Keras aliases replaced by our layer names) for a content
    image of `content_size` and `styles` style images (None: not checked against one). The engine runs
    these without checking them again."""

    options: StyleOptions
    content_size: tuple[int, int] | None
    styles: int | None


def validate(
    options: StyleOptions,
    limits: Limits = DEFAULT_LIMITS,
    *,
    content_size: tuple[int, int] | None = None,
    styles: int | None = None,
    style_weights: Sequence[float] | None = None,
) -> CheckedOptions:
    """Check every rule and limit before any work; raise OptionsError listing ALL violations.

    Field paths are relative to StyleOptions ("size", "style_layers[1].layer"). The inputs are
    named "content" (`content_size`: the content's (width, height); either order gives the same
    verdict, only the longest edge, the aspect and the product matter), "styles" (their number)
    and "styles[i].weight" (blend weights). Checks that need an input are skipped when it is None.
    """
    o = options
    found = _Violations()
    for field, kind in _ENUM_FIELDS.items():
        value = getattr(o, field)
        if value not in {member.value for member in kind}:
            found.add(field, f"unknown value {value!r}; valid: {' '.join(member.value for member in kind)}")

    chosen = _check_layers(found, "content_layers", o.content_layers, o.backbone)
    chosen += _check_layers(found, "style_layers", o.style_layers, o.backbone)
    if not o.style_layers:
        found.add("style_layers", "at least one style layer is needed")
    smallest = max((downsampling(layer, o.backbone) for layer in chosen), default=1)
    if o.loss_normalization != LossNormalization.RELATIVE and o.style_loss != StyleLoss.GRAM:
        found.add(
            "loss_normalization",
            f"{o.loss_normalization} scales Gram matrices; style_loss {o.style_loss} needs relative",
        )

    sizes = _check_sizes(found, o, limits, smallest)
    _check_iterations(found, o, limits, all(sizes.values()))

    for field in ("content_weight", "style_weight", "tv_weight"):
        if not (_real(getattr(o, field)) and 0 <= getattr(o, field) <= MAX_LOSS_WEIGHT):
            found.add(field, f"must be in [0, {MAX_LOSS_WEIGHT:g}], got {getattr(o, field)}")
    if not (_real(o.learning_rate) and 0 < o.learning_rate <= MAX_LEARNING_RATE):
        found.add("learning_rate", f"must be in (0, {MAX_LEARNING_RATE:g}], got {o.learning_rate}")
    if not (_real(o.ema_decay) and 0 <= o.ema_decay < 1):
        found.add("ema_decay", f"must be in [0, 1), got {o.ema_decay}")
    # Each unit of history holds two image-sized vectors: beyond the iterations a job may run it is memory
    # that can never be used.
    if not (_whole(o.lbfgs_history, 1) and o.lbfgs_history <= limits.max_iterations):
        found.add(
            "lbfgs_history",
            f"must be an integer in [1, {limits.max_iterations}] (the iteration limit), "
            f"got {o.lbfgs_history}",
        )
    if not (_whole(o.seed, 0) and o.seed < 2**64):
        found.add("seed", f"must be an integer in [0, 2^64), got {o.seed}")
    if not (_whole(o.tile_size, 0) and o.tile_size % TILE_ALIGN == 0 and o.tile_size <= HARD_MAX_SIZE):
        found.add(
            "tile_size",
            f"must be 0 (tiles only where a scale does not fit memory) or a multiple of {TILE_ALIGN} up to "
            f"{HARD_MAX_SIZE}, got {_echo(o.tile_size)}",
        )
    if not (_whole(o.tile_halo, 0) and o.tile_halo % TILE_ALIGN == 0 and o.tile_halo <= MAX_TILE_HALO):
        found.add(
            "tile_halo",
            f"must be a multiple of {TILE_ALIGN} from 0 to {MAX_TILE_HALO}, got {_echo(o.tile_halo)}",
        )
    if not (_real(o.style_scale) and 0 < o.style_scale <= 4):
        found.add("style_scale", f"must be in (0, 4], got {o.style_scale}")
    elif sizes["min_size"] and round(o.min_size * o.style_scale) < 1:
        found.add(
            "style_scale",
            f"shrinks the style images below one pixel at the first scale (min_size {o.min_size} x "
            f"{o.style_scale}); use at least {1 / o.min_size:.3g}",
        )
    elif sizes["size"] and o.size <= limits.max_size < round(o.size * o.style_scale):
        found.add(
            "style_scale",
            f"style images of {round(o.size * o.style_scale)} pixels (size x style_scale) exceed this "
            f"server's limit of {limits.max_size}",
        )

    if content_size is not None:
        _check_content(found, o, limits, content_size, smallest, sizes)
    _check_styles(found, limits, styles, style_weights)
    if found:
        raise OptionsError(list(found))
    return CheckedOptions(with_canonical_layers(options), content_size, styles)


# Longest client_tag (the caller's label for its logs), in characters.
MAX_CLIENT_TAG = 128


def client_tag_violations(tag: str) -> list[FieldViolation]:
    if len(tag) <= MAX_CLIENT_TAG:
        return []
    return [FieldViolation("client_tag", f"at most {MAX_CLIENT_TAG} characters, got {len(tag)}")]


def preview_violations(preview: PreviewOptions, limits: Limits) -> list[FieldViolation]:
    """The rules for previews; field paths relative to PreviewOptions ("every")."""
    found = _Violations()
    if not (_whole(preview.every, 0) and preview.every <= limits.max_iterations):
        found.add("every", f"must be an integer in [0, {limits.max_iterations}], got {preview.every}")
    if not (_whole(preview.max_size, 0) and preview.max_size <= limits.max_size):
        found.add("max_size", f"must be an integer in [0, {limits.max_size}], got {preview.max_size}")
    if not (_whole(preview.quality, 1) and preview.quality <= 100):
        found.add("quality", f"must be an integer in [1, 100], got {preview.quality}")
    return list(found)
