"""Colour preservation: luminance-only transfer and colour matching of the styles to the content.

Both follow Gatys et al., "Preserving Color in Neural Artistic Style Transfer" (arXiv:1606.05897).

Luminance-only transfer: the network sees only luminance (Y of full-range BT.601 YCbCr,
replicated to three channels); the optimized image is one channel; the output takes its Y
and the content's Cb and Cr, so it keeps the content's colours exactly (up to clipping to
the RGB cube). The styles' luminance is first matched to the content's mean and standard
deviation, so a dark style does not darken the picture.

Histogram matching: each style image's colours are mapped onto the content's with the
affine map that carries one Gaussian onto the other with the least displacement
(the Monge-Kantorovich solution, x -> A (x - mu_s) + mu_c with
A = S_s^-1/2 (S_s^1/2 S_c S_s^1/2)^1/2 S_s^-1/2). Why mean and covariance rather than
per-channel CDF matching: a CDF per channel ignores how R, G and B move together and
breaks smooth gradients into bands, while a 3x3 linear map keeps the style's textures
intact and still matches the colour distribution's first two moments, which is what the
Gram-based losses see.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Full-range BT.601 (JPEG) RGB -> YCbCr; Cb and Cr are centred on 0.5 for [0, 1] images.
_RGB_TO_YCBCR = torch.tensor(
    [
        [0.299, 0.587, 0.114],
        [-0.168735892, -0.331264108, 0.5],
        [0.5, -0.418687589, -0.081312411],
    ]
)
_YCBCR_TO_RGB = torch.linalg.inv(_RGB_TO_YCBCR.double()).float()
_CHROMA_OFFSET = torch.tensor([0.0, 0.5, 0.5])


def _per_pixel(matrix: Tensor, image: Tensor) -> Tensor:
    """matrix @ pixel for every pixel of a [..., 3, H, W] image."""
    return torch.einsum("ij,...jhw->...ihw", matrix.to(image.device, image.dtype), image)


def _offset(image: Tensor) -> Tensor:
    return _CHROMA_OFFSET.to(image.device, image.dtype).view(3, 1, 1)


def rgb_to_ycbcr(image: Tensor) -> Tensor:
    return _per_pixel(_RGB_TO_YCBCR, image) + _offset(image)


def ycbcr_to_rgb(image: Tensor) -> Tensor:
    return _per_pixel(_YCBCR_TO_RGB, image - _offset(image))


def luminance(image: Tensor) -> Tensor:
    """[..., 3, H, W] RGB -> [..., 1, H, W] Y."""
    return rgb_to_ycbcr(image)[..., :1, :, :]


def match_luminance(style_y: Tensor, content_y: Tensor) -> Tensor:
    """Shift and scale the style's luminance to the content's mean and standard deviation (population
    statistics: a one-pixel image has spread 0, not NaN; a flat style stays flat)."""
    style_std = style_y.std(correction=0).clamp(min=1e-6)
    scale = content_y.std(correction=0) / style_std
    return ((style_y - style_y.mean()) * scale + content_y.mean()).clamp(0, 1)


def with_chroma(y: Tensor, content: Tensor) -> Tensor:
    """RGB image from luminance `y` [..., 1, H, W] and the chroma of `content` [..., 3, H, W] (same size)."""
    chroma = rgb_to_ycbcr(content)[..., 1:, :, :]
    return ycbcr_to_rgb(torch.cat([y, chroma], dim=-3)).clamp(0, 1)


def _sqrtm(matrix: Tensor, inverse: bool = False) -> Tensor:
    """Square root (or inverse square root) of a symmetric positive semi-definite matrix."""
    eigenvalues: Tensor  # torch.linalg's results are untyped
    eigenvectors: Tensor
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    eigenvalues = eigenvalues.clamp(min=1e-10)
    powers = eigenvalues.rsqrt() if inverse else eigenvalues.sqrt()
    return (eigenvectors * powers) @ eigenvectors.T


def _moments(image: Tensor) -> tuple[Tensor, Tensor]:
    pixels = image.reshape(3, -1).double()
    mean = pixels.mean(1)
    centred = pixels - mean[:, None]
    # A little regularization keeps flat (single-colour) images invertible.
    regularization = torch.eye(3, dtype=torch.float64, device=pixels.device) * 1e-6
    covariance = centred @ centred.T / pixels.shape[1] + regularization
    return mean, covariance


def match_colors(style: Tensor, content: Tensor) -> Tensor:
    """The style image [3, H, W] recoloured so its colour mean and covariance are the content's."""
    style_mean, style_cov = _moments(style)
    content_mean, content_cov = _moments(content)
    style_root, style_inverse_root = _sqrtm(style_cov), _sqrtm(style_cov, inverse=True)
    transfer = style_inverse_root @ _sqrtm(style_root @ content_cov @ style_root) @ style_inverse_root
    pixels = style.reshape(3, -1).double()
    mapped = transfer @ (pixels - style_mean[:, None]) + content_mean[:, None]
    return mapped.reshape(style.shape).to(style.dtype).clamp(0, 1)
