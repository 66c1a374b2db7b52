"""Faults: a server killed mid-job and restarted on the same port; SIGTERM with a full queue.

- SIGKILL: the client library raises Unavailable for the stream of the running job and for calls while
  nothing listens; retrying once a new process listens on the same port succeeds (the client keeps its
  channel, as a caller would).
- SIGTERM with one job running and the queue full: every job's stream (Stylize callers and WatchJob
  watchers of submitted jobs) ends with UNAVAILABLE "server shutting down" within the grace period plus
  a bound, none hangs, and the process exits 0.
"""

from __future__ import annotations

import signal
import time

import grpc
import pytest
from serverproc import LONG, SMALL, ServerProcess, StreamReader, sample, scrape, stylize_request

from stylize.client import StylizeClient
from stylize.client.errors import Unavailable
from stylize.client.events import Progress
from stylize.v1 import stylize_pb2 as pb
from stylize.v1 import stylize_pb2_grpc

# After a restart the channel reconnects on its own backoff schedule (1 s growing by 1.6x); a caller
# retrying every RETRY_PAUSE gets through within this bound.
RETRY_WITHIN_SECONDS = 60
RETRY_PAUSE = 0.5
# The tests' LONG and SMALL jobs as the client library's keyword arguments.
CLIENT_LONG = {"size": 64, "min_size": 64, "initial_iterations": 5000, "optimizer": "adam"}
CLIENT_SMALL = dict(SMALL)


def test_a_client_sees_unavailable_when_the_server_is_killed_and_its_retry_reaches_the_new_process(
    model_dir,
) -> None:
    request = stylize_request()
    content, style = request.content_image, request.styles[0].image
    with ServerProcess(model_dir, "--device", "cpu", "--workers", "1") as first:
        port = first.port
        client = StylizeClient(first.address, timeout=120)
        stream = client.stylize(content, [style], **CLIENT_LONG)
        next(event for event in stream if isinstance(event, Progress))  # the job is running

        first.signal(signal.SIGKILL)
        assert first.wait(30) == -signal.SIGKILL
        with pytest.raises(Unavailable):
            for _ in stream:
                pass
        with pytest.raises(Unavailable):
            client.server_info(timeout=5)

    with ServerProcess(model_dir, "--device", "cpu", "--workers", "1", "--port", str(port)) as second:
        assert second.port == port
        deadline = time.monotonic() + RETRY_WITHIN_SECONDS
        while True:
            try:
                completed = client.stylize(content, [style], **CLIENT_SMALL).result()
                break
            except Unavailable:
                assert time.monotonic() < deadline, "the retry did not reach the new server"
                time.sleep(RETRY_PAUSE)
        assert completed.iterations == SMALL["initial_iterations"]
        # The new process ran it (its worker counts the job just after sending the result).
        counted = time.monotonic() + 10
        while (succeeded := sample(scrape(second.metrics_url), "stylize_jobs_total", status="succeeded")) < 1:
            assert time.monotonic() < counted, "the new server did not count the job"
            time.sleep(0.1)
        assert succeeded == 1
        client.close()


def test_sigterm_with_a_full_queue_ends_every_job_with_a_clear_status_and_exits_0(model_dir) -> None:
    grace, queue_size = 3, 4
    with ServerProcess(
        model_dir,
        *("--device", "cpu", "--workers", "1"),
        *("--max-queue", str(queue_size), "--grace-seconds", str(grace)),
    ) as server:
        channel = grpc.insecure_channel(server.address)
        stub = stylize_pb2_grpc.StyleTransferStub(channel)
        running = StreamReader(stub.Stylize(stylize_request(LONG)))
        running.wait_for_iteration(1)
        streams = {"running (Stylize)": running}
        # Half the queue are Stylize callers, half submitted jobs followed by a watcher.
        for index in range(queue_size):
            if index % 2 == 0:
                reader = StreamReader(stub.Stylize(stylize_request(LONG)))
                reader.wait_for_events(1)  # queued: accepted in this order
                streams[f"queued {index} (Stylize)"] = reader
            else:
                job_id = stub.SubmitJob(stylize_request(LONG), timeout=10).job_id
                reader = StreamReader(stub.WatchJob(pb.WatchJobRequest(job_id=job_id)))
                reader.wait_for_events(1)
                streams[f"queued {index} (WatchJob)"] = reader
        queue = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).queue
        assert (queue.depth, queue.running) == (queue_size, 1)
        with pytest.raises(grpc.RpcError) as caught:
            stub.SubmitJob(stylize_request(SMALL), timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        server.signal(signal.SIGTERM)
        signalled = time.monotonic()
        for reader in streams.values():
            reader.join(timeout=grace + 30 - (time.monotonic() - signalled))
        hung = [name for name, reader in streams.items() if reader.is_alive()]
        assert not hung, f"streams still open {time.monotonic() - signalled:.0f} s after SIGTERM: {hung}"
        codes = {name: reader.code for name, reader in streams.items()}
        assert set(codes.values()) == {grpc.StatusCode.UNAVAILABLE}, codes
        assert server.wait(30) == 0
        channel.close()
        log = server.log()
        assert f"cancelling {queue_size + 1} job(s)" in log
        assert "Traceback" not in log
