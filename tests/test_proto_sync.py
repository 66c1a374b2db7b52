"""The committed generated code must be exactly what protoc makes of the .proto."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gen_proto", REPO / "scripts" / "gen_proto.py")
gen_proto = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_proto)

GENERATED = ("stylize_pb2.py", "stylize_pb2.pyi", "stylize_pb2_grpc.py")


def _stale_files(proto_root: Path, committed_dir: Path, out: Path) -> list[str]:
    """Names of generated files that differ from a fresh protoc run over proto_root."""
    gen_proto.generate(out, proto_root)
    return [
        name
        for name in GENERATED
        if (out / "stylize" / "v1" / name).read_bytes() != (committed_dir / name).read_bytes()
    ]


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    stale = _stale_files(gen_proto.PROTO_ROOT, REPO / "proto" / "stylize" / "v1", tmp_path)
    assert not stale, f"out of date: {stale}; run `python scripts/gen_proto.py`"


def test_check_detects_a_field_added_without_regenerating(tmp_path: Path) -> None:
    edited_root = tmp_path / "proto"
    shutil.copytree(REPO / "proto", edited_root)
    proto = edited_root / "stylize" / "v1" / "stylize.proto"
    text = proto.read_text()
    proto.write_text(
        text.replace("message WatchJobRequest {", "message WatchJobRequest {\n  bool added = 9;", 1)
    )
    stale = _stale_files(edited_root, REPO / "proto" / "stylize" / "v1", tmp_path / "out")
    assert {"stylize_pb2.py", "stylize_pb2.pyi"} <= set(stale)


@pytest.mark.parametrize("module", ["stylize.v1.stylize_pb2", "stylize.v1.stylize_pb2_grpc"])
def test_generated_modules_import(module: str) -> None:
    __import__(module)
    assert module in sys.modules
