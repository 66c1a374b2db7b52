"""The network's layout: channels-last input and weights, so no iteration converts 20M parameters.

A convolution whose input and weight differ in memory layout converts the weight (aten::contiguous under
aten::_convolution in the forward, under aten::convolution_backward in the backward), every iteration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch
from samples import sample
from torch.profiler import ProfilerActivity, profile

from stylize.api.options import DEFAULTS, Precision
from stylize.model.vgg import VGGFeatures, random_state_dict
from stylize.server.engine.records import Progress, Started
from stylize.server.engine.run import NETWORK_MEMORY_FORMAT, stylize

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def conv_weights(network: VGGFeatures) -> list[torch.Tensor]:
    return [parameter for parameter in network.parameters() if parameter.dim() == 4]


def weight_conversions(precision: Precision) -> tuple[int, VGGFeatures]:
    """(4-D tensors made contiguous inside convolutions during two iterations, the extractor)."""
    extractor = VGGFeatures().load_weights(random_state_dict(0))
    assert not any(w.is_contiguous(memory_format=NETWORK_MEMORY_FORMAT) for w in conv_weights(extractor))
    options = dataclasses.replace(DEFAULTS, size=48, min_size=48, initial_iterations=4, precision=precision)
    job = stylize(
        sample("chelsea.png", 64),
        [(sample("hubble_deep_field.jpg", 64), 1.0)],
        options,
        extractor,
        device=CPU,
    )
    assert isinstance(next(job), Started)
    assert isinstance(next(job), Progress)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(2):
            assert isinstance(next(job), Progress)
    job.close()
    conversions = 0
    for event in prof.events():
        parent = event.cpu_parent
        if (
            event.name == "aten::contiguous"
            and parent is not None
            and parent.name in ("aten::_convolution", "aten::convolution_backward")
            and event.input_shapes
            and len(event.input_shapes[0]) == 4
            and event.input_shapes[0][0] != 1  # a weight, not the [1, C, H, W] activations
        ):
            conversions += 1
    return conversions, extractor


def test_a_job_makes_the_callers_weights_channels_last_and_no_iteration_converts_them() -> None:
    conversions, extractor = weight_conversions(Precision.FP32)
    assert conversions == 0
    assert all(w.is_contiguous(memory_format=NETWORK_MEMORY_FORMAT) for w in conv_weights(extractor))


def test_the_bf16_copy_of_the_weights_is_channels_last_too() -> None:
    conversions, extractor = weight_conversions(Precision.BF16)
    assert conversions == 0
    cast = extractor.with_dtype(torch.bfloat16)
    assert all(w.is_contiguous(memory_format=NETWORK_MEMORY_FORMAT) for w in conv_weights(cast))
