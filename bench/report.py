"""How a benchmark hands over its figures: indented JSON on stdout, and the same in a file where asked."""

from __future__ import annotations

import json
from pathlib import Path


def print_report(report: object, out: Path | None = None) -> None:
    """`report` as indented JSON on stdout, and in `out` too when given."""
    text = json.dumps(report, indent=2)
    if out is not None:
        out.write_text(text + "\n")
    print(text)
