"""Relay the previews of stylize jobs to HTTP clients as server-sent events (SSE).

The "streaming previews to other services" case: a web page cannot speak gRPC, but it can open an
EventSource. This relay follows a job with WatchJob and re-publishes every event it gets as one SSE
event, previews included (base64 data URLs a page can put straight into an <img>).

    stylize-server --model-dir models/vgg19 &                        # the stylize service
    python examples/relay.py --server 127.0.0.1:50051 --port 8080 &  # this relay
    JOB=$(stylize --submit content.jpg style.jpg --preview-every 10)
    curl -N http://127.0.0.1:8080/jobs/$JOB/events                   # the raw event stream
    xdg-open http://127.0.0.1:8080/jobs/$JOB                         # a page showing the previews

GET /jobs/ID/events streams `queued`, `started`, `progress` and `completed` events, each with a JSON
`data` line (`progress.preview` and `completed.image` are {format, width, height, url}), and ends
after `completed`, or after an `error` event carrying the job's failure. GET /jobs/ID serves the page.

Design: each HTTP subscriber gets its own WatchJob call. The server already fans one job out to any
number of watchers and starts a late watcher from the latest preview, so the relay keeps no state
and a subscriber that drops only ends its own watch (never the job). One thread per subscriber
(stdlib ThreadingHTTPServer) suits tens of viewers; for thousands use an asyncio server with
AsyncStylizeClient. The relay binds 127.0.0.1 by default; put it behind your own auth before
exposing it.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import html
import json
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from stylize.client import (
    Completed,
    EncodedImage,
    Event,
    Progress,
    Queued,
    Started,
    StylizeClient,
    StylizeError,
)

_EVENTS_PATH = re.compile(r"^/jobs/([\w.-]+)/events$")
_PAGE_PATH = re.compile(r"^/jobs/([\w.-]+)/?$")
_MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

PAGE = """<!doctype html>
<meta charset="utf-8"><title>stylize job {job}</title>
<p id="status">connecting…</p><img id="preview" alt="">
<script>
const source = new EventSource("/jobs/{job}/events");
const status = document.getElementById("status"), img = document.getElementById("preview");
source.addEventListener("started", e => status.textContent = "running on " + JSON.parse(e.data).device);
source.addEventListener("progress", e => {{
  const p = JSON.parse(e.data);
  status.textContent = `iteration ${{p.iteration}}/${{p.iterations_total}}`
    + `, loss ${{p.losses.total.toPrecision(4)}}`;
  if (p.preview) img.src = p.preview.url;
}});
source.addEventListener("completed", e => {{
  img.src = JSON.parse(e.data).image.url; status.textContent = "done"; source.close();
}});
source.addEventListener("error", e => {{
  status.textContent = e.data ? "failed: " + JSON.parse(e.data).message : "connection lost"; source.close();
}});
</script>
"""


def _image(image: EncodedImage) -> dict[str, Any]:
    url = f"data:{_MIME[image.format]};base64,{base64.b64encode(image.data).decode('ascii')}"
    return {"format": image.format, "width": image.width, "height": image.height, "url": url}


def sse_payload(event: Event) -> dict[str, Any]:
    """The JSON data of one SSE event."""
    payload: dict[str, Any] = {"job_id": event.job_id, "sequence": event.sequence}
    if isinstance(event, Queued):
        payload["position"] = event.position
    elif isinstance(event, Started):
        payload.update(device=event.device, iterations_total=event.iterations_total)
    elif isinstance(event, Progress):
        payload.update(
            iteration=event.iteration,
            iterations_total=event.iterations_total,
            eta_seconds=event.eta_seconds,
            losses=vars(event.losses),
            preview=_image(event.preview) if event.preview else None,
        )
    elif isinstance(event, Completed):
        payload.update(iterations=event.iterations, losses=vars(event.losses), image=_image(event.output))
    return payload


def sse_message(kind: str, data: dict[str, Any], event_id: int | None = None) -> bytes:
    lines = [f"event: {kind}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append(f"data: {json.dumps(data)}")
    return ("\n".join(lines) + "\n\n").encode("utf-8")


class RelayHandler(BaseHTTPRequestHandler):
    """Serves the page and the event streams; `server.client` is the shared StylizeClient."""

    server: RelayServer

    def do_GET(self) -> None:
        if match := _EVENTS_PATH.match(self.path):
            self._relay(match.group(1))
        elif match := _PAGE_PATH.match(self.path):
            body = PAGE.format(job=html.escape(match.group(1))).encode("utf-8")
            self._respond(200, "text/html; charset=utf-8", body)
        else:
            self._respond(404, "text/plain", b"try /jobs/JOB_ID or /jobs/JOB_ID/events\n")

    def _respond(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _relay(self, job_id: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        stream = self.server.client.watch(job_id)
        try:
            for event in stream:
                self.wfile.write(sse_message(event.kind, sse_payload(event), event.sequence))
                self.wfile.flush()
        except StylizeError as error:
            failure = {"job_id": job_id, "error": type(error).__name__, "message": str(error)}
            self.wfile.write(sse_message("error", failure))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the subscriber left; closing the stream below ends only our watch
        finally:
            stream.close()

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"relay: {self.address_string()} {format % args}\n")


class RelayServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], client: StylizeClient):
        super().__init__(address, RelayHandler)
        self.client = client


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Relay stylize job events to HTTP clients as SSE.")
    parser.add_argument("--server", help="stylize server target (default: $STYLIZE_SERVER, 127.0.0.1:50051)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on; 0 picks a free one")
    args = parser.parse_args(argv)
    with StylizeClient(args.server) as client, RelayServer((args.host, args.port), client) as relay:
        host, port = relay.server_address[:2]
        print(f"relay listening on http://{host}:{port}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            relay.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
