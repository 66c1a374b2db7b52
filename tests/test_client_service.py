"""StylizeClient and AsyncStylizeClient against the real server on localhost (fixture `server`)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from stylize.api.options import DEFAULTS
from stylize.client import (
    AsyncStylizeClient,
    Cancelled,
    Completed,
    DeadlineExceeded,
    InvalidArgument,
    JobState,
    NotFound,
    Progress,
    Queued,
    Started,
    StylizeClient,
)

SAMPLES = Path(__file__).resolve().parent.parent / "assets" / "samples"
CONTENT, STYLE = SAMPLES / "chelsea.png", SAMPLES / "coffee.png"
# One 64 px scale, a handful of iterations: seconds on a CPU.
SMALL = {"size": 64, "min_size": 64, "initial_iterations": 6}
# Long enough to be cancelled while it runs.
LONG = {"size": 64, "min_size": 64, "initial_iterations": 2000}


def check_job(events: list, preview_every: int) -> Completed:
    """The stream of a finished job: in order, complete, with previews where asked."""
    kinds = [type(event) for event in events]
    assert kinds[0] in (Queued, Started) and kinds[-1] is Completed
    assert Started in kinds
    assert [event.sequence for event in events] == list(
        range(events[0].sequence, events[0].sequence + len(events))
    )
    progress = [event for event in events if isinstance(event, Progress)]
    assert [p.iteration for p in progress] == list(range(1, 7))
    assert all(p.iterations_total == 6 and p.losses.total > 0 for p in progress)
    with_preview = [p.iteration for p in progress if p.preview is not None]
    assert with_preview == list(range(preview_every, 7, preview_every))
    assert max(progress[-1].preview_image().size) <= 64
    completed = events[-1]
    assert completed.iterations == 6
    assert max(completed.image().size) == 64
    assert len({event.job_id for event in events}) == 1
    return completed


def test_sync_client_completes_a_job(server, tmp_path) -> None:
    with StylizeClient(server.address) as client:
        events = list(client.stylize(CONTENT, [STYLE], preview_every=2, client_tag="sync", **SMALL))
    completed = check_job(events, preview_every=2)
    assert completed.client_tag == "sync"
    out = completed.save(tmp_path / "out.jpg")  # re-encoded: the result is PNG by default
    assert out.read_bytes()[:2] == b"\xff\xd8"


def test_async_client_completes_a_job(server) -> None:
    async def run() -> list:
        async with AsyncStylizeClient(server.address) as client:
            info = await client.server_info()
            assert info.version
            return [
                event async for event in client.stylize(CONTENT.read_bytes(), STYLE, preview_every=3, **SMALL)
            ]

    check_job(asyncio.run(run()), preview_every=3)


def test_server_info_reports_the_engine_defaults(server) -> None:
    with StylizeClient(server.address) as client:
        info = client.server_info()
    defaults = asdict(DEFAULTS)
    assert info.default_options.keys() == defaults.keys()
    for name, value in defaults.items():
        # Floats travel as float32 and come back as the shortest decimal of that float32 (0.02, 0.9).
        expected = pytest.approx(value, rel=1e-7) if isinstance(value, float) else value
        assert info.default_options[name] == expected, name
    assert info.default_options["learning_rate"] == DEFAULTS.learning_rate
    assert info.weights == "random"
    assert "relu4_2" in info.available_layers
    assert info.as_dict()["model"]["weights"] == "random"


def test_server_rejection_carries_field_violations(server) -> None:
    with StylizeClient(server.address) as client, pytest.raises(InvalidArgument) as caught:
        client.stylize(CONTENT, [STYLE], size=100_000).result()
    assert "options.size" in [violation.field for violation in caught.value.violations]


def test_submit_watch_and_cancel(server) -> None:
    with StylizeClient(server.address) as client:
        submission = client.submit(CONTENT, [(STYLE, 1.0)], preview_every=1, **LONG)
        watch = client.watch(submission.job_id)
        first_progress = next(event for event in watch if isinstance(event, Progress))
        assert first_progress.job_id == submission.job_id
        assert client.cancel(submission.job_id) is JobState.CANCELLED
        with pytest.raises(Cancelled):
            list(watch)
        assert client.cancel(submission.job_id) is JobState.CANCELLED  # idempotent
        with pytest.raises(NotFound):
            client.cancel("no-such-job")


def test_leaving_a_stream_early_cancels_its_job(server) -> None:
    with StylizeClient(server.address) as client:
        stream = client.stylize(CONTENT, [STYLE], **LONG)
        for event in stream:
            if isinstance(event, Progress):
                break
        stream.close()
        assert stream.job_id
        # Cancelled, the job ends at once; had it gone on, 2000 iterations would outlast the deadline.
        with pytest.raises(Cancelled):
            client.watch(stream.job_id, timeout=20).result()


def test_deadline_ends_a_long_job(server) -> None:
    with StylizeClient(server.address) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            client.stylize(CONTENT, [STYLE], timeout=1.5, **LONG).result()
        assert time.monotonic() - started < 10


def test_async_stream_cancel_raises_cancelled_and_stops_the_job(server) -> None:
    async def run() -> str:
        async with AsyncStylizeClient(server.address) as client:
            stream = client.stylize(CONTENT, [STYLE], **LONG)
            with pytest.raises(Cancelled):
                async for event in stream:
                    if isinstance(event, Progress):
                        stream.cancel()
            assert stream.job_id
            with pytest.raises(Cancelled):
                await client.watch(stream.job_id, timeout=20).result()
            return stream.job_id

    assert asyncio.run(run())
