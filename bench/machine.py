"""The machine a benchmark ran on, so figures are never compared across machines by mistake.

    from bench.machine import machine_info
    report = {"benchmark": "...", "machine": machine_info(), ...}

Every figure that could differ between two runs of the same code is here: CPU model and the cores this
process may use, memory, GPUs (torch's view, and nvidia-smi's driver version where it exists), the torch,
ONNX Runtime and Python versions, and the load average when the benchmark started (other work on a shared
machine slows everything down; a load above the core count means the figures are pessimistic).
Nothing here fails on a machine without a GPU or without nvidia-smi.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path


def cpu_model() -> str:
    """The "model name" of /proc/cpuinfo (Linux), else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def memory_total_bytes() -> int | None:
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return None


def usable_cores() -> int:
    """Cores this process may run on (a container's CPU set), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def nvidia_driver() -> str | None:
    """The NVIDIA driver version from nvidia-smi; None where there is no nvidia-smi or it fails."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = result.stdout.strip().splitlines()
    return lines[0].strip() if result.returncode == 0 and lines else None


def gpus() -> list[dict[str, object]]:
    """Each CUDA device torch sees: name, memory, compute capability."""
    import torch

    if not torch.cuda.is_available():
        return []
    devices = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        devices.append(
            {
                "index": index,
                "name": properties.name,
                "memory_bytes": properties.total_memory,
                "capability": f"{properties.major}.{properties.minor}",
            }
        )
    return devices


def machine_info() -> dict[str, object]:
    import onnxruntime
    import torch

    from stylize.server.engine.precision import CPU_BF16_FLAGS, cpu_flags

    flags = cpu_flags() or frozenset()
    return {
        "cpu_model": cpu_model(),
        # torch's view (ATEN_CPU_CAPABILITY lowers it), and the native bf16 instructions the CPU has.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_flags": [flag for flag in CPU_BF16_FLAGS if flag in flags],
        "onednn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "cpu_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": memory_total_bytes(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "gpus": gpus(),
        "nvidia_driver": nvidia_driver(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def describe(info: dict[str, object]) -> str:
    """One line for the stderr tables."""
    gpu_names = ", ".join(str(gpu["name"]) for gpu in info["gpus"]) or "no GPU"
    bf16 = "+".join(info["cpu_bf16_flags"]) or "none"
    return (
        f"{info['cpu_model']} ({info['cpu_capability']}, bf16: {bf16}), "
        f"{info['cpu_cores']} cores, {gpu_names}; torch {info['torch']}, "
        f"onnxruntime {info['onnxruntime']}; load {info['load_average_1m']}"
    )


if __name__ == "__main__":
    import json

    print(json.dumps(machine_info(), indent=2))
