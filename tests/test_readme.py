"""The README's code must be the code that the tests run."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_readme_quickstart_is_examples_quickstart() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Calling the service from your code", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    example = (REPO / "examples" / "quickstart.py").read_text()
    code = example.split('"""', 2)[2].lstrip("\n")  # without the module docstring
    assert block == code


def test_readme_set_up_commands_are_the_ones_ci_runs() -> None:
    readme = (REPO / "README.md").read_text()
    set_up = readme.split("## Set up", 1)[1].split("##", 1)[0]
    assert re.findall(r"^    (make \w+)", set_up, re.M) == ["make demo", "make test"]
    ci = [
        line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")
    ]
    assert ci[-1] == "make test"


def test_the_readme_documents_every_security_and_fleet_flag_of_the_server() -> None:
    from stylize.server.config import build_parser

    readme = (REPO / "README.md").read_text()
    flags = [action.option_strings[0] for action in build_parser()._actions if action.option_strings]
    wanted = [
        flag
        for flag in flags
        if flag.startswith(
            ("--tls", "--token", "--tenant", "--auth", "--health", "--reflection", "--metrics-host")
        )
        or flag in ("--broker", "--lease-seconds", "--max-attempts", "--max-connection-age-seconds")
    ]
    assert len(wanted) == 13
    assert [flag for flag in wanted if f"`{flag}" not in readme] == []
