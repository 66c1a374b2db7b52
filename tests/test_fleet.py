"""A fleet: three `stylize-server` processes on one real redis-server, all on 127.0.0.1.

- A job submitted on one replica is watched from the two others at once (the same events in the same
  order) and cancelled from the third; a Stylize caller that leaves cancels its job wherever it runs.
- Redis stops answering (SIGSTOP) for a few seconds: every call fails fast with UNAVAILABLE naming the
  broker, readiness (not liveness) turns NOT_SERVING, a job running meanwhile finishes, and service
  resumes with no restart.
- The process running a job is SIGKILLed: another process runs the job again and it completes; the
  watchers are told, with the attempt number.

The kill comes last: it leaves two replicas.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from redisproc import RedisProcess
from serverproc import (
    LONG,
    SERVICE_NAME,
    ServerProcess,
    StreamReader,
    sample,
    scrape,
    stylize_request,
    wait_until,
)

from stylize.v1 import stylize_pb2 as pb
from stylize.v1 import stylize_pb2_grpc

# Short enough for the kill test to wait for it, long enough that the pause test (PAUSE_SECONDS) does not
# make a renewing worker's lease look lost.
LEASE_SECONDS = 4
PAUSE_SECONDS = 2.0
# A call while Redis hangs waits at most the broker's socket timeout (2 s) before UNAVAILABLE.
FAIL_FAST_SECONDS = 3.5
# A job of a few seconds on a CPU: long enough to kill its process mid-way.
FINITE = {"size": 64, "min_size": 64, "initial_iterations": 150, "optimizer": pb.OPTIMIZER_ADAM}


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisProcess]:
    with RedisProcess() as server:
        yield server


@pytest.fixture(scope="module")
def fleet(model_dir: Path, redis_server: RedisProcess) -> Iterator[list[ServerProcess]]:
    args = (
        "--device", "cpu", "--workers", "1", "--threads", "1",
        "--broker", redis_server.url, "--lease-seconds", str(LEASE_SECONDS),
    )  # fmt: skip
    servers = [ServerProcess(model_dir, *args, wait_for=None) for _ in range(3)]
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_health("SERVING", 120)
        yield servers
    finally:
        for server in servers:
            if server.process is not None and server.process.poll() is None:
                server.stop()


def stub(server: ServerProcess) -> stylize_pb2_grpc.StyleTransferStub:
    return stylize_pb2_grpc.StyleTransferStub(grpc.insecure_channel(server.address))


def running_on(servers: list[ServerProcess]) -> list[ServerProcess]:
    return [s for s in servers if (sample(scrape(s.metrics_url), "stylize_jobs_in_progress") or 0) >= 1]


def kinds(events: list[pb.JobEvent]) -> list[str]:
    return [event.WhichOneof("event") for event in events]


def test_a_job_submitted_on_one_replica_is_watched_by_two_others_and_cancelled_from_the_third(
    fleet: list[ServerProcess],
) -> None:
    first, second, third = fleet
    job_id = stub(first).SubmitJob(stylize_request(LONG)).job_id
    watchers = [
        StreamReader(stub(server).WatchJob(pb.WatchJobRequest(job_id=job_id))) for server in (second, third)
    ]
    wait_until(lambda: all(watcher.latest >= 3 for watcher in watchers), 60)

    answer = stub(third).CancelJob(pb.CancelJobRequest(job_id=job_id), timeout=15)
    for watcher in watchers:
        watcher.join(15)
    assert answer.state == pb.JOB_STATE_CANCELLED
    assert [watcher.code for watcher in watchers] == [grpc.StatusCode.CANCELLED] * 2
    a, b = (watcher.events for watcher in watchers)
    assert kinds(a)[:2] == ["queued", "started"] and a[0].job_id == job_id
    # Both watchers started at once, so both saw the same events: same sequence numbers, same bytes.
    common = {e.sequence for e in a} & {e.sequence for e in b}
    assert len(common) >= 3
    by_sequence = {e.sequence: e.SerializeToString() for e in b}
    assert all(by_sequence[e.sequence] == e.SerializeToString() for e in a if e.sequence in common)
    assert [e.sequence for e in a] == sorted(e.sequence for e in a)
    # An id this server did not make never reaches Redis as a key: NOT_FOUND, and the replica stays ready.
    with pytest.raises(grpc.RpcError) as crafted:
        list(stub(second).WatchJob(pb.WatchJobRequest(job_id=job_id + ":events"), timeout=10))
    assert crafted.value.code() == grpc.StatusCode.NOT_FOUND and second.health(SERVICE_NAME) == "SERVING"
    # A late watcher on the first replica gets the history, ending with the cancellation.
    late = StreamReader(stub(first).WatchJob(pb.WatchJobRequest(job_id=job_id)))
    late.join(15)
    assert late.code == grpc.StatusCode.CANCELLED and kinds(late.events)[:2] == ["queued", "started"]


def test_a_stylize_caller_that_leaves_cancels_its_job_on_whichever_replica_runs_it(
    fleet: list[ServerProcess],
) -> None:
    def cancelled() -> float:
        return sum(
            sample(scrape(s.metrics_url), "stylize_jobs_total", status="cancelled", reason="cancelled") or 0
            for s in fleet
        )

    before = cancelled()
    call = stub(fleet[0]).Stylize(stylize_request(LONG))  # no deadline: LONG runs until cancelled
    job_id = ""
    for event in call:
        job_id = event.job_id
        if event.HasField("progress"):
            break
    call.cancel()
    # Counted by the worker that ran it, wherever that was (no watcher here: one would keep it running).
    wait_until(lambda: cancelled() == before + 1, 30, poll=0.2)
    with pytest.raises(grpc.RpcError) as ended:
        list(stub(fleet[1]).WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=10))
    assert ended.value.code() == grpc.StatusCode.CANCELLED and ended.value.details() == "the caller cancelled"


def test_while_redis_hangs_calls_fail_fast_a_running_job_finishes_and_service_resumes(
    fleet: list[ServerProcess], redis_server: RedisProcess
) -> None:
    running = stub(fleet[0]).SubmitJob(stylize_request(FINITE)).job_id
    wait_until(lambda: bool(running_on(fleet)), 60)
    redis_server.pause()
    try:
        failures = []
        for server in fleet:
            for call in (
                lambda s: s.SubmitJob(stylize_request(), timeout=30),
                lambda s: s.CancelJob(pb.CancelJobRequest(job_id=running), timeout=30),
                lambda s: list(s.WatchJob(pb.WatchJobRequest(job_id=running), timeout=30)),
            ):
                began = time.monotonic()
                with pytest.raises(grpc.RpcError) as caught:
                    call(stub(server))
                failures.append((caught.value.code(), caught.value.details(), time.monotonic() - began))
        # Readiness drops (Kubernetes stops routing to the pods); liveness does not (no restarts).
        wait_until(
            lambda: all(server.health(SERVICE_NAME) == "NOT_SERVING" for server in fleet), FAIL_FAST_SECONDS
        )
        assert [server.health() for server in fleet] == ["SERVING"] * 3
        time.sleep(max(0.0, PAUSE_SECONDS - 1))
    finally:
        redis_server.resume()
    assert {code for code, _, _ in failures} == {grpc.StatusCode.UNAVAILABLE}, failures
    assert all("job broker redis://127.0.0.1" in details for _, details, _ in failures), failures
    assert max(seconds for _, _, seconds in failures) < FAIL_FAST_SECONDS, failures

    wait_until(lambda: all(server.health(SERVICE_NAME) == "SERVING" for server in fleet), 15)
    watcher = StreamReader(stub(fleet[1]).WatchJob(pb.WatchJobRequest(job_id=running)))
    watcher.join(120)
    assert watcher.code == grpc.StatusCode.OK and watcher.events[-1].HasField("completed")
    assert "retrying" not in kinds(watcher.events)  # the pause did not cost the job its lease
    # And new work runs.
    events = list(stub(fleet[2]).Stylize(stylize_request(), timeout=120))
    assert events[-1].HasField("completed")


def test_a_job_whose_process_is_killed_completes_on_another_and_its_watchers_are_told(
    fleet: list[ServerProcess],
) -> None:
    job_id = stub(fleet[0]).SubmitJob(stylize_request(FINITE)).job_id
    wait_until(lambda: bool(running_on(fleet)), 60)
    [victim] = running_on(fleet)
    survivors = [server for server in fleet if server is not victim]
    watchers = [
        StreamReader(stub(server).WatchJob(pb.WatchJobRequest(job_id=job_id))) for server in survivors
    ]
    wait_until(lambda: all(watcher.latest >= 1 for watcher in watchers), 30)
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait(10)

    for watcher in watchers:
        watcher.join(120 + LEASE_SECONDS)
    for watcher in watchers:
        assert watcher.code == grpc.StatusCode.OK, kinds(watcher.events)
        assert watcher.events[-1].HasField("completed")
        retry = next(event for event in watcher.events if event.HasField("retrying"))
        assert retry.retrying.attempt == 2 and retry.retrying.max_attempts == 3
        assert "lease" in retry.retrying.reason
        restarted = watcher.events[watcher.events.index(retry) + 1]
        assert restarted.HasField("started") and restarted.started.attempt == 2
        sequences = [event.sequence for event in watcher.events]
        assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    assert (
        sum(sample(scrape(s.metrics_url), "stylize_jobs_total", status="succeeded") or 0 for s in survivors)
        >= 1
    )


def test_the_fleet_shares_one_queue_figure(fleet: list[ServerProcess]) -> None:
    alive = [server for server in fleet if server.process.poll() is None]
    blockers = [stub(alive[0]).SubmitJob(stylize_request(LONG)).job_id for _ in alive]
    waiting = stub(alive[0]).SubmitJob(stylize_request(LONG)).job_id
    try:
        wait_until(
            lambda: all(sample(scrape(s.metrics_url), "stylize_fleet_queue_depth") == 1 for s in alive), 30
        )
        info = stub(alive[-1]).GetServerInfo(pb.GetServerInfoRequest())
        assert info.queue.depth == 1
    finally:
        for job_id in [*blockers, waiting]:
            stub(alive[-1]).CancelJob(pb.CancelJobRequest(job_id=job_id), timeout=30)


def test_watching_from_many_threads_does_not_exhaust_the_replica(fleet: list[ServerProcess]) -> None:
    alive = [server for server in fleet if server.process.poll() is None]
    job_id = stub(alive[0]).SubmitJob(stylize_request()).job_id
    results: list[grpc.StatusCode] = []

    def watch() -> None:
        events = list(stub(alive[1]).WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=120))
        results.append(grpc.StatusCode.OK if events[-1].HasField("completed") else grpc.StatusCode.UNKNOWN)

    threads = [threading.Thread(target=watch) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(150)
    assert results == [grpc.StatusCode.OK] * 20
