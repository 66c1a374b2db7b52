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
    """The artifact in model_dir, exported first unless one is there; a random-weights artifact left by an
    earlier run is exported again unless random weights are asked for (real ones may be at hand now)."""
    manifest_path = model_dir / "vgg19.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("weights") != "random" or weights == "random":
            return manifest
    subprocess.run([BIN / "stylize-export", "--weights", weights, "--out", model_dir], check=True)
    return json.loads(manifest_path.read_text())


def wait_until_serving(address: str, deadline: float) -> None:
    """The server listens at once and reports SERVING on grpc.health.v1 once the parity probe passed."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise SystemExit(f"stylize-server at {address} did not become SERVING")


def start_server(model_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    """Start stylize-server on free ports, logging to log_path; return it and its address once it serves."""
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [BIN / "stylize-server", "--model-dir", model_dir, "--host", "127.0.0.1", "--port", "0",
             "--metrics-port", "0"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 300
    while server.poll() is None and time.monotonic() < deadline:
        match = LISTENING.search(log_path.read_text())
        if match:
            wait_until_serving(match.group(1), deadline)
            return server, match.group(1)
        time.sleep(0.2)
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
    output = args.out / "chelsea_hubble.png"
    try:
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
            check=False,
        ).check_returncode()
    except subprocess.CalledProcessError as error:
        raise SystemExit(  # noqa: B904 - one line for the user; the client already said why
            f"demo: the stylize client failed (exit {error.returncode}); server log: {args.out}/server.log"
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
