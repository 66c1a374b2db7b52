"""Regenerate the protobuf and gRPC Python code beside proto/stylize/v1/stylize.proto.

The generated files are committed so that the client installs without
grpcio-tools; tests/test_proto_sync.py fails when they drift from the .proto.

    python scripts/gen_proto.py            # rewrite the committed files
    python scripts/gen_proto.py --out DIR  # write them under DIR instead
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"
PROTO_FILES = ("stylize/v1/stylize.proto",)


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> None:
    """Run protoc (from grpcio-tools) on the API's .proto files into out_dir."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    for proto in PROTO_FILES:
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{proto_root}",
                f"-I{well_known}",
                f"--python_out={out_dir}",
                f"--pyi_out={out_dir}",
                f"--grpc_python_out={out_dir}",
                str(proto_root / proto),
            ]
        )
        if code != 0:
            raise RuntimeError(f"protoc failed on {proto} (exit {code})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output root (default: proto/)")
    args = parser.parse_args(argv)
    generate(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
