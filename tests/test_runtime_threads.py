"""Which threads the Runtime's torch work runs on, and with how many OpenMP threads.

libgomp keeps a pool of team threads for every thread that ran a parallel region, until that thread ends,
and while all pools together outnumber the cores its threads sleep at every barrier instead of spinning:
start-up work must not leave a pool behind, and a worker must compute with the configured thread count.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import torch
from PIL import Image

from stylize.model.artifact import Artifact
from stylize.server import convert, runtime
from stylize.server.config import ServerConfig
from stylize.server.engine.records import Result
from stylize.v1 import stylize_pb2 as pb

T = TypeVar("T")


def png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 32), color).save(buffer, format="PNG")
    return buffer.getvalue()


def on_new_thread(work: Callable[[], T]) -> T:
    results: list[T] = []
    thread = threading.Thread(target=lambda: results.append(work()))
    thread.start()
    thread.join()
    return results[0]


def test_start_up_runs_on_a_thread_that_has_ended_and_jobs_use_the_configured_threads(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded_on: list[threading.Thread] = []
    load = runtime.Runtime._load

    def recording_load(self: runtime.Runtime, artifact: Artifact) -> runtime.Model:
        loaded_on.append(threading.current_thread())
        return load(self, artifact)

    monkeypatch.setattr(runtime.Runtime, "_load", recording_load)
    before = torch.get_num_threads()
    wanted = before + 1  # differs from whatever this process runs with
    try:
        built = runtime.Runtime(ServerConfig(model_dir=model_dir, device="cpu", threads=wanted))
        assert built.threads == wanted and built.ready
        assert loaded_on and all(t is not threading.current_thread() for t in loaded_on)
        assert not any(t.is_alive() for t in loaded_on)  # its OpenMP pool went with it
        assert torch.get_num_threads() == wanted  # the caller's thread
        assert on_new_thread(torch.get_num_threads) == wanted  # a thread started later

        request = pb.StylizeRequest(
            content_image=png((200, 40, 40)),
            styles=[pb.StyleImage(image=png((20, 40, 220)))],
            options=pb.StyleOptions(size=32, min_size=32, initial_iterations=1, precision=pb.PRECISION_FP32),
        )
        job = convert.request_from_proto(request, built.config.limits)

        def job_on_a_thread_told_otherwise() -> tuple[int, int]:
            torch.set_num_threads(1)
            _, records = built.run(job, threading.Event(), 0)
            results = [record for record in records if isinstance(record, Result)]
            return len(results), torch.get_num_threads()

        assert on_new_thread(job_on_a_thread_told_otherwise) == (1, wanted)
    finally:
        torch.set_num_threads(before)  # the Runtime sets the process-wide count; later tests need theirs


def test_an_error_on_the_start_up_thread_reaches_the_caller(tmp_path: Path) -> None:
    with pytest.raises(runtime.StartupError, match="holds no model"):
        runtime.Runtime(ServerConfig(model_dir=tmp_path, device="cpu", threads=1))
