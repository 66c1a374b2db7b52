"""Loss terms of style transfer: small modules, each holding its target as a buffer.

Normalization (why the weights carry over between image sizes and between weight kinds):
every per-layer loss is a *relative* squared error, the squared error of a statistic
divided by the squared magnitude of its target:

- statistics are averages over positions (Gram = F F^T / positions, means, covariances),
  so they do not grow with the image size;
- dividing by the target's magnitude makes each layer's loss dimensionless, so a network
  whose activations are 50x larger (Caffe's 0-255 input against torchvision's 0-1) gives
  the same loss values, and every layer counts alike instead of the loudest one winning;
- layer weights are relative inside their term (normalized to sum 1), so `style_weight`
  means the same with two style layers or five.

That is `loss_normalization` RELATIVE, the default. Two others reproduce the classic recipes,
whose published weights only mean what they meant there under the same arithmetic:

- GATYS (Gatys et al. 2016, eqs. 1 and 4): content 1/2 sum (F - P)^2; style per layer
  1/(4 N^2 M^2) sum (G - A)^2 with G = F F^T over M positions and N channels, which is
  1/4 of the mean over the N^2 entries of the squared difference of position-averaged Grams;
- POSITIONS (the Keras/TensorFlow tutorial): Grams divided by the number of positions, the
  mean of their squared difference; content the mean squared error of the features.

Both are absolute: their values scale with the activations' magnitude (so with the weights'
kind and the input normalization), as they did in those programs.

The total-variation term works on the image itself (RGB in [0, 1]): mean squared
difference of neighbouring pixels.

Every statistic and every loss is computed in float32 (the mean-covariance loss in float64) with
autocast disabled, whatever precision the network ran in: a Gram matrix sums H*W products, which
overflows in fp16 and loses the small differences the loss is made of in bf16 (8 bits of mantissa).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import torch
from torch import Tensor, nn

from stylize.api.options import LossNormalization

# Added to divisors so an all-zero target (a black image at a layer) gives a finite loss.
EPS = 1e-8
# GATYS's style loss relative to POSITIONS': 1/(4 N^2 M^2) sum (G - A)^2 = 1/4 mean (G/M - A/M)^2.
GATYS_STYLE_FACTOR = 0.25


def _fp32(features: Tensor) -> Tensor:
    """Features as float32 [positions, C]: every position of every image in the batch, by channel. A
    view of channels-last features (the network's layout), and its gradient is channels-last too; a
    crop of such features is copied row by row into that layout first."""
    features = features.float()
    if features.stride(1) == 1 and not features.is_contiguous(memory_format=torch.channels_last):
        features = features.contiguous(memory_format=torch.channels_last)
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def _no_autocast(tensor: Tensor) -> torch.autocast:
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def gram_matrix(features: Tensor, positions: int | None = None) -> Tensor:
    """[N, C, H, W] -> [C, C] float32: F F^T over `positions` (default: these features' own, N H W, the
    average). A part of an image's features over the whole image's positions is that part's share of the
    image's Gram matrix: the shares of the parts sum to it."""
    with _no_autocast(features):
        flat = _fp32(features)
        return flat.T @ flat / (positions or flat.shape[0])


def mean_and_second_moment(features: Tensor, positions: int | None = None) -> tuple[Tensor, Tensor]:
    """[N, C, H, W] -> (mean [C], second raw moment [C, C]), summed in float64, over `positions` like
    gram_matrix (so the parts of an image sum to the image's).

    Raw moments (not the covariance) because they are what blends linearly across styles and parts.
    float64 because the mean-covariance loss's gradient amplifies rounding in them: a covariance of fewer
    positions than channels (relu5_1 of a small image) has eigenvalues near zero, where d sqrt(x)/dx is
    large, so float32 sums taken in another order (by tiles, say) moved that gradient by 2e-3.
    """
    with _no_autocast(features):
        flat = _fp32(features).double()
        count = positions or flat.shape[0]
        return flat.sum(0) / count, flat.T @ flat / count


Statistic = TypeVar("Statistic", Tensor, tuple[Tensor, ...])


def blend(statistics: Sequence[Statistic], shares: Sequence[float]) -> Statistic:
    """Weighted average of one layer's statistics from several style images; the shares sum to 1."""
    # sum() of tensors is a tensor (there is at least one statistic); mypy sees `Tensor | Literal[0]`.
    if isinstance(statistics[0], Tensor):
        return cast(Tensor, sum(s * share for s, share in zip(statistics, shares, strict=True)))
    return tuple(
        cast(Tensor, sum(parts[i] * share for parts, share in zip(statistics, shares, strict=True)))
        for i in range(len(statistics[0]))
    )


def _relative(target: Tensor) -> Tensor:
    return 1.0 / (target.square().mean() + EPS)


class ContentLoss(nn.Module):
    """Mean squared error of the features times a scale: relative to the target's mean square, or
    (GATYS) times half the number of elements, making it 1/2 sum (F - P)^2, or (POSITIONS) one."""

    target: Tensor  # buffers
    scale: Tensor

    def __init__(self, target: Tensor, normalization: LossNormalization = LossNormalization.RELATIVE):
        super().__init__()
        target = target.detach().float()
        scales: dict[LossNormalization, Callable[[Tensor], Tensor]] = {
            LossNormalization.RELATIVE: _relative,
            LossNormalization.GATYS: lambda t: torch.tensor(t.numel() / 2.0),
            LossNormalization.POSITIONS: lambda t: torch.tensor(1.0),
        }
        self.register_buffer("target", target)
        self.register_buffer("scale", scales[normalization](target))

    def forward(self, features: Tensor) -> Tensor:
        with _no_autocast(features):
            return (features.float() - self.target).square().mean() * self.scale

    def part(self, features: Tensor, rows: slice, columns: slice) -> Tensor:
        """The share of the loss of the features of a part of the image (target positions `rows`,
        `columns`): the shares of the parts sum to the loss."""
        with _no_autocast(features):
            target = self.target[..., rows, columns]
            return (features.float() - target).square().sum() / self.target.numel() * self.scale


class GramStyleLoss(nn.Module):
    """Gatys et al.'s style loss: mean squared error of position-averaged Gram matrices times a
    scale: relative to the target's mean square, 1/4 (GATYS) or one (POSITIONS)."""

    statistics = staticmethod(gram_matrix)
    target: Tensor  # buffers
    scale: Tensor

    def __init__(self, target: Tensor, normalization: LossNormalization = LossNormalization.RELATIVE):
        super().__init__()
        target = target.detach().float()
        scales: dict[LossNormalization, Callable[[Tensor], Tensor]] = {
            LossNormalization.RELATIVE: _relative,
            LossNormalization.GATYS: lambda t: torch.tensor(GATYS_STYLE_FACTOR),
            LossNormalization.POSITIONS: lambda t: torch.tensor(1.0),
        }
        self.register_buffer("target", target)
        self.register_buffer("scale", scales[normalization](target))

    def forward(self, features: Tensor) -> Tensor:
        return self.of_statistics(gram_matrix(features))

    def of_statistics(self, gram: Tensor) -> Tensor:
        return (gram - self.target).square().mean() * self.scale


class MeanCovarianceStyleLoss(nn.Module):
    """Squared Wasserstein-2 distance between Gaussians fitted to the features and to the target:

        ||mu - mu_t||^2 + tr(S) + tr(S_t) - 2 tr((S_t^1/2 S S_t^1/2)^1/2)

    relative to the target's second moment tr(S_t) + ||mu_t||^2. S_t^1/2 comes from one eigh of
    the target covariance, here. The last trace is the sum of square roots of the eigenvalues of
    a symmetric matrix, taken with eigvalsh, whose gradient (V diag(g) V^T) stays finite when
    eigenvalues repeat, as they do for the rank-deficient covariances of small feature maps
    (eigh's gradient divides by eigenvalue gaps). Eigenvalues below a small floor get no
    gradient, where d sqrt(x)/dx would blow up.
    """

    statistics = staticmethod(mean_and_second_moment)
    mean: Tensor  # buffers
    covariance_root: Tensor
    covariance_trace: Tensor
    scale: Tensor
    floor: Tensor

    def __init__(
        self,
        target: tuple[Tensor, Tensor],
        normalization: LossNormalization = LossNormalization.RELATIVE,
        floor: float = 1e-8,
    ):
        super().__init__()
        if normalization != LossNormalization.RELATIVE:  # options.validate() refuses the combination
            raise ValueError(f"the mean-covariance loss is relative only, not {normalization}")
        # float64 throughout, like the statistics (see mean_and_second_moment).
        mean, second_moment = (t.detach().double() for t in target)
        covariance = second_moment - torch.outer(mean, mean)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        root = (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T
        magnitude = torch.trace(second_moment)
        self.register_buffer("mean", mean)
        self.register_buffer("covariance_root", root)
        self.register_buffer("covariance_trace", torch.trace(covariance))
        self.register_buffer("scale", 1.0 / (magnitude + EPS))
        # Floor for eigenvalues of S_t^1/2 S S_t^1/2 (units: variance squared).
        self.register_buffer("floor", (magnitude / len(mean)) ** 2 * floor + EPS)

    def forward(self, features: Tensor) -> Tensor:
        return self.of_statistics(mean_and_second_moment(features))

    def of_statistics(self, statistics: tuple[Tensor, Tensor]) -> Tensor:
        """The loss from the features' (mean, second moment), in float64 like them; a float32 value."""
        mean, second_moment = (statistic.double() for statistic in statistics)
        with _no_autocast(mean):
            covariance = second_moment - torch.outer(mean, mean)
            product = self.covariance_root @ covariance @ self.covariance_root
            eigenvalues: Tensor = torch.linalg.eigvalsh((product + product.T) / 2)  # torch.linalg: untyped
            root_trace = eigenvalues.clamp(min=self.floor).sqrt().sum()
            distance = (
                (mean - self.mean).square().sum()
                + torch.trace(covariance)
                + self.covariance_trace
                - 2 * root_trace
            )
            return (distance * self.scale).float()


STYLE_LOSSES: dict[str, type[GramStyleLoss] | type[MeanCovarianceStyleLoss]] = {
    "gram": GramStyleLoss,
    "mean_covariance": MeanCovarianceStyleLoss,
}


class TVLoss(nn.Module):
    """Total variation: mean squared difference of vertically and horizontally neighbouring pixels. An
    image one pixel high (or wide) has no vertical (horizontal) neighbours: that direction adds 0, not the
    NaN of an empty mean."""

    def forward(self, image: Tensor) -> Tensor:
        with _no_autocast(image):
            image = image.float()
            vertical = (image[..., 1:, :] - image[..., :-1, :]).square()
            horizontal = (image[..., :, 1:] - image[..., :, :-1]).square()
            return sum(
                (d.mean() if d.numel() else d.sum() for d in (vertical, horizontal)), image.new_zeros(())
            )


class LayerSum(nn.Module):
    """Weighted sum of per-layer losses; the weights are normalized to sum 1 (all zero: the sum is 0)."""

    def __init__(self, losses: Mapping[str, nn.Module], weights: Mapping[str, float]):
        super().__init__()
        self.losses = nn.ModuleDict(losses)
        total = sum(weights[name] for name in losses)
        self.weights = {name: (weights[name] / total if total > 0 else 0.0) for name in losses}

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        terms = [loss(features[name]) * self.weights[name] for name, loss in self.losses.items()]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def of_statistics(self, statistics: Mapping[str, Any]) -> Tensor:
        """The sum from each layer's style statistics instead of its features (style losses only)."""
        losses = cast(Mapping[str, GramStyleLoss | MeanCovarianceStyleLoss], self.losses)
        terms = [loss.of_statistics(statistics[name]) * self.weights[name] for name, loss in losses.items()]
        return torch.stack(terms).sum() if terms else torch.zeros(())


class Objective(nn.Module):
    """The whole loss. Returns [total, content, style, total_variation], each already weighted,
    as one tensor so that reading all four costs one device-to-host copy."""

    def __init__(
        self,
        content: LayerSum,
        style: LayerSum,
        *,
        content_weight: float,
        style_weight: float,
        tv_weight: float,
    ):
        super().__init__()
        self.content = content
        self.style = style
        self.tv = TVLoss()
        self.content_weight = content_weight
        self.style_weight = style_weight
        self.tv_weight = tv_weight

    def forward(self, features: Mapping[str, Tensor], image: Tensor) -> Tensor:
        content = self.content(features).to(image.device) * self.content_weight
        style = self.style(features).to(image.device) * self.style_weight
        tv = self.tv(image) * self.tv_weight
        return torch.stack([content + style + tv, content, style, tv])
