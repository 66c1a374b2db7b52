"""Calling the service from your code (the README's example; tests/test_client_examples.py runs it).

STYLIZE_SERVER=127.0.0.1:50051 python examples/quickstart.py CONTENT STYLE OUT SIZE
"""

import sys

from stylize.client import Completed, Progress, StylizeClient

content, style, out, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with StylizeClient() as client:  # $STYLIZE_SERVER; or "host:port", ["ip:port", ...], "dns:///name:port"
    events = client.stylize(content, style, size=size, min_size=size, initial_iterations=20, preview_every=5)
    for event in events:
        if isinstance(event, Progress):
            print(f"{event.iteration}/{event.iterations_total} loss {event.losses.total:.4g}")
        elif isinstance(event, Completed):
            event.save(out)
            print(f"saved {out}: {event.width}x{event.height} in {event.run_seconds:.1f} s")
