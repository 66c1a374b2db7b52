"""Loss modules: normalization, fp32 statistics under bf16/fp16 autocast, the Wasserstein-2 loss, colour."""

from __future__ import annotations

import pytest
import torch

from stylize.api.options import LossNormalization
from stylize.server.engine import color
from stylize.server.engine.losses import (
    ContentLoss,
    GramStyleLoss,
    LayerSum,
    MeanCovarianceStyleLoss,
    TVLoss,
    blend,
    gram_matrix,
    mean_and_second_moment,
)


def features(channels: int = 16, size: int = 8, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(1, channels, size, size, generator=generator)) * scale


def test_losses_are_zero_at_the_target_and_invariant_to_feature_scale() -> None:
    a, b = features(seed=0), features(seed=1)
    for loss_type, statistics in [
        (ContentLoss, lambda f: f),
        (GramStyleLoss, gram_matrix),
        (MeanCovarianceStyleLoss, mean_and_second_moment),
    ]:
        assert loss_type(statistics(a))(a).abs().item() < 1e-4
        # 50x larger activations (Caffe-style weights against torchvision's): the same loss.
        original, scaled = loss_type(statistics(a))(b).item(), loss_type(statistics(a * 50))(b * 50).item()
        assert original > 0.01
        assert scaled == pytest.approx(original, rel=1e-3), loss_type.__name__


def test_gatys_normalization_is_the_papers_formula() -> None:
    """Gatys et al. 2016 eq. 4 and 1, written out with the unnormalized Gram F F^T."""
    a, b = features(channels=6, size=5, seed=0), features(channels=6, size=5, seed=1)
    n, m = 6, 25
    flat_a, flat_b = a.reshape(n, m).double(), b.reshape(n, m).double()
    style = ((flat_b @ flat_b.T - flat_a @ flat_a.T) ** 2).sum() / (4 * n**2 * m**2)
    content = 0.5 * ((b - a).double() ** 2).sum()
    gatys = LossNormalization.GATYS
    assert GramStyleLoss(gram_matrix(a), gatys)(b).item() == pytest.approx(style.item(), rel=1e-5)
    assert ContentLoss(a, gatys)(b).item() == pytest.approx(content.item(), rel=1e-5)


def test_positions_normalization_is_the_tensorflow_tutorials_formula() -> None:
    """The tutorial: gram = einsum('bijc,bijd->bcd') / (H*W); loss = reduce_mean((gram - target)**2);
    content reduce_mean((F - P)**2). Unlike the relative loss, it grows with the activations."""
    a, b = features(channels=6, size=5, seed=0), features(channels=6, size=5, seed=1)
    channels_last = [f.permute(0, 2, 3, 1).double() for f in (a, b)]
    grams = [torch.einsum("bijc,bijd->bcd", f, f) / 25 for f in channels_last]
    style = ((grams[1] - grams[0]) ** 2).mean()
    positions = LossNormalization.POSITIONS
    assert GramStyleLoss(gram_matrix(a), positions)(b).item() == pytest.approx(style.item(), rel=1e-5)
    assert ContentLoss(a, positions)(b).item() == pytest.approx(((b - a) ** 2).mean().item(), rel=1e-5)
    scaled = GramStyleLoss(gram_matrix(a * 10), positions)(b * 10).item()
    assert scaled == pytest.approx(style.item() * 10**4, rel=1e-4)


def test_mean_covariance_loss_is_relative_only() -> None:
    a = features()
    with pytest.raises(ValueError, match="relative only"):
        MeanCovarianceStyleLoss(mean_and_second_moment(a), LossNormalization.GATYS)


def test_gram_is_averaged_over_positions() -> None:
    small = features(size=8)
    tiled = small.repeat(1, 1, 2, 2)  # same statistics, four times the positions
    assert torch.allclose(gram_matrix(small), gram_matrix(tiled), rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gram_is_float32_under_low_precision_autocast(dtype: torch.dtype) -> None:
    # Large activations over many positions: the sums reach ~1e9 (fp16 overflows at 65504) and
    # the loss near the target is made of differences that bf16's 8-bit mantissa rounds away.
    activations = (300 + 30 * torch.rand(1, 64, 64, 64)).to(dtype)
    reference = gram_matrix(activations.double())
    with torch.autocast("cpu", dtype=dtype):
        ours = gram_matrix(activations)
        naive_flat = activations.flatten(2)
        naive = naive_flat @ naive_flat.transpose(1, 2) / naive_flat.shape[-1]
        loss_at_target = GramStyleLoss(reference.float())(activations)
    assert ours.dtype == torch.float32
    relative_error = ((ours.double() - reference).abs().max() / reference.abs().max()).item()
    assert relative_error < 1e-5
    naive_error = ((naive.double() - reference).abs().max() / reference.abs().max()).item()
    assert not naive_error < 1e-3  # what the fp32 cast protects against (inf or NaN also fail "<")
    assert loss_at_target.item() < 1e-8


def test_mean_covariance_loss_is_the_wasserstein_distance_between_gaussians() -> None:
    a, b = features(channels=6, size=16, seed=2), features(channels=6, size=16, seed=3)
    mean_a, moment_a = mean_and_second_moment(a.double())
    mean_b, moment_b = mean_and_second_moment(b.double())
    cov_a = moment_a - torch.outer(mean_a, mean_a)
    cov_b = moment_b - torch.outer(mean_b, mean_b)

    def sqrtm(m: torch.Tensor) -> torch.Tensor:
        values, vectors = torch.linalg.eigh(m)
        return (vectors * values.clamp(min=0).sqrt()) @ vectors.T

    root_a = sqrtm(cov_a)
    expected = (mean_a - mean_b).square().sum() + torch.trace(
        cov_a + cov_b - 2 * sqrtm(root_a @ cov_b @ root_a)
    )
    expected /= torch.trace(moment_a)
    ours = MeanCovarianceStyleLoss(mean_and_second_moment(a))(b)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-3)


def test_mean_covariance_gradient_is_finite_for_rank_deficient_features() -> None:
    target = mean_and_second_moment(features(channels=64, size=8, seed=4))
    # 2 x 2 = 4 positions for 64 channels: the covariance has rank <= 3 and many equal (zero) eigenvalues.
    image_features = features(channels=64, size=2, seed=5).requires_grad_(True)
    loss = MeanCovarianceStyleLoss(target)(image_features)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(image_features.grad).all()
    assert image_features.grad.abs().sum() > 0


def test_tv_loss_is_zero_for_flat_images_and_grows_with_noise() -> None:
    assert TVLoss()(torch.full((1, 3, 8, 8), 0.3)).item() == 0
    noisy = TVLoss()(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))).item()
    assert noisy > 0.1


def test_layer_weights_are_relative() -> None:
    a, b = features(seed=0), features(seed=1)
    one = LayerSum({"x": ContentLoss(a)}, {"x": 3.0})({"x": b})
    two = LayerSum({"x": ContentLoss(a), "y": ContentLoss(a)}, {"x": 1.0, "y": 1.0})({"x": b, "y": b})
    assert one.item() == pytest.approx(two.item(), rel=1e-6)
    assert LayerSum({"x": ContentLoss(a)}, {"x": 0.0})({"x": b}).item() == 0


def test_blend_averages_statistics_by_share() -> None:
    x, y = torch.ones(2, 2), torch.zeros(2, 2)
    assert torch.allclose(blend([x, y], [0.75, 0.25]), torch.full((2, 2), 0.75))
    mean, moment = blend([(x[0], x), (y[0], y)], [0.5, 0.5])
    assert torch.allclose(mean, torch.full((2,), 0.5)) and torch.allclose(moment, torch.full((2, 2), 0.5))


def test_ycbcr_round_trip_and_luminance_weights() -> None:
    image = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(color.ycbcr_to_rgb(color.rgb_to_ycbcr(image)), image, atol=1e-5)
    gray = torch.full((3, 2, 2), 0.4)
    assert torch.allclose(color.rgb_to_ycbcr(gray), torch.tensor([0.4, 0.5, 0.5]).view(3, 1, 1), atol=1e-6)


def test_match_colors_gives_the_style_the_content_colour_mean_and_covariance() -> None:
    generator = torch.Generator().manual_seed(0)
    style = torch.rand(3, 32, 32, generator=generator) * torch.tensor([0.3, 0.3, 0.3]).view(3, 1, 1) + 0.2
    content = torch.rand(3, 24, 24, generator=generator) * torch.tensor([0.5, 0.1, 0.2]).view(3, 1, 1) + 0.3
    matched = color.match_colors(style, content)
    assert torch.allclose(matched.mean(dim=(1, 2)), content.mean(dim=(1, 2)), atol=1e-4)
    assert torch.allclose(torch.cov(matched.reshape(3, -1)), torch.cov(content.reshape(3, -1)), atol=1e-4)


def test_with_chroma_keeps_the_content_chroma() -> None:
    generator = torch.Generator().manual_seed(0)
    content = torch.rand(3, 8, 8, generator=generator) * 0.5 + 0.25
    y = torch.rand(1, 8, 8, generator=generator) * 0.2 + 0.4
    out = color.with_chroma(y, content)
    assert torch.allclose(color.rgb_to_ycbcr(out)[1:], color.rgb_to_ycbcr(content)[1:], atol=1e-5)
    assert torch.allclose(color.luminance(out), y, atol=1e-5)


def test_colour_statistics_stay_on_the_image_device() -> None:
    """Every tensor match_colors builds lives on the image's device (a CPU constant breaks CUDA jobs);
    the meta device shows it without a GPU."""
    mean, covariance = color._moments(torch.empty(3, 4, 4, device="meta"))
    assert mean.device.type == covariance.device.type == "meta"
