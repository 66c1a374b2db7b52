"""Soak: a few hundred tiny jobs with random cancellations, client disconnects and short deadlines.

Afterwards the server must be back to idle (no job running, queue depth 0, jobs_in_progress 0, in both
GetServerInfo and /metrics), no job may have failed, and its thread count and resident memory may not
have grown beyond the bounds below (measured against a baseline taken after warm-up jobs, which
allocate what every later job reuses). The random choices are seeded: every run makes the same ones.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import grpc
import pytest
from procstatus import process_status
from serverproc import ServerProcess, collect, sample, scrape, stylize_request

from stylize.v1 import stylize_pb2 as pb
from stylize.v1 import stylize_pb2_grpc

# 240 jobs take 35-50 s on this 2-core machine (a 300-job soak took 42 s alone and 61 s beside another
# test run), keeping the whole test, server start included, well under 2 minutes.
JOBS = 240
CLIENTS = 6
WARM_UP_JOBS = 10
SETTLE_SECONDS = 30
# Bounds on the server's growth over the soak, measured first: over 300 jobs the RSS grew by 8 MiB and
# the thread count by 1 and 2 in two runs (the asyncio default executor starts its threads lazily, up to
# min(32, cores + 4)). The RSS bound leaves room for allocator noise and catches a leak of about 300 kB or
# more per job (64 MiB / 240 jobs: e.g. tensors, or a job's decoded images, kept per job); smaller
# leaks need a longer soak than a test suite can afford.
RSS_GROWTH_BOUND = 64 * 2**20
THREAD_GROWTH_BOUND = 4

Stub = stylize_pb2_grpc.StyleTransferStub
Outcome = tuple[str, grpc.StatusCode]


def tiny_request(rng: random.Random) -> pb.StylizeRequest:
    """32 px, 2-5 iterations, sometimes a preview every iteration (the preview path leaks too, if any)."""
    options = {"size": 32, "min_size": 32, "initial_iterations": rng.randint(2, 5)}
    preview = pb.PreviewOptions(every=1) if rng.random() < 0.3 else pb.PreviewOptions()
    return stylize_request(options, preview=preview)


def run_to_end(stub: Stub, request: pb.StylizeRequest, rng: random.Random, address: str) -> grpc.StatusCode:
    events, code = collect(stub.Stylize(request, timeout=120))
    assert code != grpc.StatusCode.OK or events[-1].HasField("completed")
    return code


def cancel_call(stub: Stub, request: pb.StylizeRequest, rng: random.Random, address: str) -> grpc.StatusCode:
    """Read 1-3 events, then cancel the call (the job is cancelled with it)."""
    call = stub.Stylize(request, timeout=120)
    for _ in range(rng.randint(1, 3)):
        next(call, None)
    call.cancel()
    return collect(call)[1]


def disconnect(stub: Stub, request: pb.StylizeRequest, rng: random.Random, address: str) -> grpc.StatusCode:
    """A client that goes away: its own connection, closed after 0-2 events without cancelling first."""
    channel = grpc.insecure_channel(address)
    call = Stub(channel).Stylize(request, timeout=120)
    for _ in range(rng.randint(0, 2)):
        next(call, None)
    channel.close()
    return collect(call)[1]


def submit_and_cancel(
    stub: Stub, request: pb.StylizeRequest, rng: random.Random, address: str
) -> grpc.StatusCode:
    """SubmitJob, wait 0-50 ms, CancelJob: the job ends cancelled, or succeeded if it was that quick."""
    job_id = stub.SubmitJob(request, timeout=30).job_id
    time.sleep(rng.uniform(0, 0.05))
    state = stub.CancelJob(pb.CancelJobRequest(job_id=job_id), timeout=30).state
    assert state in (pb.JOB_STATE_CANCELLED, pb.JOB_STATE_SUCCEEDED), pb.JobState.Name(state)
    return grpc.StatusCode.OK


def short_deadline(
    stub: Stub, request: pb.StylizeRequest, rng: random.Random, address: str
) -> grpc.StatusCode:
    return collect(stub.Stylize(request, timeout=rng.uniform(0.05, 0.3)))[1]


Action = Callable[[Stub, pb.StylizeRequest, random.Random, str], grpc.StatusCode]
# (action, weight, the codes its calls may end with)
ACTIONS: dict[str, tuple[Action, int, set[grpc.StatusCode]]] = {
    "run_to_end": (run_to_end, 40, {grpc.StatusCode.OK}),
    "cancel_call": (cancel_call, 20, {grpc.StatusCode.CANCELLED}),
    "disconnect": (disconnect, 15, {grpc.StatusCode.CANCELLED}),
    "submit_and_cancel": (submit_and_cancel, 15, {grpc.StatusCode.OK}),
    "short_deadline": (short_deadline, 10, {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED}),
}


def client(address: str, seed: int, jobs: int, outcomes: list[Outcome], errors: list[BaseException]) -> None:
    rng = random.Random(seed)
    names = list(ACTIONS)
    weights = [ACTIONS[name][1] for name in names]
    try:
        with grpc.insecure_channel(address) as channel:
            stub = Stub(channel)
            for _ in range(jobs):
                name = rng.choices(names, weights)[0]
                outcomes.append((name, ACTIONS[name][0](stub, tiny_request(rng), rng, address)))
    except BaseException as error:  # reported by the test's thread
        errors.append(error)


@pytest.fixture(scope="module")
def soak_server(model_dir) -> Iterator[ServerProcess]:
    with ServerProcess(
        model_dir, "--device", "cpu", "--workers", "1", "--max-queue", "64", "--grace-seconds", "5"
    ) as process:
        yield process


def idle_figures(server: ServerProcess, stub: Stub) -> tuple[int, int, float | None, float | None]:
    queue = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).queue
    samples = scrape(server.metrics_url)
    return (
        queue.depth,
        queue.running,
        sample(samples, "stylize_queue_depth"),
        sample(samples, "stylize_jobs_in_progress"),
    )


def test_a_soak_of_cancelled_disconnected_and_finished_jobs_leaves_an_idle_server_that_did_not_grow(
    soak_server,
) -> None:
    with grpc.insecure_channel(soak_server.address) as channel:
        stub = Stub(channel)
        warm_up = random.Random(0)
        for _ in range(WARM_UP_JOBS):
            assert run_to_end(stub, tiny_request(warm_up), warm_up, soak_server.address) == grpc.StatusCode.OK
        before = process_status(soak_server.process.pid)

        outcomes: list[Outcome] = []
        errors: list[BaseException] = []
        threads = [
            threading.Thread(
                target=client, args=(soak_server.address, seed, JOBS // CLIENTS, outcomes, errors)
            )
            for seed in range(CLIENTS)
        ]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=240)
        soak_seconds = time.monotonic() - began
        assert not any(thread.is_alive() for thread in threads), "a client hung"
        assert not errors, errors
        assert len(outcomes) == JOBS // CLIENTS * CLIENTS

        unexpected = [(name, code) for name, code in outcomes if code not in ACTIONS[name][2]]
        assert not unexpected, Counter(unexpected)
        tally = Counter(name for name, _ in outcomes)
        assert all(tally[name] > 0 for name in ACTIONS), tally  # every kind of ending was exercised

        deadline = time.monotonic() + SETTLE_SECONDS
        while (figures := idle_figures(soak_server, stub)) != (0, 0, 0, 0) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert figures == (0, 0, 0, 0), "depth, running, stylize_queue_depth, stylize_jobs_in_progress"

        jobs = {
            # A series appears with its first job of that status, reason and arch: absent means none.
            status: sample(scrape(soak_server.metrics_url), "stylize_jobs_total", status=status) or 0
            for status in ("succeeded", "failed", "cancelled")
        }
        assert jobs["failed"] == 0
        assert jobs["cancelled"] > 0 and jobs["succeeded"] > WARM_UP_JOBS

        after = process_status(soak_server.process.pid)
        growth = after.rss_bytes - before.rss_bytes
        print(
            f"soak: {len(outcomes)} jobs in {soak_seconds:.1f} s, {dict(tally)}; jobs {jobs}; RSS "
            f"{before.rss_bytes / 2**20:.0f} -> {after.rss_bytes / 2**20:.0f} MiB, threads {before.threads} "
            f"-> {after.threads}"
        )
        assert growth <= RSS_GROWTH_BOUND, f"RSS grew by {growth / 2**20:.0f} MiB"
        assert after.threads - before.threads <= THREAD_GROWTH_BOUND, (before.threads, after.threads)
        assert soak_server.health() == "SERVING"
