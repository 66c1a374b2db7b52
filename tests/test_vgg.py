"""The VGG19 and VGG16 feature extractors: torchvision's layout, taps, pooling/padding variants, weight
checks, Keras layer aliases."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from stylize.api.options import (
    ALIASES,
    DEFAULT_EXPORT_LAYERS,
    LAYERS,
    VGG19_LAYERS,
    Backbone,
    canonical_layer,
)
from stylize.model.vgg import (
    CAFFE_NORMALIZATION,
    ModelError,
    VGGFeatures,
    random_state_dict,
    validate_state_dict,
)

ARCHES = [arch.value for arch in Backbone]
# torchvision's VGG16 conv indices in `features` (models/vgg.py, configuration "D"), typed out here as an
# independent check of the layout derived from the layer names.
TORCHVISION_VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def architecture_from_layer_names(arch: str = "vgg19") -> dict[str, tuple[int, ...]]:
    """torchvision's `features` keys and shapes, derived from the layer names alone.

    `features` holds one module per LAYERS entry, in order; block b's convs have
    min(64 * 2**(b-1), 512) output channels, each takes the previous conv's channels.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    channels = 3
    for index, name in enumerate(LAYERS[Backbone(arch)]):
        match = re.fullmatch(r"conv(\d)_\d", name)
        if match:
            out = min(64 * 2 ** (int(match.group(1)) - 1), 512)
            shapes[f"features.{index}.weight"] = (out, channels, 3, 3)
            shapes[f"features.{index}.bias"] = (out,)
            channels = out
    return shapes


@pytest.fixture(scope="module")
def model() -> VGGFeatures:
    return VGGFeatures(VGG19_LAYERS).load_weights(random_state_dict(0)).eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ARCHES)
def test_state_dict_is_torchvision_layout(arch):
    state = VGGFeatures(arch=arch).state_dict()
    expected = architecture_from_layer_names(arch)
    assert list(state) == list(expected)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert [k for k in expected if k.endswith("weight")][:3] == [
        "features.0.weight",
        "features.2.weight",
        "features.5.weight",
    ]
    assert len(expected) == 2 * {"vgg19": 16, "vgg16": 13}[arch]


def test_vgg16_convs_sit_at_torchvisions_indices():
    weights = [k for k in architecture_from_layer_names("vgg16") if k.endswith(".weight")]
    assert weights == [f"features.{index}.weight" for index in TORCHVISION_VGG16_CONVS]


@pytest.mark.parametrize("arch", ARCHES)
def test_features_modules_sit_where_the_layer_names_say(arch):
    features = VGGFeatures(arch=arch).features
    assert len(features) == len(LAYERS[Backbone(arch)])
    kinds = {"conv": nn.Conv2d, "relu": nn.ReLU, "pool": nn.MaxPool2d}
    for module, name in zip(features, LAYERS[Backbone(arch)], strict=True):
        assert isinstance(module, kinds[name[:4]]), name


def keras_module_index(features: nn.Sequential, alias: str) -> int:
    """Where Keras' `blockB_convC` / `blockB_pool` sits in a torchvision `features` Sequential, found by
    walking the modules (block B starts after B-1 poolings; C counts the convs inside it). For a conv,
    the index of the ReLU after it: Keras' Conv2D layers apply their activation."""
    block, _, rest = alias.removeprefix("block").partition("_")
    blocks, convs = 1, 0
    for index, module in enumerate(features):
        if isinstance(module, nn.MaxPool2d):
            if rest == "pool" and blocks == int(block):
                return index
            blocks, convs = blocks + 1, 0
        elif isinstance(module, nn.Conv2d) and blocks == int(block):
            convs += 1
            if rest == f"conv{convs}":
                assert isinstance(features[index + 1], nn.ReLU)
                return index + 1
    raise AssertionError(f"{alias} not found")


@pytest.mark.parametrize("arch", ARCHES)
def test_keras_aliases_tap_the_modules_keras_names(arch, image):
    """Each alias's tap equals the Sequential run up to the module Keras' name denotes (post-ReLU)."""
    model = VGGFeatures(arch=arch).load_weights(random_state_dict(0, arch)).eval()
    aliases = ALIASES[Backbone(arch)]
    assert len(aliases) == len(model.features) - sum(isinstance(m, nn.Conv2d) for m in model.features)
    assert {"block4_conv2", "block5_conv1", "block2_pool"} <= set(aliases)
    with torch.no_grad():
        tapped = model.configured(layers=list(aliases))(image)
        normalized = model.normalize(image)
        for alias in aliases:
            expected = model.features[: keras_module_index(model.features, alias) + 1](normalized)
            assert torch.allclose(tapped[canonical_layer(alias, arch)], expected, atol=1e-5), alias
    assert canonical_layer("block4_conv2", arch) == "relu4_2"
    assert canonical_layer("block3_conv4", arch) == ("relu3_4" if arch == "vgg19" else None)


def test_taps_return_requested_layers_only_in_order(model, image):
    view = model.configured(layers=["relu3_1", "conv1_1", "pool2", "relu3_1"])
    out = view(image)
    assert list(out) == ["relu3_1", "conv1_1", "pool2"]
    assert out["conv1_1"].shape == (1, 64, 48, 40)
    assert out["pool2"].shape == (1, 128, 12, 10)
    assert out["relu3_1"].shape == (1, 256, 12, 10)


def test_default_layers_are_the_export_layers():
    assert VGGFeatures().layers == DEFAULT_EXPORT_LAYERS


def test_conv_tap_is_pre_activation_and_not_clobbered(model, image):
    out = model(image)
    assert (out["conv2_1"] < 0).any()
    assert torch.equal(out["relu2_1"], torch.relu(out["conv2_1"]))


def test_stops_at_deepest_tap(image):
    model = VGGFeatures(["relu1_1"]).load_weights(random_state_dict(0))
    model.features[2].weight.fill_(float("nan"))  # conv1_2: must never run
    assert torch.isfinite(model(image)["relu1_1"]).all()


def test_average_pooling_changes_outputs_after_first_pool_only(model, image):
    maximum, average = model(image), model.configured(pooling="average")(image)
    assert torch.equal(maximum["relu1_2"], average["relu1_2"])
    assert not torch.allclose(maximum["pool1"], average["pool1"])
    assert not torch.allclose(maximum["relu5_1"], average["relu5_1"])
    assert torch.isfinite(average["relu5_4"]).all()


def test_replicate_padding_changes_first_conv_border_only(model, image):
    zeros, replicate = model(image), model.configured(padding="replicate")(image)
    a, b = zeros["conv1_1"], replicate["conv1_1"]
    assert torch.equal(a[..., 1:-1, 1:-1], b[..., 1:-1, 1:-1])
    assert not torch.allclose(a[..., 0, :], b[..., 0, :])


def test_configured_shares_parameters():
    base = VGGFeatures().load_weights(random_state_dict(0))
    view = base.configured(layers=["relu5_4"], pooling="average", padding="replicate")
    assert (view.layers, view.pooling, view.padding) == (("relu5_4",), "average", "replicate")
    assert (base.layers, base.pooling, base.padding) == (DEFAULT_EXPORT_LAYERS, "max", "zeros")
    for (key, p), q in zip(base.named_parameters(), view.parameters(), strict=True):
        assert p.data_ptr() == q.data_ptr(), key
    base.features[0].bias.fill_(7.0)
    assert torch.all(view.features[0].bias == 7.0)


def test_random_weights_are_seeded_and_keep_activations_alive():
    first, again, other = random_state_dict(3), random_state_dict(3), random_state_dict(4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["features.0.weight"], other["features.0.weight"])
    model = VGGFeatures(["relu5_1", "relu5_4"]).load_weights(random_state_dict(0))
    out = model(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    for name, features in out.items():
        assert torch.isfinite(features).all(), name
        assert 0.1 < features.abs().mean() < 100, (name, float(features.abs().mean()))


def test_gradients_reach_the_input_not_the_weights(model, image):
    x = image.clone().requires_grad_(True)
    model.configured(layers=["relu3_1"])(x)["relu3_1"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in model.parameters())


def test_caffe_normalization_is_bgr_255_mean_subtracted():
    model = VGGFeatures(normalization=CAFFE_NORMALIZATION)
    rgb = torch.tensor([0.1, 0.5, 0.9]).view(1, 3, 1, 1)
    expected = torch.tensor([0.9 * 255 - 103.939, 0.5 * 255 - 116.779, 0.1 * 255 - 123.68])
    assert torch.allclose(model.normalize(rgb).flatten(), expected, atol=1e-4)


def test_min_side_follows_the_pools_on_the_way():
    assert VGGFeatures(["relu1_1"]).min_side == 1
    assert VGGFeatures(["pool1"]).min_side == 2
    assert VGGFeatures(DEFAULT_EXPORT_LAYERS).min_side == 16
    assert VGGFeatures(["pool5"]).min_side == 32


def test_context_counts_the_positions_a_regions_features_depend_on():
    context = VGGFeatures(DEFAULT_EXPORT_LAYERS).context()
    assert context[0] == ("input", 1, 70) and context[-1] == ("relu5_1", 16, 0)
    assert dict((name, (d, c)) for name, d, c in context)["pool4"] == (16, 1)
    model = VGGFeatures(["relu3_1"]).load_weights(random_state_dict(0))
    assert model.context()[0] == ("input", 1, 10)
    # Rows 8 to 12 of relu3_1 (4x smaller) read input rows 32 - 10 to 48 + 10, and no others.
    image = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(2))

    def region(changed_row: int) -> torch.Tensor:
        changed = image.clone()
        changed[..., changed_row, :] = 1 - changed[..., changed_row, :]
        with torch.no_grad():
            return model(changed)["relu3_1"][..., 8:12, :]

    assert torch.equal(region(21), region(95)) and torch.equal(region(58), region(95))
    assert not torch.equal(region(22), region(95)) and not torch.equal(region(57), region(95))


@pytest.mark.parametrize(
    ("layers", "arch", "fragment"),
    [
        (["relu1_1", "relu9_9"], "vgg19", "unknown layer(s) relu9_9 for vgg19; valid: conv1_1"),
        (["relu3_4"], "vgg16", "unknown layer(s) relu3_4 for vgg16; valid: conv1_1"),
        (["relu3_3"], "vgg11", "unknown arch 'vgg11'; valid: vgg19 vgg16"),
        ([], "vgg19", "no layers to tap"),
    ],
)
def test_bad_layers_give_one_line_error(layers, arch, fragment):
    with pytest.raises(ModelError) as info:
        VGGFeatures(layers, arch=arch)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_bad_pooling_names_the_choices():
    with pytest.raises(ModelError, match=r"unknown pooling 'l2'; valid: max average"):
        VGGFeatures(pooling="l2")


def test_weights_checks_name_the_key():
    good = random_state_dict(0)
    missing = {k: v for k, v in good.items() if k != "features.34.bias"}
    extra = {**good, "features.1.weight": torch.zeros(1)}
    misshapen = {**good, "features.5.weight": torch.zeros(128, 64, 5, 5)}
    integer = {**good, "features.0.bias": torch.zeros(64, dtype=torch.int64)}
    cases = [
        (missing, "lack 1 VGG19 key(s), first 'features.34.bias'"),
        (extra, "1 unexpected key(s), first 'features.1.weight'"),
        (misshapen, "'features.5.weight' has shape (128, 64, 5, 5), expected (128, 64, 3, 3)"),
        (integer, "'features.0.bias' has dtype torch.int64"),
    ]
    for state, fragment in cases:
        with pytest.raises(ModelError) as info:
            VGGFeatures().load_weights(state)
        assert fragment in str(info.value)
        assert "\n" not in str(info.value)
    validate_state_dict(good)
