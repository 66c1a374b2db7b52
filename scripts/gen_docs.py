"""Render the options table in README.md from the proto's comments and the engine's defaults.

The proto documents each option; api/options.py holds each default.
This script writes both into README.md between the `options-table` markers, and
tests/test_options.py fails when the README is stale.

    python scripts/gen_docs.py          # rewrite the table in README.md
"""

from __future__ import annotations

import re
import sys
from dataclasses import fields
from enum import StrEnum
from pathlib import Path

from stylize.api.options import DEFAULT_PREVIEW, DEFAULTS

REPO = Path(__file__).resolve().parent.parent
PROTO = REPO / "proto" / "stylize" / "v1" / "stylize.proto"
README = REPO / "README.md"
BEGIN, END = "<!-- options-table:begin -->", "<!-- options-table:end -->"
_FIELD = re.compile(r"^\s*(?:optional\s+|repeated\s+)?[\w.]+\s+(\w+)\s*=\s*\d+;")


def field_comments(message: str) -> dict[str, str]:
    """Field name -> the comment block above that field in `message` of the .proto, joined into one line."""
    body = PROTO.read_text().split(f"message {message} {{", 1)[1].split("\n}", 1)[0]
    comments: dict[str, str] = {}
    block: list[str] = []
    for line in body.splitlines():
        stripped = line.strip()
        if stripped.startswith("//"):
            block.append(stripped.lstrip("/ "))
            continue
        match = _FIELD.match(line)
        if match:
            comments[match.group(1)] = " ".join(block)
        block = []
    return comments


def _format_default(value: object) -> str:
    if isinstance(value, StrEnum):
        return value.name
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, tuple):
        return ", ".join(f"{name} ({weight:g})" for name, weight in value)
    return str(value)


def options_table() -> str:
    rows = ["| option | default | meaning |", "| --- | --- | --- |"]
    for message, defaults, prefix in (
        ("StyleOptions", DEFAULTS, ""),
        ("PreviewOptions", DEFAULT_PREVIEW, "preview."),
    ):
        comments = field_comments(message)
        for f in fields(defaults):
            meaning = comments[f.name].split("Default:", 1)[0].strip()
            rows.append(f"| `{prefix}{f.name}` | {_format_default(getattr(defaults, f.name))} | {meaning} |")
    return "\n".join(rows)


def render_readme(text: str) -> str:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{options_table()}\n{END}{tail}"


def main() -> int:
    README.write_text(render_readme(README.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
