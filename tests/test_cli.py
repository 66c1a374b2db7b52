"""The `stylize` command as a user runs it: a subprocess against the real server (fixture `server`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from serverproc import ServerProcess

from stylize.client import Cancelled, StylizeClient
from stylize.client.cli import _settings, build_parser
from stylize.client.options import STYLE_OPTIONS

SAMPLES = Path(__file__).resolve().parent.parent / "assets" / "samples"
CONTENT, STYLE = str(SAMPLES / "chelsea.png"), str(SAMPLES / "coffee.png")
SMALL = ["--size", "64", "--min-size", "64", "--initial-iterations", "6"]
STYLIZE = [str(Path(sys.executable).with_name("stylize"))]


def stylize(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STYLIZE_SERVER": ""}
    return subprocess.run([*STYLIZE, *args], capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *fragments: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stylize: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_help_shows_every_engine_option_with_its_default() -> None:
    text = " ".join(build_parser().format_help().split())
    for spec in STYLE_OPTIONS.values():
        assert f"--{spec.name.replace('_', '-')}" in text
        assert f"(default: {spec.format_default()})" in text
    assert "--size N longest edge of the output image in pixels (default: 512)" in text


def test_preset_is_fast_preview_unless_told_otherwise() -> None:
    parse = build_parser().parse_intermixed_args
    assert _settings(parse([CONTENT, STYLE, "-o", "o.png"]))["preset"] == "fast-preview"
    assert _settings(parse([CONTENT, STYLE, "-o", "o.png", "--preset", "gatys2016"]))["preset"] == "gatys2016"
    assert "preset" not in _settings(parse([CONTENT, STYLE, "-o", "o.png", "--preset", "none"]))


def test_unknown_preset_exits_2_naming_the_valid_ones(tmp_path) -> None:
    result = stylize(CONTENT, STYLE, "-o", str(tmp_path / "o.png"), "--preset", "fast", "--server",
                     f"127.0.0.1:{free_port()}")  # fmt: skip
    assert_one_line_error(
        result, 2, "preset: unknown preset 'fast'; valid: gatys2016", "fast-preview quality"
    )


def test_run_writes_the_output_and_the_previews_and_shows_progress(server, tmp_path) -> None:
    out, previews = tmp_path / "out.webp", tmp_path / "previews"
    result = stylize(CONTENT, STYLE, "-o", str(out), "--previews", str(previews), "--preview-every", "2",
                     "--server", server.address, *SMALL)  # fmt: skip
    assert result.returncode == 0, result.stderr
    with Image.open(out) as image:
        assert image.format == "WEBP" and max(image.size) == 64
    assert sorted(p.name for p in previews.iterdir()) == [f"preview_{i:05d}.jpg" for i in (2, 4, 6)]
    assert "6/6" in result.stderr and "loss" in result.stderr and "ETA" in result.stderr
    assert f"wrote {out}" in result.stderr


def test_json_lines_parse(server, tmp_path) -> None:
    out = tmp_path / "out.png"
    result = stylize(CONTENT, STYLE, "-o", str(out), "--json", "--preview-every", "3",
                     "--server", server.address, *SMALL)  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    kinds = [record["event"] for record in records]
    assert "started" in kinds and kinds[-1] == "completed"
    progress = [record for record in records if record["event"] == "progress"]
    assert [record["iteration"] for record in progress] == [1, 2, 3, 4, 5, 6]
    assert [record["preview"] is not None for record in progress] == [False, False, True, False, False, True]
    assert set(progress[0]["losses"]) == {"total", "content", "style", "total_variation"}
    assert records[-1]["output"]["path"] == str(out) and out.is_file()
    assert result.stderr == ""  # no progress bar in JSON mode


def test_missing_file_exits_2(server, tmp_path) -> None:
    result = stylize(
        CONTENT, str(tmp_path / "nope.png"), "-o", str(tmp_path / "o.png"), "--server", server.address
    )
    assert_one_line_error(result, 2, "styles[0].image", "no such file")


def test_bad_option_exits_2_naming_the_field(server, tmp_path) -> None:
    result = stylize(
        CONTENT, STYLE, "-o", str(tmp_path / "o.png"), "--server", server.address, "--size", "99999"
    )
    assert_one_line_error(result, 2, "options.size")
    result = stylize(CONTENT, STYLE, "-o", str(tmp_path / "o.gif"), "--server", server.address)
    assert_one_line_error(result, 2, ".png")
    assert_one_line_error(stylize("--size", "big"), 2, "--size")


def test_unreachable_server_exits_3_quickly(tmp_path) -> None:
    started = time.monotonic()
    result = stylize(CONTENT, STYLE, "-o", str(tmp_path / "o.png"), "--server", f"127.0.0.1:{free_port()}",
                     "--timeout", "5")  # fmt: skip
    assert_one_line_error(result, 3, "server unavailable")
    assert time.monotonic() - started < 10


def test_cancelled_job_exits_4(server, tmp_path) -> None:
    command = [*STYLIZE, CONTENT, STYLE, "-o", str(tmp_path / "o.png"), "--json", "--server", server.address,
               "--size", "64", "--min-size", "64", "--initial-iterations", "2000"]  # fmt: skip
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        for line in process.stdout:
            record = json.loads(line)
            if record["event"] == "progress":
                break
        with StylizeClient(server.address) as client:
            client.cancel(record["job_id"])
        stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 4, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    assert json.loads(stdout.splitlines()[-1])["error"] == "Cancelled"


def test_submit_then_watch_then_info(server, tmp_path) -> None:
    submitted = stylize(CONTENT, STYLE, "--submit", "--server", server.address, *SMALL)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    out = tmp_path / "watched.png"
    watched = stylize("--watch", job_id, "-o", str(out), "--server", server.address, "-q")
    assert watched.returncode == 0, watched.stderr
    assert Image.open(out).size[0] == 64 or Image.open(out).size[1] == 64
    info = stylize("--info", "--json", "--server", server.address)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["model"]["weights"] == "random"
    assert_one_line_error(stylize("--cancel", "no-such-job", "--server", server.address), 2)


def test_interrupt_cancels_the_job_and_exits_130(server, tmp_path) -> None:
    command = [*STYLIZE, CONTENT, STYLE, "-o", str(tmp_path / "o.png"), "--json", "--server", server.address,
               "--size", "64", "--min-size", "64", "--initial-iterations", "2000"]  # fmt: skip
    # A shell that starts the suite in the background makes its children ignore SIGINT, and Python keeps an
    # ignored SIGINT ignored: the CLI gets the default disposition back, as it has at a terminal.
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    ) as process:
        assert process.stdout is not None
        record = next(json.loads(line) for line in process.stdout if json.loads(line)["event"] == "progress")
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and f"job {record['job_id']} cancelled" in stderr
    with StylizeClient(server.address) as client, pytest.raises(Cancelled):
        client.watch(record["job_id"], timeout=20).result()


# oneDNN's and ATen's documented switches: this process's CPU acts as one with AVX2 and no bf16.
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def test_on_a_cpu_without_bf16_the_default_job_runs_fp32_and_forced_bf16_warns(model_dir, tmp_path) -> None:
    with ServerProcess(model_dir, "--device", "cpu", env=AVX2_ONLY) as avx2:
        default = stylize(CONTENT, STYLE, "-o", str(tmp_path / "a.png"), "--server", avx2.address, *SMALL)
        assert default.returncode == 0, default.stderr
        assert "on cpu (fp32)" in default.stderr and "warning" not in default.stderr
        forced = stylize(CONTENT, STYLE, "-o", str(tmp_path / "b.png"), "--precision", "bf16",
                         "--server", avx2.address, *SMALL)  # fmt: skip
        assert forced.returncode == 0, forced.stderr
        assert "stylize: warning: bf16 requested on cpu, which has no bf16 hardware" in forced.stderr
        assert "on cpu (bf16)" in forced.stderr
