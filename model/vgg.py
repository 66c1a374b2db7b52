"""VGG19's (or VGG16's) convolutional part in plain torch, tapping named layers.

The parameters live in `self.features`, an `nn.Sequential` laid out exactly like
torchvision's `vgg19().features` / `vgg16().features` (convs at the indices torchvision
uses, ReLU and pooling modules in between), so the state-dict keys are torchvision's
`features.N.weight` / `features.N.bias` and its checkpoints load unchanged.

The module computes the network functionally from those parameters instead of
calling the Sequential, because style transfer needs things torchvision's module
cannot give: taps before and after each ReLU (no in-place ReLU clobbering a tapped
conv output), average pooling, replicate padding on the first conv, and several
views of one set of weights (`configured`) that differ only in those choices.
"""

from __future__ import annotations

import copy
import math
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stylize.api.options import (
    DEFAULT_EXPORT_LAYERS,
    LAYERS,
    Backbone,
    Padding,
    Pooling,
    canonical_layer,
    layer_names,
)

# Output channels of each conv, "M" for a 2x2 pooling: torchvision's configurations "E" (VGG19)
# and "D" (VGG16).
CONFIGS: dict[Backbone, tuple[int | str, ...]] = {
    Backbone.VGG19: (
        64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
    ),
    Backbone.VGG16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}  # fmt: skip

# Average pooling of post-ReLU maps roughly halves their magnitude compared with max
# pooling; scaling by 2 keeps deeper activations (and so the loss weights tuned for max
# pooling) in the same range. Same constant as crowsonkb's style-transfer-pytorch.
AVERAGE_POOL_SCALE = 2.0

# Parameters cast to another dtype (VGGFeatures.with_dtype), per original `features` module; they go
# with it.
_CASTS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[torch.dtype, torch.device], nn.Sequential]] = (
    weakref.WeakKeyDictionary()
)
_CASTS_LOCK = threading.Lock()


# Called after each layer with its name and map; returns the map the network goes on with (a crop of it).
Trim = Callable[[str, Tensor], Tensor]


class ModelError(ValueError):
    """A model that cannot be built or loaded as asked; the message is one line naming the problem."""


@dataclass(frozen=True)
class Normalization:
    """How RGB in [0, 1] becomes the network's input: optional RGB->BGR, then (x * scale - mean) / std.

    `mean` and `std` are given in the network's channel order (BGR when `bgr`).
    """

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: float = 1.0
    bgr: bool = False


# torchvision's ImageNet models: RGB in [0, 1], per-channel mean and std.
IMAGENET_NORMALIZATION = Normalization(name="imagenet", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
# The Caffe VGG19 (and neural-style's conversion of it): BGR in [0, 255], mean subtracted, no std.
# neural-style(-pt) scales by 256, a 0.4% difference; 255 is the range Caffe's VGG was trained on.
CAFFE_NORMALIZATION = Normalization(
    name="caffe", mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0), scale=255.0, bgr=True
)
NORMALIZATIONS: dict[str, Normalization] = {n.name: n for n in (IMAGENET_NORMALIZATION, CAFFE_NORMALIZATION)}


def parse_arch(arch: str) -> Backbone:
    try:
        return Backbone(arch)
    except ValueError:
        raise ModelError(f"unknown arch {arch!r}; valid: {' '.join(Backbone)}") from None


def _conv_shapes(arch: Backbone) -> dict[int, tuple[int, int]]:
    """Index in `features` -> (in_channels, out_channels) for each conv, derived from CONFIGS."""
    shapes: dict[int, tuple[int, int]] = {}
    index, channels = 0, 3
    for item in CONFIGS[arch]:
        if item == "M":
            index += 1
        else:
            shapes[index] = (channels, int(item))
            channels = int(item)
            index += 2  # conv, then its ReLU
    return shapes


CONV_SHAPES: dict[Backbone, dict[int, tuple[int, int]]] = {arch: _conv_shapes(arch) for arch in Backbone}
# Every tappable layer name -> its index in `features`; LAYERS lists them in network order.
LAYER_INDEX: dict[Backbone, dict[str, int]] = {
    arch: {name: i for i, name in enumerate(LAYERS[arch])} for arch in Backbone
}
for _arch in Backbone:
    assert len(LAYERS[_arch]) == max(CONV_SHAPES[_arch]) + 3, f"LAYERS disagrees with CONFIGS for {_arch}"


def expected_shapes(arch: str = Backbone.VGG19) -> dict[str, tuple[int, ...]]:
    """The state dict's keys and shapes, in torchvision's order."""
    shapes: dict[str, tuple[int, ...]] = {}
    for index, (cin, cout) in CONV_SHAPES[parse_arch(arch)].items():
        shapes[f"features.{index}.weight"] = (cout, cin, 3, 3)
        shapes[f"features.{index}.bias"] = (cout,)
    return shapes


def random_state_dict(seed: int = 0, arch: str = Backbone.VGG19) -> dict[str, Tensor]:
    """Seeded He-initialized weights (zero biases): activations keep their scale through all the convs.

    For tests and machines without the pretrained weights; the same seed gives the same tensors.
    """
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}
    for key, shape in expected_shapes(arch).items():
        if key.endswith(".weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = torch.randn(shape, generator=generator) * math.sqrt(2.0 / fan_in)
        else:
            state[key] = torch.zeros(shape)
    return state


def validate_state_dict(state_dict: Mapping[str, Tensor], arch: str = Backbone.VGG19) -> None:
    """Raise ModelError naming the first missing, unexpected or misshapen key."""
    expected = expected_shapes(arch)
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise ModelError(f"weights lack {len(missing)} {arch.upper()} key(s), first {missing[0]!r}")
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected:
        raise ModelError(f"weights have {len(unexpected)} unexpected key(s), first {unexpected[0]!r}")
    for key, shape in expected.items():
        value = state_dict[key]
        if not isinstance(value, Tensor):
            raise ModelError(f"weights key {key!r} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != shape:
            raise ModelError(f"weights key {key!r} has shape {tuple(value.shape)}, expected {shape}")
        if not value.is_floating_point():
            raise ModelError(f"weights key {key!r} has dtype {value.dtype}, expected a floating type")


def resolve_layers(layers: Iterable[str], arch: str = Backbone.VGG19) -> tuple[str, ...]:
    """Validate layer names (Keras aliases become our names), drop repeats (first occurrence wins),
    keep the caller's order."""
    arch = parse_arch(arch)
    names = list(layers)
    if not names:
        raise ModelError(f"no layers to tap; choose from {' '.join(LAYERS[arch])}")
    unknown = [name for name in names if canonical_layer(name, arch) is None]
    if unknown:
        raise ModelError(f"unknown layer(s) {' '.join(unknown)} for {arch}; valid: {layer_names(arch)}")
    return tuple(dict.fromkeys(canonical_layer(name, arch) for name in names))


def parse_choice(kind: type[Pooling] | type[Padding], value: str) -> Pooling | Padding:
    try:
        return kind(value)
    except ValueError:
        valid = " ".join(member.value for member in kind)
        raise ModelError(f"unknown {kind.__name__.lower()} {value!r}; valid: {valid}") from None


def _build_features(arch: Backbone) -> nn.Sequential:
    modules: list[nn.Module] = []
    channels = 3
    for item in CONFIGS[arch]:
        if item == "M":
            modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            modules += [nn.Conv2d(channels, int(item), kernel_size=3, padding=1), nn.ReLU()]
            channels = int(item)
    return nn.Sequential(*modules)


class VGGFeatures(nn.Module):
    """VGG19 (or VGG16: `arch`) conv part returning `{layer: activation}` for the tapped layers.

    Input: RGB in [0, 1], N x 3 x H x W; normalization happens inside. Only the
    layers up to the deepest tap are computed. The parameters are frozen
    (requires_grad False): gradients flow to the input image only.
    """

    def __init__(
        self,
        layers: Iterable[str] = DEFAULT_EXPORT_LAYERS,
        *,
        arch: str = Backbone.VGG19,
        pooling: str = Pooling.MAX,
        padding: str = Padding.ZEROS,
        normalization: Normalization = IMAGENET_NORMALIZATION,
    ):
        super().__init__()
        self.arch = parse_arch(arch)
        self.features = _build_features(self.arch)
        self.features.requires_grad_(False)
        self._configure(layers, pooling, padding, normalization)

    def _configure(
        self, layers: Iterable[str], pooling: str, padding: str, normalization: Normalization
    ) -> None:
        self.layers = resolve_layers(layers, self.arch)
        self.pooling = parse_choice(Pooling, pooling)
        self.padding = parse_choice(Padding, padding)
        self.normalization = normalization
        self._index = LAYER_INDEX[self.arch]
        self._depth = max(self._index[name] for name in self.layers) + 1
        # Not persistent: the state dict stays exactly torchvision's keys.
        self.register_buffer("mean", torch.tensor(normalization.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(normalization.std).view(1, 3, 1, 1), persistent=False)

    def configured(
        self, *, layers: Iterable[str] | None = None, pooling: str | None = None, padding: str | None = None
    ) -> VGGFeatures:
        """Another view of the SAME parameters (no copy) with other taps, pooling or padding."""
        return self._view(
            self.features,
            self.layers if layers is None else layers,
            self.pooling if pooling is None else pooling,
            self.padding if padding is None else padding,
        )

    def with_dtype(self, dtype: torch.dtype) -> VGGFeatures:
        """This view with its parameters (not the buffers: the input normalization stays float32) in
        `dtype`. The copy is made once per parameter set, device and dtype, and shared by every view of it,
        so a job costs no copy of 20M parameters."""
        first = self.features[0].weight
        if dtype == first.dtype:
            return self
        key = (dtype, first.device)
        with _CASTS_LOCK:
            copies = _CASTS.setdefault(self.features, {})
            if key not in copies:
                copies[key] = copy.deepcopy(self.features).to(dtype)
        return self._view(copies[key], self.layers, self.pooling, self.padding)

    def _view(
        self, features: nn.Sequential, layers: Iterable[str], pooling: str, padding: str
    ) -> VGGFeatures:
        view = VGGFeatures.__new__(VGGFeatures)
        nn.Module.__init__(view)
        view.arch = self.arch
        view.features = features
        view._configure(layers, pooling, padding, self.normalization)
        return view.to(self.mean.device)

    @property
    def min_side(self) -> int:
        """The smallest height and width the taps accept: each 2x2 pooling on the way halves the map."""
        pools = sum(1 for name in LAYERS[self.arch][: self._depth] if name.startswith("pool"))
        return 2**pools

    def context(self) -> list[tuple[str, int, int]]:
        """(layer, downsampling, context) for the input (named "input") and each layer up to the deepest
        tap, in network order. A layer's context is how many positions of its map on each side of a region
        the taps' features over that region depend on: none at the deepest tap, one more before each 3x3
        convolution, twice as many before each 2x2 pooling (so the map a pooling reads starts on one of
        its windows when the region does)."""
        downsampling, context, found = self.min_side, 0, []
        for name in reversed(LAYERS[self.arch][: self._depth]):
            found.append((name, downsampling, context))
            if name.startswith("conv"):
                context += 1
            elif name.startswith("pool"):
                context, downsampling = 2 * context, downsampling // 2
        found.append(("input", downsampling, context))
        return found[::-1]

    def load_weights(self, state_dict: Mapping[str, Tensor]) -> VGGFeatures:
        """Load torchvision-layout weights after checking every key and shape; returns self."""
        validate_state_dict(state_dict, self.arch)
        self.load_state_dict(dict(state_dict), strict=True)
        return self

    def normalize(self, image: Tensor) -> Tensor:
        if self.normalization.bgr:
            image = image.flip(1)
        return (image * self.normalization.scale - self.mean) / self.std

    def forward(self, image: Tensor, trim: Trim | None = None) -> dict[str, Tensor]:
        """The taps' maps; with `trim`, each layer's map (the taps' too) is what trim makes of it."""
        taps = {self._index[name]: name for name in self.layers}
        names = LAYERS[self.arch]
        outputs: dict[str, Tensor] = {}
        x = self.normalize(image)
        for index in range(self._depth):
            module = self.features[index]
            if isinstance(module, nn.Conv2d):
                if index == 0 and self.padding == Padding.REPLICATE:
                    x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), module.weight, module.bias)
                else:
                    x = F.conv2d(x, module.weight, module.bias, padding=1)
            elif isinstance(module, nn.ReLU):
                x = F.relu(x)  # never in place: the conv output may be a tap
            elif self.pooling == Pooling.AVERAGE:
                x = F.avg_pool2d(x, kernel_size=2, stride=2) * AVERAGE_POOL_SCALE
            else:
                x = F.max_pool2d(x, kernel_size=2, stride=2)
            if trim is not None:
                x = trim(names[index], x)
            if index in taps:
                outputs[taps[index]] = x
        return {name: outputs[name] for name in self.layers}
