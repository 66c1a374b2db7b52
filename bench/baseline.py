"""A minimal plain-torch Gatys loop: the speed baseline that bench/engine.py holds the engine against.

VGG up to the deepest tapped layer with the engine's own weights (shared, frozen) and in-place ReLUs;
the input normalization; content MSE on the content layers plus Gram MSE on the style layers; autograd on
the pixels; torch.optim's L-BFGS (one evaluation per step, no line search, as the engine runs it) or Adam.
Nothing else: no records, previews, clamping, layer weights or loss normalization.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from stylize.model.vgg import LAYER_INDEX, VGGFeatures


def gram(feature: Tensor) -> Tensor:
    _, channels, height, width = feature.shape
    flat = feature.reshape(channels, height * width)
    return flat @ flat.T / (channels * height * width)


class PlainVGG(nn.Module):
    """torchvision-style VGG features cut after the deepest tap, returning the taps in a dict."""

    def __init__(self, extractor: VGGFeatures, layers: Sequence[str]):
        super().__init__()
        index = LAYER_INDEX[extractor.arch]
        self.taps = {index[name]: name for name in layers}
        modules = [
            nn.ReLU(inplace=True) if isinstance(module, nn.ReLU) else module
            for module in extractor.features[: max(self.taps) + 1]
        ]
        self.features = nn.Sequential(*modules)
        self.normalize = extractor.normalize

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        x = self.normalize(image)
        found = {}
        for index, module in enumerate(self.features):
            x = module(x)
            if index in self.taps:
                found[self.taps[index]] = x
        return found


def iterations(
    content: Tensor,
    style: Tensor,
    extractor: VGGFeatures,
    *,
    content_layers: Sequence[str],
    style_layers: Sequence[str],
    style_weight: float,
    optimizer: str,
    learning_rate: float = 0.02,
    history: int = 50,
) -> Iterator[float]:
    """Optimize from the content image ([1, 3, H, W], on the extractor's device); yields the loss of
    each iteration, forever."""
    network = PlainVGG(extractor, [*content_layers, *style_layers])
    with torch.no_grad():
        content_targets = {name: network(content)[name].clone() for name in content_layers}
        style_features = network(style)
        style_targets = {name: gram(style_features[name]) for name in style_layers}
    image = content.clone().requires_grad_(True)
    if optimizer == "lbfgs":
        step: torch.optim.Optimizer = torch.optim.LBFGS(
            [image], lr=1.0, max_iter=1, history_size=history, tolerance_grad=0.0, tolerance_change=0.0
        )
    else:
        step = torch.optim.Adam([image], lr=learning_rate)

    def closure() -> Tensor:
        step.zero_grad()
        features = network(image)
        loss = sum(torch.mean((features[name] - content_targets[name]) ** 2) for name in content_layers)
        loss = loss + style_weight * sum(
            torch.mean((gram(features[name]) - style_targets[name]) ** 2) for name in style_layers
        )
        loss.backward()
        return loss

    while True:
        yield float(step.step(closure).detach())
