"""Issue 16's hostile inputs through a real server, and the run-time estimate against real jobs. Prints JSON.

    .venv/bin/python bench/attack.py [--model-dir DIR] [--out docs/bench/attack-NAME.json]

Starts one stylize-server (CPU, one worker; random weights unless --model-dir) and sends each row of the
table in tests/attacks.py as a Stylize call, in order (the deadline case last, after the others): its status
code, the fields its BadRequest names, the bytes of the error detail, whether any loss it reported was
non-finite, and for the 16-bit gradient the decoded quarters. The summary counts INTERNAL/UNKNOWN outcomes
and OK outcomes with a non-finite loss (both must be 0), and whether the server logged a traceback.

Then the estimate: for a few jobs the server's figures, from the jobs before (read from the refusal of a call
with a deadline far too short: "needs at least L s (about E s)"), against the job's run time on the worker
when it then runs without a deadline. `within_2x`: E is within 2x of the run time; `lower_ok`: L is under it;
`refused: false`: no measurement bounded the job yet, so the short deadline was accepted.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import tempfile
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # bench.machine, and the tests' server harness and table

from attacks import request, run_all  # noqa: E402
from serverproc import ServerProcess, collect, export_random_model  # noqa: E402

from bench.machine import machine_info  # noqa: E402
from bench.report import print_report  # noqa: E402
from stylize.v1 import stylize_pb2 as pb  # noqa: E402
from stylize.v1 import stylize_pb2_grpc  # noqa: E402

SERVER_FLAGS = ("--device", "cpu", "--workers", "1", "--grace-seconds", "5")
FIGURES = re.compile(r"needs at least (?P<lower>[0-9.e+-]+) s \(about (?P<expected>[0-9.e+-]+) s\)")
# A deadline no job of ESTIMATED can meet: the server refuses it at once and says its figures.
PROBE_DEADLINE_SECONDS = 0.05
ESTIMATED = (
    {"size": 32, "min_size": 32, "initial_iterations": 40},
    {"size": 96, "min_size": 96, "initial_iterations": 20},
    {"size": 128, "min_size": 64, "initial_iterations": 20, "iterations": 10},
    {"size": 64, "min_size": 64, "initial_iterations": 40, "optimizer": pb.OPTIMIZER_ADAM},
    {"size": 192, "min_size": 192, "initial_iterations": 10},
    {"size": 48, "min_size": 48, "initial_iterations": 60},
)


def estimate_rows(stub: stylize_pb2_grpc.StyleTransferStub) -> list[dict[str, object]]:
    rows = []
    for options in ESTIMATED:
        # The probe first: the figures come from the jobs before this one (the table's and the rows above).
        try:
            list(stub.Stylize(request(**options), timeout=PROBE_DEADLINE_SECONDS))
            figures = None
        except grpc.RpcError as error:
            figures = FIGURES.search(error.details() or "")
        events, code = collect(stub.Stylize(request(**options), timeout=120))
        assert code == grpc.StatusCode.OK, code
        run_seconds = events[-1].completed.run_seconds
        row: dict[str, object] = {
            "options": {k: v for k, v in options.items() if k != "optimizer"}
            | ({"optimizer": "adam"} if "optimizer" in options else {}),
            "run_seconds": round(run_seconds, 3),
        }
        if figures is None:
            row["refused"] = False
        else:
            lower, expected = float(figures["lower"]), float(figures["expected"])
            row |= {
                "refused": True,
                "lower_seconds": lower,
                "expected_seconds": expected,
                "expected_over_run": round(expected / run_seconds, 3),
                "within_2x": run_seconds / 2 <= expected <= run_seconds * 2,
                "lower_ok": lower <= run_seconds,
            }
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, help="artifact to use (default: export random weights)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model_dir or export_random_model(Path(scratch))
        with ServerProcess(model_dir, *SERVER_FLAGS) as server:
            with grpc.insecure_channel(server.address) as channel:
                stub = stylize_pb2_grpc.StyleTransferStub(channel)
                outcomes = run_all(stub)
                estimates = estimate_rows(stub)
            healthy = server.health() == "SERVING"
            log = server.log()
    report = {
        "benchmark": "attack",
        "machine": machine_info(),
        "server_flags": list(SERVER_FLAGS),
        "weights": "random" if args.model_dir is None else str(args.model_dir),
        "summary": {
            "rows": len(outcomes),
            "passed": sum(outcome.passed for outcome in outcomes),
            "internal_or_unknown": sum(o.code in ("INTERNAL", "UNKNOWN") for o in outcomes),
            "ok_with_non_finite_loss": sum(o.code == "OK" and o.non_finite_loss for o in outcomes),
            "traceback_in_log": "Traceback" in log,
            "serving_afterwards": healthy,
            "estimates_within_2x": sum(bool(row.get("within_2x")) for row in estimates),
            "estimates_lower_bound_held": sum(bool(row.get("lower_ok")) for row in estimates),
            "estimates": len(estimates),
        },
        "attacks": [dataclasses.asdict(outcome) | {"passed": outcome.passed} for outcome in outcomes],
        "estimates": estimates,
    }
    print_report(report, args.out)


if __name__ == "__main__":
    main()
