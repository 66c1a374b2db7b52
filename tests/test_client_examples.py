"""examples/: the README's quickstart runs as written, and the SSE relay delivers a real job's previews."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from stylize.client import StylizeClient

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "assets" / "samples"
CONTENT, STYLE = SAMPLES / "chelsea.png", SAMPLES / "coffee.png"


def test_quickstart_runs_as_written(server, tmp_path) -> None:
    out = tmp_path / "out.png"
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "quickstart.py"), str(CONTENT), str(STYLE), str(out), "64"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "STYLIZE_SERVER": server.address},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"1/20 loss \S+", lines[0]) and lines[-2].startswith("20/20 loss ")
    assert lines[-1].startswith(f"saved {out}: ")
    assert max(Image.open(out).size) == 64


@pytest.fixture
def relay(server) -> Iterator[tuple[str, int]]:
    """examples/relay.py as a process on a free port, pointed at the test server."""
    command = [sys.executable, str(REPO / "examples" / "relay.py"), "--server", server.address, "--port", "0"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as process:
        try:
            line = process.stdout.readline()
            match = re.fullmatch(r"relay listening on http://(\S+):(\d+)\n", line)
            assert match, line
            yield match.group(1), int(match.group(2))
        finally:
            process.terminate()
            process.wait(timeout=10)


def read_sse(response: http.client.HTTPResponse) -> Iterator[tuple[str, dict]]:
    """(event, data) pairs of a server-sent event stream, until it ends."""
    kind, data = None, None
    for raw in response:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data = json.loads(line.removeprefix("data: "))
        elif line == "" and kind is not None:
            yield kind, data
            kind, data = None, None


def test_relay_delivers_the_previews_of_a_job(server, relay) -> None:
    host, port = relay
    with StylizeClient(server.address) as client:
        job = client.submit(CONTENT, [STYLE], size=64, min_size=64, initial_iterations=40, preview_every=4)
    connection = http.client.HTTPConnection(host, port, timeout=60)
    connection.request("GET", f"/jobs/{job.job_id}/events")
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
    events = list(read_sse(response))
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "completed", kinds
    previews = [data for kind, data in events if kind == "progress" and data["preview"]]
    # A late subscriber starts from the latest progress; the rest of the job's previews follow.
    assert len(previews) >= 3
    assert all(data["iteration"] % 4 == 0 and data["job_id"] == job.job_id for data in previews)
    header, _, encoded = previews[-1]["preview"]["url"].partition(",")
    assert header == "data:image/jpeg;base64"
    assert Image.open(io.BytesIO(base64.b64decode(encoded))).format == "JPEG"
    final = events[-1][1]["image"]
    assert final["url"].startswith("data:image/png;base64,") and max(final["width"], final["height"]) == 64
    connection.close()


def test_relay_page_and_unknown_paths(relay) -> None:
    host, port = relay
    connection = http.client.HTTPConnection(host, port, timeout=10)
    connection.request("GET", "/jobs/abc")
    page = connection.getresponse()
    assert page.status == 200 and b'new EventSource("/jobs/abc/events")' in page.read()
    connection.request("GET", "/elsewhere")
    assert connection.getresponse().status == 404
    connection.close()


def test_relay_reports_an_unknown_job_as_an_error_event(relay) -> None:
    host, port = relay
    connection = http.client.HTTPConnection(host, port, timeout=10)
    connection.request("GET", "/jobs/no-such-job/events")
    events = list(read_sse(connection.getresponse()))
    assert [kind for kind, _ in events] == ["error"] and events[0][1]["error"] == "NotFound"
    connection.close()
