"""The client installs without the server's dependencies: it imports and runs a job with every package of
the `server` extra made unimportable (torch, numpy, onnxruntime, ...), as in a venv holding only the base
dependencies."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The import names of the `server` extra's packages.
HEAVY = ("torch", "numpy", "onnxruntime", "onnx", "onnxscript", "prometheus_client", "grpc_health",
         "grpc_reflection", "pynvml")  # fmt: skip

# Runs in a fresh interpreter: a meta path finder refuses the heavy packages before anything imports them.
SCRIPT = """
import importlib.abc, json, sys

HEAVY = set(sys.argv[1].split(","))

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HEAVY:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
        return None

sys.meta_path.insert(0, Refuse())

import stylize.client.cli
from stylize.client import Completed, StylizeClient

with StylizeClient(sys.argv[2]) as client:
    info = client.server_info()
    stream = client.stylize(sys.argv[3], [sys.argv[4]], size=64, min_size=64, initial_iterations=3)
    completed = stream.result()
loaded = sorted(name for name in sys.modules if name.partition(".")[0] in HEAVY)
print(json.dumps({"loaded": loaded, "size": completed.image().size, "weights": info.weights}))
"""


def test_the_finder_really_hides_torch() -> None:
    script = SCRIPT.split("import stylize.client.cli")[0] + "import torch\n"
    result = subprocess.run([sys.executable, "-c", script, ",".join(HEAVY)], capture_output=True, text=True)
    assert result.returncode != 0 and "hidden by the test" in result.stderr


def test_client_works_without_torch_numpy_onnxruntime(server) -> None:
    samples = REPO / "assets" / "samples"
    command = [sys.executable, "-c", SCRIPT, ",".join(HEAVY), server.address,
               str(samples / "chelsea.png"), str(samples / "coffee.png")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report == {"loaded": [], "size": report["size"], "weights": "random"}
    assert max(report["size"]) == 64


def test_client_sources_import_no_heavy_package() -> None:
    """A static check as well, for code paths the job above does not reach."""
    for path in [*(REPO / "client").glob("*.py"), *(REPO / "examples").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not [n for n in names if n.partition(".")[0] in HEAVY], f"{path.name} imports {names}"
