"""Numeric precision of the network: which dtype the VGG forward (and its backward) runs in.

Only the network runs in bf16; Gram matrices, statistics and losses are float32 (see losses.py).
fp16 is not offered: its range overflows on VGG activations.

AUTO is decided per device, once per process, by what the hardware really does:

1. bf16 hardware: CUDA compute capability 8.0 or higher; on the CPU, oneDNN's bf16 support (which
   honours ONEDNN_MAX_CPU_ISA) and native bf16 instructions (the `avx512_bf16` or `amx_bf16` flags).
   Without them bf16 is emulated, and a convolution can be hundreds of times slower than in fp32.
2. A timed probe: forward plus input gradient of the job's own extractor at PROBE_EDGE pixels, in fp32
   and in bf16. bf16 wins only where it is at least MIN_BF16_SPEEDUP times faster.

Everything else (no bf16 hardware, a close race) resolves to fp32, which is always correct. An explicit
BF16 runs as asked, with a warning where the hardware has no bf16.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from stylize.api.options import Precision

if TYPE_CHECKING:
    from stylize.model.vgg import VGGFeatures as Extractor

log = logging.getLogger(__name__)

# bf16 must beat fp32 by this factor in the probe to be chosen: a smaller gain is within the noise of a
# shared machine, and fp32 is the more accurate of the two.
MIN_BF16_SPEEDUP = 1.2
# The probe's image edge: large enough that the convolutions dominate (the deepest default layer is
# 16x smaller), small enough that an emulated bf16 pass stays well under a second.
PROBE_EDGE = 64
PROBE_REPEATS = 3
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")

DTYPES: dict[Precision, torch.dtype] = {Precision.FP32: torch.float32, Precision.BF16: torch.bfloat16}


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a job's network really runs in on one device, and why."""

    precision: Precision  # FP32 or BF16, never AUTO
    reason: str
    # Set when the choice is known to be slow here (explicit BF16 on hardware without bf16).
    warning: str | None = None

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags as the kernel reports them; None where they cannot be read (not Linux)."""
    return _read_flags(Path("/proc/cpuinfo"))


def _read_flags(cpuinfo: Path) -> frozenset[str] | None:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return None


def bf16_hardware(device: torch.device) -> tuple[bool, str]:
    """(whether the device computes bf16 natively, the evidence in words)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return (major, minor) >= (8, 0), f"compute capability {major}.{minor}"
    if device.type != "cpu":
        return False, f"no bf16 detection for {device.type}"
    capability = torch.backends.cpu.get_cpu_capability()
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False, f"CPU capability {capability}, oneDNN without bf16"
    flags = cpu_flags()
    if flags is None:  # oneDNN supports bf16; whether natively is unknown, so the probe decides
        return True, f"CPU capability {capability}, oneDNN bf16 (flags unreadable)"
    native = [flag for flag in CPU_BF16_FLAGS if flag in flags]
    if not native:
        return False, f"CPU capability {capability}, no {'/'.join(CPU_BF16_FLAGS)} (bf16 emulated)"
    return True, f"CPU capability {capability}, {'+'.join(native)}"


def decide(hardware: bool, evidence: str, seconds: Callable[[Precision], float]) -> PrecisionChoice:
    """AUTO's rule. `seconds(precision)` times the probe; it runs only where the hardware has bf16."""
    if not hardware:
        return PrecisionChoice(Precision.FP32, f"{evidence}: no bf16 hardware")
    fp32 = seconds(Precision.FP32)
    bf16 = seconds(Precision.BF16)
    speedup = fp32 / bf16 if bf16 > 0 else float("inf")
    timing = f"{evidence}; probe fp32 {fp32 * 1e3:.1f} ms, bf16 {bf16 * 1e3:.1f} ms ({speedup:.2f}x)"
    if speedup >= MIN_BF16_SPEEDUP:
        return PrecisionChoice(Precision.BF16, timing)
    return PrecisionChoice(Precision.FP32, f"{timing}: bf16 under {MIN_BF16_SPEEDUP}x faster")


def probe_seconds(network: Extractor, device: torch.device, precision: Precision) -> float:
    """Best of PROBE_REPEATS timings of one forward and input gradient of `network` (parameters in the
    precision's dtype) at PROBE_EDGE pixels, after one warm-up pass (kernel selection)."""
    cast_network = network.with_dtype(DTYPES[precision])
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, PROBE_EDGE, PROBE_EDGE, generator=generator).to(device)
    best = float("inf")
    for repeat in range(PROBE_REPEATS + 1):
        pixels = image.clone().requires_grad_(True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with autocast(precision, device):
            features = cast_network(pixels.contiguous(memory_format=torch.channels_last))
        sum(feature.float().square().mean() for feature in features.values()).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if repeat:
            best = min(best, time.perf_counter() - start)
    return best


_auto: dict[str, PrecisionChoice] = {}
_auto_lock = threading.Lock()


def resolve(precision: Precision, device: torch.device, network: Extractor) -> PrecisionChoice:
    """The precision `network` runs in on `device` for a job that asked for `precision`.

    AUTO is probed once per device and process (with `network`, the first caller's extractor) and logged.
    """
    if precision == Precision.FP32:
        return PrecisionChoice(Precision.FP32, "requested")
    if precision == Precision.BF16:
        hardware, evidence = bf16_hardware(device)
        warning = None if hardware else f"bf16 requested on {device}, which has no bf16 hardware ({evidence})"
        return PrecisionChoice(Precision.BF16, "requested", warning)
    key = str(device)
    with _auto_lock:
        if key not in _auto:
            hardware, evidence = bf16_hardware(device)
            choice = decide(hardware, evidence, lambda p: probe_seconds(network, device, p))
            log.info("precision auto on %s: %s (%s)", device, choice.precision, choice.reason)
            _auto[key] = choice
        return _auto[key]


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager[object]:
    """The context the network's forward runs in: bf16 autocast, or none for fp32."""
    if precision == Precision.FP32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
