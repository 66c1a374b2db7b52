"""What PRECISION_AUTO resolves to: the decision rule with injected hardware and timings, the hardware
detection with injected CPU flags, the per-process cache, and the job's Started record.

`make test` runs this file a second time under ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2, so a
machine with bf16 hardware also runs the path of one without."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from stylize.api.options import DEFAULTS, Precision
from stylize.model.vgg import VGGFeatures, random_state_dict
from stylize.server.engine import precision
from stylize.server.engine.records import Started
from stylize.server.engine.run import stylize

CPU = torch.device("cpu")


def timings(fp32: float, bf16: float):
    calls: list[Precision] = []

    def seconds(which: Precision) -> float:
        calls.append(which)
        return {Precision.FP32: fp32, Precision.BF16: bf16}[which]

    return seconds, calls


def test_no_bf16_hardware_is_fp32_without_probing() -> None:
    seconds, calls = timings(1.0, 0.1)
    choice = precision.decide(False, "CPU capability AVX2", seconds)
    assert choice.precision == Precision.FP32 and choice.dtype == torch.float32
    assert calls == [] and "no bf16 hardware" in choice.reason


def test_bf16_hardware_and_a_clear_gain_is_bf16() -> None:
    seconds, calls = timings(1.0, 0.5)
    choice = precision.decide(True, "amx_bf16", seconds)
    assert choice.precision == Precision.BF16 and choice.dtype == torch.bfloat16
    assert sorted(calls) == sorted([Precision.FP32, Precision.BF16]) and "2.00x" in choice.reason


@pytest.mark.parametrize("bf16_seconds", [0.9, 1.0, 3.0])
def test_bf16_hardware_without_a_clear_gain_is_fp32(bf16_seconds: float) -> None:
    seconds, _ = timings(1.0, bf16_seconds)
    assert precision.decide(True, "avx512_bf16", seconds).precision == Precision.FP32


def test_the_threshold_is_the_documented_speedup() -> None:
    at, _ = timings(precision.MIN_BF16_SPEEDUP, 1.0)
    under, _ = timings(precision.MIN_BF16_SPEEDUP * 0.99, 1.0)
    assert precision.decide(True, "", at).precision == Precision.BF16
    assert precision.decide(True, "", under).precision == Precision.FP32


def cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    return path


@pytest.mark.parametrize(
    ("flags", "onednn_bf16", "expected"),
    [
        ("fpu sse avx2 fma", False, False),  # Zen 3: AVX2 only
        ("fpu avx2 avx512f avx512bw", True, False),  # Skylake-X: oneDNN emulates bf16 with AVX-512
        ("fpu avx2 avx512f avx512_bf16", True, True),  # Zen 4/5, Cooper Lake
        ("fpu avx2 avx512f amx_bf16 amx_tile", True, True),  # Sapphire Rapids
        ("fpu avx2 avx512f avx512_bf16", False, False),  # ONEDNN_MAX_CPU_ISA=AVX2 on such a machine
    ],
)
def test_cpu_bf16_hardware_from_flags_and_onednn(tmp_path, monkeypatch, flags, onednn_bf16, expected) -> None:
    path = cpuinfo(tmp_path, flags)
    read_flags = precision._read_flags
    monkeypatch.setattr(precision, "cpu_flags", lambda: read_flags(path))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn_bf16)
    hardware, evidence = precision.bf16_hardware(CPU)
    assert hardware is expected and evidence


def test_cpu_flags_are_read_from_the_first_flags_line(tmp_path) -> None:
    assert precision._read_flags(cpuinfo(tmp_path, "a b avx512_bf16")) == frozenset({"a", "b", "avx512_bf16"})
    assert precision._read_flags(tmp_path / "missing") is None


@pytest.fixture()
def extractor() -> VGGFeatures:
    return VGGFeatures().load_weights(random_state_dict(0))


@pytest.fixture()
def fresh_cache(monkeypatch) -> None:
    monkeypatch.setattr(precision, "_auto", {})


def test_auto_is_probed_once_per_device_and_cached(monkeypatch, extractor, fresh_cache) -> None:
    monkeypatch.setattr(precision, "bf16_hardware", lambda device: (True, "injected"))
    probes: list[Precision] = []

    def probe(network, device, which):
        probes.append(which)
        return 1.0 if which == Precision.FP32 else 0.25

    monkeypatch.setattr(precision, "probe_seconds", probe)
    first = precision.resolve(Precision.AUTO, CPU, extractor)
    again = precision.resolve(Precision.AUTO, CPU, extractor)
    assert first is again and first.precision == Precision.BF16 and len(probes) == 2


def test_explicit_bf16_without_hardware_runs_with_a_warning(monkeypatch, extractor) -> None:
    monkeypatch.setattr(precision, "bf16_hardware", lambda device: (False, "CPU capability AVX2"))
    choice = precision.resolve(Precision.BF16, CPU, extractor)
    assert choice.precision == Precision.BF16 and "no bf16 hardware" in (choice.warning or "")
    assert precision.resolve(Precision.FP32, CPU, extractor).warning is None


def test_the_probe_times_the_real_extractor(extractor) -> None:
    seconds = precision.probe_seconds(extractor, CPU, Precision.FP32)
    assert 0 < seconds < 60


def test_the_machine_at_hand_never_resolves_auto_to_emulated_bf16(extractor, fresh_cache) -> None:
    """Under the AVX2 imitation (or on a real AVX2 CPU) oneDNN reports no bf16, and AUTO must be fp32."""
    hardware, _ = precision.bf16_hardware(CPU)
    choice = precision.resolve(Precision.AUTO, CPU, extractor)
    if not hardware:
        assert choice.precision == Precision.FP32
    assert choice.precision in (Precision.FP32, Precision.BF16) and choice.warning is None


def test_cast_parameters_are_one_shared_copy(extractor) -> None:
    bf16 = extractor.with_dtype(torch.bfloat16)
    again = extractor.configured(layers=["relu2_1"]).with_dtype(torch.bfloat16)
    assert bf16.features is again.features and bf16.features is not extractor.features
    assert bf16.features[0].weight.dtype == torch.bfloat16
    assert extractor.features[0].weight.dtype == torch.float32 and bf16.mean.dtype == torch.float32
    assert extractor.with_dtype(torch.float32) is extractor


def small(**changes: object):
    return dataclasses.replace(DEFAULTS, size=32, min_size=32, initial_iterations=1, **changes)


def test_started_reports_the_resolved_precision_and_the_warning(monkeypatch, extractor, fresh_cache) -> None:
    content, style = torch.rand(3, 32, 32), torch.rand(3, 32, 32)
    monkeypatch.setattr(precision, "bf16_hardware", lambda device: (False, "injected"))
    auto = next(stylize(content, [(style, 1.0)], small(), extractor, device=CPU))
    assert isinstance(auto, Started) and auto.precision == "fp32" and auto.warnings == ()
    forced = next(stylize(content, [(style, 1.0)], small(precision="bf16"), extractor, device=CPU))
    assert forced.precision == "bf16" and len(forced.warnings) == 1
