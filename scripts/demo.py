"""The main job end to end (`make demo`): export the model, start the server, stylize a
bundled sample through the `stylize` client, write the result and the previews, stop the server.

Every step runs the project's own console scripts, exactly as a user would.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "assets" / "samples"
BIN = Path(sys.executable).parent
LISTENING = re.compile(r"listening on (\S+:\d+)")


def export_model(weights: str, model_dir: Path) -> dict:
    manifest_path = model_dir / "vgg19.json"
    if not manifest_path.exists():
        subprocess.run([BIN / "stylize-export", "--weights", weights, "--out", model_dir], check=True)
    return json.loads(manifest_path.read_text())


def start_server(model_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    """Start stylize-server on free ports; return it and its address once it serves."""
    log = log_path.open("w")
    server = subprocess.Popen(
        [
            BIN / "stylize-server",
            "--model-dir",
            model_dir,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    for line in server.stdout:
        log.write(line)
        log.flush()
        match = LISTENING.search(line)
        if match:
            return server, match.group(1)
        if time.monotonic() > deadline:
            break
    server.kill()
    raise SystemExit(f"stylize-server did not start; see {log_path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="auto", help="weights for stylize-export (default: auto)")
    parser.add_argument("--model-dir", type=Path, default=REPO / "artifacts" / "model")
    parser.add_argument("--out", type=Path, default=REPO / "out")
    parser.add_argument("--size", type=int, default=256, help="longest edge of the output (default: 256)")
    args = parser.parse_args()

    manifest = export_model(args.weights, args.model_dir)
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    server, address = start_server(args.model_dir, args.out / "server.log")
    try:
        output = args.out / "chelsea_hubble.png"
        subprocess.run(
            [
                BIN / "stylize",
                SAMPLES / "chelsea.png",
                SAMPLES / "hubble_deep_field.jpg",
                "-o",
                output,
                "--server",
                address,
                "--size",
                str(args.size),
                "--previews",
                args.out / "previews",
                "--preview-every",
                "25",
            ],
            check=True,
        )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    print(f"wrote {output} and previews in {args.out / 'previews'}")
    if manifest.get("weights") == "random":
        print(
            "NOTE: the model has RANDOM weights (no pretrained VGG19 could be had): the picture only tests"
            " the plumbing, it is not style transfer. Use --weights imagenet where it can be downloaded."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
