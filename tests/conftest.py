"""Shared fixtures: a random-weight model artifact and a real server on localhost (see serverproc.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

# pytest puts tests/ on sys.path (rootdir conftest, no __init__.py): test modules import serverproc too.
from serverproc import ServerProcess, export_random_model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VGG19 artifact with seeded random weights, exported once per test session."""
    return export_random_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="session")
def server(model_dir: Path) -> Iterator[ServerProcess]:
    """One real stylize-server (CPU, one worker) shared by the session; SERVING when handed out."""
    with ServerProcess(model_dir, "--device", "cpu", "--workers", "1", "--grace-seconds", "5") as process:
        yield process
