"""The server's Runtime in process: one extractor and ONNX Runtime session per distinct device, parity
checked for each, AUTO resolved for each device, and the intra-op thread count."""

from __future__ import annotations

import torch

from stylize.server import runtime
from stylize.server.config import ServerConfig


def test_each_device_gets_its_own_session_and_its_workers_share_it(monkeypatch, model_dir) -> None:
    # Two distinct torch devices without a GPU: cpu:0 and cpu compare unequal, as cuda:0 and cuda:1 do.
    devices = [torch.device("cpu", 0), torch.device("cpu"), torch.device("cpu")]
    monkeypatch.setattr(runtime, "resolve_devices", lambda device, workers: devices)
    threads = torch.get_num_threads()
    try:
        built = runtime.Runtime(ServerConfig(model_dir=model_dir, workers=3, device="cpu"))
    finally:
        torch.set_num_threads(threads)  # the Runtime sets the process-wide count; later tests need theirs
    model = built.default
    assert model.sessions[0] is not model.sessions[1] and model.sessions[1] is model.sessions[2]
    assert model.extractors[0] is not model.extractors[1] and model.extractors[1] is model.extractors[2]
    assert model.parity.passed and len(model.parity.rows) == 12
    assert set(built.auto_precision) == {"cpu:0", "cpu"}
    assert all(choice.precision in ("fp32", "bf16") for choice in built.auto_precision.values())


def test_intra_op_threads_share_the_cores_unless_the_operator_says(model_dir) -> None:
    cores = len(runtime.os.sched_getaffinity(0))
    assert runtime.intra_op_threads(ServerConfig(model_dir=model_dir, workers=1)) == cores
    assert runtime.intra_op_threads(ServerConfig(model_dir=model_dir, workers=cores * 2)) == 1
    assert runtime.intra_op_threads(ServerConfig(model_dir=model_dir, workers=1, threads=3)) == 3


def test_jobs_on_cuda_report_progress_every_few_iterations_and_on_the_cpu_every_one() -> None:
    # A Progress record reads the losses back to the host: on CUDA that sync is kept off most iterations.
    assert runtime.progress_every(torch.device("cuda", 1)) == runtime.CUDA_PROGRESS_EVERY > 1
    assert runtime.progress_every(torch.device("cpu")) == 1
