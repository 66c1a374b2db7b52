"""A real server's memory with a full queue of maximum-size requests at the default limits, and how fast a
full queue refuses small and huge requests. Prints JSON.

    .venv/bin/python bench/memory.py [--model-dir DIR] [--out docs/bench/memory-NAME.json]

One stylize-server (CPU, one worker; every limit and --max-queue/--max-queued-pixels at its default). A
maximum-size request is a content and --max-styles styles of --max-input-pixels each (solid images: a few
hundred kB encoded, the most decoded pixels a request may carry), at a 64 px output so that running one
takes seconds. In order:
1. `baseline`: RSS after one small job;
2. `large_job`: one maximum-size request run to its end: the server's peak RSS while it ran, RSS once the
   worker is idle;
3. a small job that runs until cancelled occupies the worker; maximum-size requests are submitted until
   one is refused (`queued`: RSS after each accepted one, and the refusal: code, reason, milliseconds),
   then small requests until the queue's depth refuses one: `full_queue` RSS;
4. `refusals`: with the queue full, the time from sending to RESOURCE_EXHAUSTED of small and of
   maximum-size requests (the client's wall time, loopback);
5. `after_cancel`: every job cancelled, RSS once the worker is idle.
`without_the_cap_bytes` is what --max-queue maximum-size requests would hold at the measured growth per
queued request.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # bench.machine, and the tests' server harness

from procstatus import process_status  # noqa: E402
from serverproc import LONG, SMALL, ServerProcess, export_random_model, stylize_request, wait_until  # noqa: E402

from bench.machine import machine_info  # noqa: E402
from bench.report import print_report  # noqa: E402
from stylize.api.options import DEFAULT_LIMITS  # noqa: E402
from stylize.server.config import ServerConfig  # noqa: E402
from stylize.v1 import stylize_pb2 as pb  # noqa: E402
from stylize.v1 import stylize_pb2_grpc  # noqa: E402

SERVER_FLAGS = ("--device", "cpu", "--workers", "1", "--grace-seconds", "0")
REFUSALS = 5
# An idle worker trims the heap once a take finds no job (server/jobs.py: after TAKE_SECONDS).
SETTLE_SECONDS = 3.0
MIB = 2**20


def largest_image() -> bytes:
    """A solid PNG of --max-input-pixels (a 2:1 rectangle at most that many pixels)."""
    height = int((DEFAULT_LIMITS.max_input_pixels / 2) ** 0.5)
    image = Image.new("RGB", (2 * height, height), (120, 80, 200))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def largest_request(image: bytes) -> pb.StylizeRequest:
    request = stylize_request({"size": 64, "min_size": 64, "initial_iterations": 2})
    request.content_image = image
    del request.styles[:]
    request.styles.extend(pb.StyleImage(image=image) for _ in range(DEFAULT_LIMITS.max_styles))
    return request


def rss_mib(server: ServerProcess) -> float:
    return round(process_status(server.process.pid).rss_bytes / MIB, 1)


def refused_ms(call) -> tuple[float, str, str]:
    """(milliseconds to the error, its code, its details) of a call that must fail."""
    began = time.perf_counter()
    try:
        call()
    except grpc.RpcError as error:
        return round((time.perf_counter() - began) * 1000, 2), error.code().name, error.details() or ""
    raise AssertionError("the call was accepted")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, help="artifact to use (default: export random weights)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    defaults = ServerConfig(model_dir=Path("."))
    image = largest_image()
    huge = largest_request(image)
    small = stylize_request(SMALL)
    report: dict[str, object] = {
        "benchmark": "memory",
        "machine": machine_info(),
        "server_flags": list(SERVER_FLAGS),
        "limits": {
            "max_styles": DEFAULT_LIMITS.max_styles,
            "max_input_pixels": DEFAULT_LIMITS.max_input_pixels,
            "max_queue": defaults.max_queue,
            "max_queued_pixels": defaults.max_queued_pixels,
        },
        "largest_request": {
            "images": 1 + DEFAULT_LIMITS.max_styles,
            "decoded_pixels": (1 + DEFAULT_LIMITS.max_styles)
            * Image.open(io.BytesIO(image)).width
            * Image.open(io.BytesIO(image)).height,
            "encoded_bytes": huge.ByteSize(),
        },
    }
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model_dir or export_random_model(Path(scratch))
        with ServerProcess(model_dir, *SERVER_FLAGS) as server:
            channel = grpc.insecure_channel(
                server.address, options=[("grpc.max_send_message_length", 64 * MIB)]
            )
            stub = stylize_pb2_grpc.StyleTransferStub(channel)
            list(stub.Stylize(small, timeout=120))
            report["baseline_rss_mib"] = rss_mib(server)

            began = time.perf_counter()
            events = list(stub.Stylize(huge, timeout=600))
            assert events[-1].HasField("completed")
            time.sleep(SETTLE_SECONDS)
            status = process_status(server.process.pid)
            report["large_job"] = {
                "seconds": round(time.perf_counter() - began, 2),
                "peak_rss_mib": round(status.peak_rss_bytes / MIB, 1),
                "rss_after_mib": round(status.rss_bytes / MIB, 1),
            }

            running = stub.SubmitJob(stylize_request(LONG), timeout=30)
            wait_until(
                lambda: stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).queue.running == 1, 60
            )
            before_queue = rss_mib(server)
            queued, rss_after_each = [], []
            while True:
                try:
                    queued.append(stub.SubmitJob(huge, timeout=120).job_id)
                    rss_after_each.append(rss_mib(server))
                except grpc.RpcError:
                    break
            refusal = refused_ms(lambda: stub.SubmitJob(huge, timeout=30))
            report["queued"] = {
                "rss_before_mib": before_queue,
                "largest_requests_accepted": len(queued),
                "rss_after_each_mib": rss_after_each,
                "next_refused": {"ms": refusal[0], "code": refusal[1], "details": refusal[2][:200]},
            }
            while True:
                try:
                    queued.append(stub.SubmitJob(small, timeout=30).job_id)
                except grpc.RpcError:
                    break
            info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).queue
            report["full_queue"] = {
                "depth": info.depth,
                "capacity": info.capacity,
                "rss_mib": rss_mib(server),
                "peak_rss_mib": round(process_status(server.process.pid).peak_rss_bytes / MIB, 1),
            }
            timings: dict[str, list[float]] = {"small": [], "largest": []}
            for _ in range(REFUSALS):
                for name, message in (("small", small), ("largest", huge)):
                    ms, code, details = refused_ms(
                        lambda message=message: stub.SubmitJob(message, timeout=30)
                    )
                    assert code == "RESOURCE_EXHAUSTED" and "queue full" in details, (code, details)
                    timings[name].append(ms)
            report["refusals"] = {
                name: {
                    "bytes": message.ByteSize(),
                    "median_ms": round(statistics.median(timings[name]), 2),
                    "max_ms": max(timings[name]),
                }
                for name, message in (("small", small), ("largest", huge))
            }
            for job_id in [running.job_id, *queued]:
                stub.CancelJob(pb.CancelJobRequest(job_id=job_id), timeout=30)
            wait_until(
                lambda: stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).queue.running == 0, 60
            )
            time.sleep(SETTLE_SECONDS)
            report["after_cancel_rss_mib"] = rss_mib(server)
            channel.close()
    accepted = report["queued"]["largest_requests_accepted"]  # type: ignore[index]
    growth = (rss_after_each[0] - before_queue) * MIB if accepted else 0
    report["per_queued_largest_request_mib"] = round(growth / MIB, 1)
    report["without_the_cap_bytes"] = int(growth * defaults.max_queue)
    print_report(report, args.out)


if __name__ == "__main__":
    main()
