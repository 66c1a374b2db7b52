"""`stylize`: run, queue, follow and cancel style-transfer jobs from a shell.

    stylize CONTENT STYLE [STYLE ...] -o OUT [--previews DIR] [--size 512 ...]   run a job
    stylize --submit CONTENT STYLE [STYLE ...] [options]                          queue it, print its id
    stylize --watch JOB_ID [-o OUT] [--previews DIR]                              follow a job
    stylize --cancel JOB_ID                                                       cancel a job
    stylize --info                                                                the server's info

The engine's options are flags generated from stylize.client.options (so from the engine's own
defaults, shown in --help); unset flags are not sent. `--preset NAME` names the recipe that fills
every option not given as a flag; it is fast-preview unless said otherwise (an interactive caller
wants a picture soon), and `--preset none` leaves the unset options to the server's defaults, the
ones --help shows. `--json` prints one JSON object per event on stdout for scripts instead of the
progress bar.

Exit codes: 0 success; 2 bad usage or input (a missing file, a bad option, an unknown job id);
3 server unavailable or overloaded; 4 the job failed, was cancelled or ran out of time; 130
interrupted. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn, TextIO

from tqdm import tqdm

from stylize.api.options import one_line
from stylize.api.presets import INTERACTIVE_PRESET, PRESETS
from stylize.client.channel import DEFAULT_TARGET, SERVER_ENV, TOKEN_ENV, tls_credentials
from stylize.client.client import EventStream, StylizeClient
from stylize.client.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    JobFailed,
    NotFound,
    ResourceExhausted,
    StylizeError,
    Unavailable,
)
from stylize.client.events import Completed, EncodedImage, Event, Progress, Queued, Started
from stylize.client.options import PREVIEW_OPTIONS, STYLE_OPTIONS, OptionSpec

EXIT_OK, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_JOB, EXIT_INTERRUPTED = 0, 2, 3, 4, 130
EXIT_CODES: dict[type[StylizeError], int] = {
    InvalidArgument: EXIT_USAGE,
    NotFound: EXIT_USAGE,
    Unavailable: EXIT_UNAVAILABLE,
    ResourceExhausted: EXIT_UNAVAILABLE,
    Cancelled: EXIT_JOB,
    DeadlineExceeded: EXIT_JOB,
    JobFailed: EXIT_JOB,
}
# How often previews are asked for when --previews is given without --preview-every.
PREVIEW_EVERY_WITH_DIR = 10
OUTPUT_SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
# `--preset none`: no preset, the server's defaults.
NO_PRESET = "none"


class UsageError(Exception):
    """Bad command-line usage found after parsing; exits 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see stylize --help)")


def _add_option_flags(group: argparse._ArgumentGroup, specs: dict[str, OptionSpec], prefix: str) -> None:
    """One flag per option, typed from its default, with the default and choices in the help."""
    for spec in specs.values():
        flag = "--" + (prefix + spec.name).replace("_", "-")
        text = f"{spec.help} (default: {spec.format_default()})"
        dest = prefix + spec.name
        if spec.kind is tuple:
            group.add_argument(flag, dest=dest, nargs="+", metavar="LAYER[:WEIGHT]", help=text)
        elif spec.choices:
            group.add_argument(flag, dest=dest, type=str.lower, choices=spec.choices, help=text)
        else:
            metavar = "N" if spec.kind is int else "X"
            group.add_argument(flag, dest=dest, type=spec.kind, metavar=metavar, help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="stylize",
        description="Neural style transfer on a stylize server: run, queue, follow and cancel jobs.",
        epilog="Exit codes: 0 ok, 2 bad usage or input, 3 server unavailable, 4 job failed or cancelled.",
    )
    parser.add_argument("content", nargs="?", help="content image (PNG, JPEG, WebP or anything PIL reads)")
    parser.add_argument("styles", nargs="*", metavar="style", help="one or more style images")
    parser.add_argument("-o", "--output", type=Path, help="where to write the result (.png, .jpg or .webp)")
    parser.add_argument("--blend", nargs="+", type=float, metavar="W", help="relative weights of the styles")
    parser.add_argument(
        "--previews", type=Path, metavar="DIR", help=f"write previews here (every {PREVIEW_EVERY_WITH_DIR} "
        "iterations unless --preview-every says otherwise)"
    )  # fmt: skip
    actions = parser.add_mutually_exclusive_group()
    actions.add_argument("--submit", action="store_true", help="queue the job, print its id and exit")
    actions.add_argument("--watch", metavar="JOB_ID", help="follow a job started elsewhere")
    actions.add_argument("--cancel", metavar="JOB_ID", help="cancel a job")
    actions.add_argument("--info", action="store_true", help="print the server's info as JSON")
    parser.add_argument(
        "--server", action="append", metavar="TARGET",
        help=f"host:port, dns:///name:port, or several IP:PORT (repeat or comma-separate) for round-robin; "
        f"default ${SERVER_ENV} or {DEFAULT_TARGET}",
    )  # fmt: skip
    security = parser.add_argument_group("security")
    security.add_argument(
        "--token", help=f"bearer token sent with every call (default ${TOKEN_ENV}); prefer the variable"
    )
    security.add_argument("--watch-token", default="", help="with --watch: the job's watch token")
    security.add_argument("--tls", action="store_true", help="TLS with the system's roots")
    security.add_argument("--tls-ca", type=Path, metavar="PEM", help="TLS, trusting this CA bundle")
    security.add_argument("--tls-cert", type=Path, metavar="PEM", help="client certificate (mutual TLS)")
    security.add_argument("--tls-key", type=Path, metavar="PEM", help="key of --tls-cert")
    security.add_argument(
        "--tls-server-name", metavar="NAME", help="the name the server's certificate carries, if not the host"
    )
    parser.add_argument("--timeout", type=float, metavar="SECONDS", help="deadline of the whole call")
    parser.add_argument("--tag", default="", help="client tag echoed in events and server logs")
    parser.add_argument("--json", action="store_true", help="JSON lines on stdout instead of a progress bar")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--preset", default=INTERACTIVE_PRESET, metavar="NAME",
        help=f"recipe filling every option not given below: {', '.join(PRESETS)}, or {NO_PRESET} for the "
        f"server's defaults (default: %(default)s)",
    )  # fmt: skip
    engine_options = parser.add_argument_group(
        "engine options", f"Unset options take the --preset's values; the defaults shown are the server's, "
        f"which apply with --preset {NO_PRESET}.",
    )  # fmt: skip
    _add_option_flags(engine_options, STYLE_OPTIONS, "")
    _add_option_flags(parser.add_argument_group("preview options"), PREVIEW_OPTIONS, "preview_")
    return parser


@dataclass
class Outputs:
    """Where a job's images go; checked before the job starts so a typo does not waste a job."""

    output: Path | None
    previews: Path | None

    def check(self) -> None:
        if self.output is not None:
            if self.output.suffix.lower() not in OUTPUT_SUFFIXES:
                raise UsageError(f"-o {self.output}: the name must end in {', '.join(OUTPUT_SUFFIXES)}")
            if not self.output.parent.is_dir():
                raise UsageError(f"-o {self.output}: no such directory {self.output.parent}")
        if self.previews is not None:
            try:
                self.previews.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise UsageError(f"--previews {self.previews}: {error.strerror or error}") from None

    def save_preview(self, event: Progress) -> Path | None:
        if self.previews is None or event.preview is None:
            return None
        return event.preview.save(self.previews / f"preview_{event.iteration:05d}{event.preview.suffix}")


def _image_record(image: EncodedImage, path: Path | None) -> dict[str, Any]:
    return {"path": str(path) if path else None, "format": image.format, "width": image.width,
            "height": image.height, "bytes": len(image.data)}  # fmt: skip


def event_record(event: Event, path: Path | None = None) -> dict[str, Any]:
    """A JSON-ready record of an event; images become their metadata and the file written, if any."""
    record: dict[str, Any] = {"event": event.kind}
    for name, value in asdict(event).items():
        record[name] = list(value) if isinstance(value, tuple) else value
    if isinstance(event, Progress):
        record["preview"] = None if event.preview is None else _image_record(event.preview, path)
    if isinstance(event, Completed):
        record["output"] = _image_record(event.output, path)
    return record


class ProgressBar:
    """A tqdm bar over a job's iterations, with the losses and the server's ETA.

    Drawn from the first event on, so a call that fails before its job exists prints only its error."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        self._bar: tqdm | None = None

    def _drawn(self) -> tqdm:
        if self._bar is None:
            self._bar = tqdm(
                total=None,
                unit="it",
                file=self._stream,
                dynamic_ncols=True,
                desc="waiting",
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
            )
        return self._bar

    def show(self, event: Event) -> None:
        bar = self._drawn()
        if isinstance(event, Queued):
            bar.set_description_str(f"queued ({event.position} ahead)")
        elif isinstance(event, Started):
            bar.reset(total=event.iterations_total)
            bar.set_description_str(f"{event.job_id[:8]} on {event.device} ({event.precision})")
        elif isinstance(event, Progress):
            losses = event.losses
            bar.set_postfix_str(
                f"loss {losses.total:.4g} (content {losses.content:.3g}, style {losses.style:.3g}, "
                f"tv {losses.total_variation:.3g}), ETA {event.eta_seconds:.0f}s, "
                f"scale {event.scale + 1}/{event.scales} {event.width}x{event.height}",
                refresh=False,
            )
            bar.update(event.iteration - bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def follow(stream: EventStream, outputs: Outputs, *, as_json: bool, bar: ProgressBar | None) -> Completed:
    """Print and save a job's events as they arrive; returns the Completed event."""
    completed: Completed | None = None
    for event in stream:
        path: Path | None = None
        if isinstance(event, Progress):
            path = outputs.save_preview(event)
        elif isinstance(event, Started):
            for warning in event.warnings:
                tqdm.write(f"stylize: warning: {warning}", file=sys.stderr)
        elif isinstance(event, Completed):
            completed = event
            path = event.save(outputs.output) if outputs.output else None
        if bar is not None:
            bar.show(event)
        if as_json:
            print(json.dumps(event_record(event, path)), flush=True)
    if completed is None:
        raise JobFailed("the job's stream ended without a result")
    return completed


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """Only the options given on the command line; the server fills in the rest."""
    settings: dict[str, Any] = {name: getattr(args, name) for name in STYLE_OPTIONS}
    settings.update({f"preview_{name}": getattr(args, f"preview_{name}") for name in PREVIEW_OPTIONS})
    if args.previews is not None and settings["preview_every"] is None:
        settings["preview_every"] = PREVIEW_EVERY_WITH_DIR
    if args.output is not None:
        settings["output_format"] = OUTPUT_SUFFIXES.get(args.output.suffix.lower())
    settings["client_tag"] = args.tag
    settings["preset"] = None if args.preset == NO_PRESET else args.preset
    return {name: value for name, value in settings.items() if value is not None}


def _styles(args: argparse.Namespace) -> list[Any]:
    if not args.styles:
        raise UsageError("at least one style image is required (stylize CONTENT STYLE [STYLE ...] -o OUT)")
    if args.blend is None:
        return list(args.styles)
    if len(args.blend) != len(args.styles):
        raise UsageError(f"--blend has {len(args.blend)} weights for {len(args.styles)} styles")
    return list(zip(args.styles, args.blend, strict=True))


def _print_json(data: object, *, pretty: bool = False) -> None:
    print(json.dumps(data, indent=2 if pretty else None), flush=True)


def run(args: argparse.Namespace) -> int:
    outputs = Outputs(args.output, args.previews)
    if args.content is None and not (args.watch or args.cancel or args.info):
        raise UsageError("nothing to do: give CONTENT STYLE [STYLE ...] -o OUT, or --watch/--cancel/--info")
    if args.content is not None and (args.watch or args.cancel or args.info):
        raise UsageError("images are only taken when running or submitting a job")
    if args.content is not None and not args.submit and args.output is None:
        raise UsageError("-o OUT is required to run a job (or use --submit)")
    outputs.check()
    show_bar = not (args.json or args.quiet)
    tls = args.tls or args.tls_ca is not None or args.tls_cert is not None
    credentials = tls_credentials(args.tls_ca, args.tls_cert, args.tls_key) if tls else None
    with StylizeClient(
        args.server,
        timeout=args.timeout,
        credentials=credentials,
        token=args.token,
        server_name=args.tls_server_name,
    ) as client:
        if args.info:
            _print_json(client.server_info(timeout=args.timeout).as_dict(), pretty=not args.json)
            return EXIT_OK
        if args.cancel:
            state = client.cancel(args.cancel, timeout=args.timeout)
            state_name = state.value if state else "unknown"
            if args.json:
                _print_json({"event": "cancel", "job_id": args.cancel, "state": state_name})
            else:
                print(state_name)
            return EXIT_OK
        if args.submit:
            submission = client.submit(args.content, _styles(args), timeout=args.timeout, **_settings(args))
            if args.json:
                _print_json({"event": "submitted", **asdict(submission)})
            else:
                print(submission.job_id)
                if submission.watch_token:
                    print(f"watch token: {submission.watch_token}", file=sys.stderr)
            return EXIT_OK
        if args.watch:
            stream = client.watch(args.watch, watch_token=args.watch_token)
        else:
            stream = client.stylize(args.content, _styles(args), **_settings(args))
        bar = ProgressBar(sys.stderr) if show_bar else None
        try:
            completed = follow(stream, outputs, as_json=args.json, bar=bar)
        except KeyboardInterrupt:
            stream.cancel()
            what = "stopped watching" if args.watch else f"job {stream.job_id or ''} cancelled"
            print(f"stylize: interrupted; {what}", file=sys.stderr)
            return EXIT_INTERRUPTED
        finally:
            if bar is not None:
                bar.close()
        if not args.json:
            where = f"wrote {outputs.output}" if outputs.output else "done"
            print(
                f"{where}: {completed.width}x{completed.height}, {completed.iterations} iterations, "
                f"loss {completed.losses.total:.4g}, ran {completed.run_seconds:.1f} s, "
                f"queued {completed.queue_seconds:.1f} s",
                file=sys.stderr,
            )
        return EXIT_OK


def _fail(message: str, code: int, *, as_json: bool, error: StylizeError | None = None) -> int:
    print(f"stylize: error: {one_line(message)}", file=sys.stderr)
    if as_json:
        record: dict[str, Any] = {"event": "error", "exit_code": code, "message": one_line(message)}
        if error is not None:
            record["error"] = type(error).__name__
            record["violations"] = [asdict(v) for v in getattr(error, "violations", [])]
        _print_json(record)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    as_json = "--json" in (sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_intermixed_args(argv)
        return run(args)
    except UsageError as error:
        return _fail(str(error), EXIT_USAGE, as_json=as_json)
    except Unavailable as error:
        return _fail(f"server unavailable: {error}", EXIT_UNAVAILABLE, as_json=as_json, error=error)
    except StylizeError as error:
        return _fail(str(error), EXIT_CODES.get(type(error), EXIT_JOB), as_json=as_json, error=error)
    except OSError as error:  # writing the output or a preview
        return _fail(f"{error.filename or ''}: {error.strerror or error}", EXIT_USAGE, as_json=as_json)
    except KeyboardInterrupt:
        print("stylize: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
