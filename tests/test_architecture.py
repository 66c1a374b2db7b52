"""Who imports whom: the import graph of the source tree, read statically (every import statement, also those
inside functions), against the architecture the README describes.

- stylize.api: torch-free, imports no other package of ours but the generated protos' package;
- stylize.client: api, the protos and itself only, transitively, and no torch, numpy or ONNX;
- stylize.model: api only of ours; stylize.export: model and api; the two never reach the server;
- stylize.server: never the export step (the runtime reads the model); its engine knows nothing of gRPC.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = frozenset({"torch", "numpy", "onnx", "onnxruntime", "onnxscript"})


@cache
def modules() -> dict[str, Path]:
    """Every module of ours by its import name, from the package-dir mappings of both pyproject.toml files."""
    found: dict[str, Path] = {}
    for project in (ROOT, ROOT / "client"):  # the two distributions: stylize-server, stylize-client
        settings = tomllib.loads((project / "pyproject.toml").read_text())["tool"]["setuptools"]
        for package, folder in settings["package-dir"].items():
            directory = (project / folder).resolve()
            for path in sorted(directory.rglob("*.py")):
                parts = path.relative_to(directory).with_suffix("").parts
                found[".".join((package, *parts)).removesuffix(".__init__")] = path
    return found


@cache
def direct_imports(module: str) -> frozenset[str]:
    """What `module` imports: our modules by name, anything else by its top-level name."""
    path = modules()[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per dot after the first
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], base]).strip(".")
            names.add(base)
            names.update(
                f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules()
            )
    ours = {name for name in names if name in modules()}
    return frozenset(ours | {name.split(".")[0] for name in names - ours if not name.startswith("stylize")})


def reachable(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        for name in direct_imports(current) if current in modules() else ():
            if name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def under(prefix: str) -> list[str]:
    return [name for name in modules() if name == prefix or name.startswith(prefix + ".")]


def offenders(prefix: str, allowed: tuple[str, ...], *, transitive: bool, heavy: bool = False) -> dict:
    """{module: what it imports of ours outside `allowed` (and heavy packages, if `heavy`)}."""
    bad = {}
    for module in under(prefix):
        imported = reachable(module) if transitive else direct_imports(module)
        ours = {name for name in imported if name in modules() and not name.startswith(allowed)}
        outside = (imported & HEAVY) if heavy else set()
        if ours or outside:
            bad[module] = sorted(ours | outside)
    return bad


def test_the_tree_is_read_whole() -> None:
    expected = {"stylize.api.options", "stylize.client.cli", "stylize.model.vgg", "stylize.server.runtime"}
    assert expected <= set(modules())
    assert "stylize.server.config" in direct_imports("stylize.server.runtime")  # `from .config import`
    assert "stylize.api.schedule" in direct_imports("stylize.api.options")
    assert "torch" in direct_imports("stylize.model.vgg")


def test_the_client_reaches_only_the_api_and_the_protos_and_no_torch() -> None:
    allowed = ("stylize.client", "stylize.api", "stylize.v1")
    assert offenders("stylize.client", allowed, transitive=True, heavy=True) == {}


def test_the_api_is_torch_free_and_depends_on_nothing_of_ours() -> None:
    assert offenders("stylize.api", ("stylize.api", "stylize.v1"), transitive=True, heavy=True) == {}


@pytest.mark.parametrize(
    ("package", "allowed"),
    [
        ("stylize.model", ("stylize.model", "stylize.api")),
        ("stylize.export", ("stylize.export", "stylize.model", "stylize.api")),
        ("stylize.server", ("stylize.server", "stylize.model", "stylize.api", "stylize.v1")),
        ("stylize.server.engine", ("stylize.server.engine", "stylize.api", "stylize.model")),
    ],
)
def test_each_package_imports_only_what_the_layering_allows(package: str, allowed: tuple[str, ...]) -> None:
    assert offenders(package, allowed, transitive=True) == {}


def test_the_engine_knows_nothing_of_grpc() -> None:
    for module in under("stylize.server.engine"):
        assert not reachable(module) & {"grpc", "stylize.v1"}, module


def test_the_check_catches_a_forbidden_import(monkeypatch) -> None:
    """A client module that imported the server would be reported (the check is not vacuous)."""
    real = direct_imports.__wrapped__

    def with_a_leak(module: str) -> frozenset[str]:
        leak = {"stylize.server.runtime"} if module == "stylize.client.cli" else set()
        return real(module) | leak

    monkeypatch.setattr(sys.modules[__name__], "direct_imports", with_a_leak)
    allowed = ("stylize.client", "stylize.api", "stylize.v1")
    bad = offenders("stylize.client", allowed, transitive=True, heavy=True)
    assert "stylize.server.runtime" in bad["stylize.client.cli"] and "torch" in bad["stylize.client.cli"]
