"""Numeric precision of the network: which autocast region the forward pass runs in.

Only the VGG forward (and its backward) runs in bf16; Gram matrices, statistics and losses
are float32 (see losses.py). AUTO means bf16 on CUDA devices that support it and on the CPU
(with AMX/AVX-512-BF16 it nearly halves the time of an iteration; see bench/engine.py),
float32 elsewhere. fp16 is not offered: its range overflows on VGG activations.
"""

from __future__ import annotations

import contextlib

import torch

from stylize.server.engine.options import Precision


def network_dtype(precision: Precision, device: torch.device) -> torch.dtype:
    if precision == Precision.FP32:
        return torch.float32
    if precision == Precision.BF16:
        return torch.bfloat16
    if device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def network_autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    """The context the network's forward runs in for this precision and device."""
    if network_dtype(precision, device) == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
