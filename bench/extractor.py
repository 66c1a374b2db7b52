"""Forward time of the VGG19 feature extractor: torch against ONNX Runtime, per size and backend. Prints JSON.

    .venv/bin/python -m bench.extractor [--model-dir DIR] [--sizes 256 512 1024] [--repeats 5] [--quick]

One forward pass of a square N x N RGB image through the artifact's network up to its deepest tapped layer
(relu5_1 by default), all tapped layers returned: what the service does once per style image and scale to
compute targets. Backends: torch (fp32, no_grad) on the CPU and on each CUDA device torch sees, and ONNX
Runtime with each execution provider of this build that really opens here (TensorRT, CUDA, CPU; a provider
ONNX Runtime drops at session creation is listed under `unavailable` with the reason). ONNX Runtime is fed
host memory and returns host memory, as the server's OrtTargets does, so its GPU figures include the copies.

Per size the backends run alternately (A B C A B C ...) after one warm-up each, so a slow drift of a shared
machine hits all of them alike; medians are reported, with `seconds_per_megapixel` (median / (N*N/1e6)).
The weights are the artifact's (random ones by default: speed does not depend on their values).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # bench.machine, and the tests' exporter

from serverproc import export_random_model  # noqa: E402

from bench.machine import describe, machine_info  # noqa: E402
from stylize.model.artifact import load_artifact  # noqa: E402
from stylize.server.runtime import PROVIDER_NAMES, StartupError, open_session  # noqa: E402

SIZES = (256, 512, 1024)
QUICK_SIZES = (256, 512)
REPEATS = 5
QUICK_REPEATS = 3

Forward = Callable[[np.ndarray], None]


def torch_forward(model_dir: Path, device: torch.device) -> Forward:
    extractor = load_artifact(model_dir).build_extractor().to(device).eval()

    def forward(image: np.ndarray) -> None:
        with torch.no_grad():
            features = extractor(torch.from_numpy(image).to(device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        del features

    return forward


def ort_forward(session: ort.InferenceSession) -> Forward:
    name = session.get_inputs()[0].name
    outputs = [output.name for output in session.get_outputs()]

    def forward(image: np.ndarray) -> None:
        session.run(outputs, {name: image})

    return forward


def backends(model_dir: Path) -> tuple[dict[str, Forward], dict[str, str]]:
    """({backend name: forward}, {backend name: why it is unavailable})."""
    available: dict[str, Forward] = {"torch:cpu": torch_forward(model_dir, torch.device("cpu"))}
    for index in range(torch.cuda.device_count()):
        available[f"torch:cuda:{index}"] = torch_forward(model_dir, torch.device("cuda", index))
    unavailable: dict[str, str] = {}
    onnx_path = load_artifact(model_dir).onnx_path
    for provider in PROVIDER_NAMES.values():
        name = f"onnxruntime:{provider}"
        if provider not in ort.get_available_providers():
            unavailable[name] = "not in this onnxruntime build"
            continue
        if provider != PROVIDER_NAMES["cpu"] and not torch.cuda.is_available():
            # Asking ORT anyway only fills stderr with its CUDA library loader errors.
            unavailable[name] = "no CUDA device visible"
            continue
        try:
            # One provider alone (explicit: a provider ORT drops is an error, not a silent CPU fallback).
            session = open_session(onnx_path, [(provider, {})], explicit=True)
        except StartupError as error:
            unavailable[name] = str(error)
            continue
        available[name] = ort_forward(session)
    return available, unavailable


def measure(forwards: dict[str, Forward], size: int, repeats: int) -> dict[str, list[float]]:
    image = np.random.default_rng(size).random((1, 3, size, size), dtype=np.float32)
    for forward in forwards.values():
        forward(image)  # warm-up: allocations, ONNX Runtime's first-shape planning, cuDNN autotuning
    runs: dict[str, list[float]] = {name: [] for name in forwards}
    for _ in range(repeats):
        for name, forward in forwards.items():
            began = time.perf_counter()
            forward(image)
            runs[name].append(time.perf_counter() - began)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, help="artifact to use (default: export random weights)")
    parser.add_argument("--sizes", type=int, nargs="+", help=f"edge lengths in px (default {SIZES})")
    parser.add_argument("--repeats", type=int, help=f"timed runs per backend and size (default {REPEATS})")
    parser.add_argument(
        "--quick", action="store_true", help=f"sizes {QUICK_SIZES} and {QUICK_REPEATS} repeats unless given"
    )
    args = parser.parse_args()
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    repeats = args.repeats or (QUICK_REPEATS if args.quick else REPEATS)

    machine = machine_info()
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model_dir or export_random_model(Path(scratch))
        forwards, unavailable = backends(model_dir)
        layers = load_artifact(model_dir).manifest.layers
        results = []
        for size in sizes:
            for name, runs in measure(forwards, size, repeats).items():
                median = statistics.median(runs)
                results.append(
                    {
                        "backend": name,
                        "size": size,
                        "seconds_median": round(median, 5),
                        "seconds_min": round(min(runs), 5),
                        "seconds_per_megapixel": round(median / (size * size / 1e6), 5),
                        "seconds": [round(run, 5) for run in runs],
                    }
                )

    print(
        json.dumps(
            {
                "benchmark": "extractor_forward",
                "machine": machine,
                "layers": layers,
                "repeats": repeats,
                "results": results,
                "unavailable": unavailable,
            },
            indent=2,
        )
    )
    table = [f"extractor forward, median of {repeats} ({describe(machine)})"]
    table += [
        f"  {r['size']:>5} px  {r['backend']:<36} {r['seconds_median'] * 1000:9.1f} ms" for r in results
    ]
    table += [f"  unavailable: {name}: {why}" for name, why in unavailable.items()]
    print("\n".join(table), file=sys.stderr)


if __name__ == "__main__":
    main()
