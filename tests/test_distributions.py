"""The two distributions as a caller and an operator get them: stylize-client (client/pyproject.toml) and
stylize-server (the root's pyproject.toml), built by `make dists` into $STYLIZE_DIST.

The client is installed into a fresh venv from those wheels alone (no index): it must bring no torch,
numpy or ONNX and no server commands, and its `stylize` command must work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from stylize.api import __version__

ROOT = Path(__file__).resolve().parent.parent
HEAVY = {"torch", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript"}


@pytest.fixture(scope="module")
def dist() -> Path:
    folder = Path(os.environ.get("STYLIZE_DIST", ROOT / ".cache" / "dist"))
    if not list(folder.glob("stylize_client-*.whl")):
        pytest.fail(f"no wheels in {folder}: run make dists (a step of make test)")
    return folder


def wheel(dist: Path, name: str) -> zipfile.ZipFile:
    return zipfile.ZipFile(dist / f"{name}-{__version__}-py3-none-any.whl")


def dist_info(archive: zipfile.ZipFile, file: str) -> str:
    (path,) = [n for n in archive.namelist() if n.endswith(f".dist-info/{file}")]
    return archive.read(path).decode()


def test_each_distribution_holds_its_own_packages_and_commands(dist: Path) -> None:
    client, server = wheel(dist, "stylize_client"), wheel(dist, "stylize_server")
    client_packages = {n.rsplit("/", 1)[0] for n in client.namelist() if n.endswith(".py")}
    server_packages = {n.rsplit("/", 1)[0] for n in server.namelist() if n.endswith(".py")}
    assert client_packages == {"stylize/api", "stylize/client", "stylize/v1"}
    assert server_packages == {
        "stylize/model",
        "stylize/export",
        "stylize/server",
        "stylize/server/engine",
        "stylize/server/broker",
    }
    assert "stylize = stylize.client.cli:main" in dist_info(client, "entry_points.txt")
    server_commands = dist_info(server, "entry_points.txt")
    assert "stylize-server = " in server_commands and "stylize-export = " in server_commands
    assert "stylize =" not in server_commands
    requires = Parser().parsestr(dist_info(server, "METADATA")).get_all("Requires-Dist")
    assert f"stylize-client=={__version__}" in requires and "torch==2.13.0" in requires


def test_the_server_distribution_requires_the_client_of_its_own_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert f"stylize-client=={__version__}" in project["dependencies"]


def test_the_client_installs_alone_in_a_fresh_venv_without_torch_or_server_commands(
    dist: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # The machine's pip.conf may name indexes: this install reads the wheels made by `make dists` only.
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    links = ["--no-index", "--find-links", str(dist), "--find-links", str(dist / "deps")]
    subprocess.run([*pip, "install", "-q", *links, "stylize-client"], check=True, env=env)

    listed = subprocess.run([*pip, "list", "--format=json"], check=True, env=env, capture_output=True)
    installed = {entry["name"].lower() for entry in json.loads(listed.stdout)}
    assert "stylize-client" in installed and "grpcio" in installed
    assert not installed & (HEAVY | {"stylize-server"})
    commands = {path.name for path in (venv / "bin").iterdir()}
    assert "stylize" in commands and not {"stylize-server", "stylize-export"} & commands

    # Outside the checkout, so nothing of it is importable but what the venv installed.
    helped = subprocess.run(
        [str(venv / "bin" / "stylize"), "--help"], cwd=tmp_path, capture_output=True, text=True
    )
    assert helped.returncode == 0 and "usage: stylize" in helped.stdout and "--preset" in helped.stdout
    probe = (
        "import stylize.client, stylize.api.wire\ntry:\n import stylize.server\nexcept ImportError: pass\n"
    )
    probe += "else: raise SystemExit('stylize.server is importable')"
    subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path, check=True)
