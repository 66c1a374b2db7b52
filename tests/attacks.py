"""The hostile inputs of issue 16 as a table: each request, the outcomes it may end in, and what one call
through a real server did. tests/test_attacks.py runs the table against the session's server; bench/attack.py
runs it against a server of its own and prints the report as JSON.

A row passes when its code is one it allows and, by code:
- OK: the stream ends in Completed and every loss it reported (progress and result) is finite;
- DEADLINE_EXCEEDED (where allowed): only once the job started, never refused up front;
- INVALID_ARGUMENT: the client can read google.rpc.BadRequest details (the whole detail under 8 KiB, well
  within the client's 16 KiB metadata limit) and one violation names the row's field;
- never INTERNAL or UNKNOWN.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np
from PIL import Image
from serverproc import png_bytes

from stylize.client.errors import field_violations
from stylize.v1 import stylize_pb2 as pb
from stylize.v1 import stylize_pb2_grpc

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
# The rich status travels in this trailer; the client refuses metadata over 16 KiB.
DETAILS_KEY = "grpc-status-details-bin"
MAX_DETAILS_BYTES = 8192
# How close the decoded 16-bit gradient's quarters must be to the source's.
GRADIENT_TOLERANCE = 0.02
GRADIENT_EDGE = 64
# The deadline case: a 48 px, 60-iteration job with a 30 s deadline, run after the other rows.
DEADLINE_SECONDS = 30.0


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def gradient_16bit() -> np.ndarray:
    """A 0-to-65535 horizontal ramp, GRADIENT_EDGE px square."""
    ramp = np.linspace(0, 65535, GRADIENT_EDGE).round().astype(np.uint16)
    return np.tile(ramp, (GRADIENT_EDGE, 1))


def gradient_png() -> bytes:
    """The ramp as a 16-bit grayscale PNG (PIL mode I;16)."""
    image = Image.frombytes("I;16", (GRADIENT_EDGE, GRADIENT_EDGE), gradient_16bit().astype("<u2").tobytes())
    assert image.mode == "I;16"
    return png(image)


def quarters(values: np.ndarray) -> list[float]:
    """Mean of each vertical quarter (left to right) of an H x W array in [0, 1]."""
    width = values.shape[1]
    return [float(values[:, q * width // 4 : (q + 1) * width // 4].mean()) for q in range(4)]


def solid(width: int, height: int, value: int = 128) -> bytes:
    return png(Image.new("RGB", (width, height), (value, value // 2, 255 - value)))


def layers(*names: str) -> list[pb.LayerWeight]:
    return [pb.LayerWeight(layer=name) for name in names]


def request(content: bytes | None = None, style: bytes | None = None, **options: object) -> pb.StylizeRequest:
    """A small valid request (64 px, 3 iterations) with `options` (StyleOptions fields) on top."""
    base: dict[str, object] = {"size": 64, "min_size": 64, "initial_iterations": 3}
    base.update(options)
    message = pb.StylizeRequest(
        content_image=png_bytes(1) if content is None else content,
        styles=[pb.StyleImage(image=png_bytes(2, (48, 64)) if style is None else style)],
    )
    for name, value in base.items():
        if name in ("content_layers", "style_layers"):
            getattr(message.options, name).extend(value)
        else:
            setattr(message.options, name, value)
    return message


def gradient_request() -> pb.StylizeRequest:
    """The gradient as content, run one tiny Adam step: the output is the decoded content to within 1e-4."""
    return request(
        gradient_png(),
        optimizer=pb.OPTIMIZER_ADAM,
        learning_rate=1e-4,
        initial_iterations=1,
        size=GRADIENT_EDGE,
        min_size=GRADIENT_EDGE,
    )


def gradient_figures(events: list[pb.JobEvent]) -> tuple[dict[str, object], list[str]]:
    """The output's quarters against the source ramp's."""
    output = Image.open(io.BytesIO(events[-1].completed.image.data)).convert("L")
    decoded = quarters(np.asarray(output, dtype=np.float64) / 255)
    reference = quarters(gradient_16bit() / 65535)
    worst = max(abs(a - b) for a, b in zip(decoded, reference, strict=True))
    figures = {"quarters": [round(v, 4) for v in decoded], "reference": [round(v, 4) for v in reference]}
    problems = [] if worst <= GRADIENT_TOLERANCE else [f"a quarter is {worst:.3f} off the reference"]
    return figures, problems


@dataclass(frozen=True)
class Attack:
    name: str
    build: Callable[[], pb.StylizeRequest]
    allowed: frozenset[grpc.StatusCode]
    # The field an INVALID_ARGUMENT must name (a violation's field starts with it).
    field: str = ""
    timeout: float = 60.0
    # Figures and problems of an OK outcome beyond finite losses.
    check: Callable[[list[pb.JobEvent]], tuple[dict[str, object], list[str]]] | None = None


REFUSED = frozenset({INVALID})
RUNS_OR_REFUSED = frozenset({OK, INVALID})

ATTACKS: tuple[Attack, ...] = (
    Attack("learning_rate=3e38", lambda: request(learning_rate=3e38), REFUSED, "options.learning_rate"),
    Attack("style_scale=1e-3", lambda: request(style_scale=1e-3), REFUSED, "options.style_scale"),
    Attack("style_scale=1e-30", lambda: request(style_scale=1e-30), REFUSED, "options.style_scale"),
    Attack(
        "pool1 tapped at 1x1",
        lambda: request(size=1, min_size=1, style_layers=layers("pool1")),
        REFUSED,
        "options.",
    ),
    Attack(
        "pool5 tapped at 16x16",
        lambda: request(size=16, min_size=16, style_layers=layers("pool5")),
        REFUSED,
        "options.",
    ),
    Attack(
        "pool5 style tap at 24x24",
        lambda: request(style_layers=layers("pool5"), style_scale=0.375),
        RUNS_OR_REFUSED,
        "options.",
    ),
    Attack("tv_weight=3e38", lambda: request(tv_weight=3e38), REFUSED, "options.tv_weight"),
    Attack(
        "content 1x64, relu1_1 only",
        lambda: request(solid(1, 64), content_layers=layers("relu1_1"), style_layers=layers("relu1_1")),
        RUNS_OR_REFUSED,
        "options.",
    ),
    Attack(
        "content 64x1, relu1_1 only",
        lambda: request(solid(64, 1), content_layers=layers("relu1_1"), style_layers=layers("relu1_1")),
        RUNS_OR_REFUSED,
        "options.",
    ),
    Attack(
        "init=STYLE_STATS, 1x1 style",
        lambda: request(style=solid(1, 1), init=pb.INIT_STYLE_STATS, size=16, min_size=16),
        RUNS_OR_REFUSED,
        "styles[0]",
    ),
    Attack(
        "color=LUMINANCE, 1x1 content",
        lambda: request(solid(1, 1), color=pb.COLOR_MODE_LUMINANCE, size=16, min_size=16),
        RUNS_OR_REFUSED,
        "content_image",
    ),
    Attack(
        "color=LUMINANCE, 1x1 style",
        lambda: request(style=solid(1, 1), color=pb.COLOR_MODE_LUMINANCE, size=16, min_size=16),
        RUNS_OR_REFUSED,
        "styles[0]",
    ),
    Attack(
        "conv1_1 tapped at size 1",
        lambda: request(size=1, min_size=1, content_layers=layers("conv1_1"), style_layers=layers("conv1_1")),
        RUNS_OR_REFUSED,
        "options.",
    ),
    Attack("16-bit grayscale gradient", gradient_request, frozenset({OK}), check=gradient_figures),
    Attack(
        "lbfgs_history=2^32-1", lambda: request(lbfgs_history=2**32 - 1), REFUSED, "options.lbfgs_history"
    ),
    Attack(
        "1,000 unknown layers",
        lambda: request(style_layers=layers(*(f"nope{i}" for i in range(1000)))),
        REFUSED,
        "options.style_layers",
    ),
    Attack(
        "37 unknown layers (one violation each)",
        lambda: request(style_layers=layers(*(f"nope{i}" for i in range(37)))),
        REFUSED,
        "options.style_layers[0].layer",
    ),
    Attack(
        "37 unknown content and style layers, each weighing -1",
        lambda: request(
            content_layers=[pb.LayerWeight(layer=f"nope{i}", weight=-1) for i in range(37)],
            style_layers=[pb.LayerWeight(layer=f"nope{i}", weight=-1) for i in range(37)],
        ),
        REFUSED,
        "options.content_layers[0]",
    ),
    Attack(
        "200,000 relu1_1 entries",
        lambda: request(style_layers=layers(*["relu1_1"] * 200_000)),
        REFUSED,
        "options.style_layers",
    ),
    # Last: "after a few other jobs".
    # It runs in about 3 s here; a machine so loaded that it takes over 30 s ends it mid-way, which still
    # shows what the row is about: the call was accepted, not refused up front.
    Attack(
        "48 px, 60 iterations, 30 s deadline",
        lambda: request(size=48, min_size=48, initial_iterations=60),
        frozenset({OK, grpc.StatusCode.DEADLINE_EXCEEDED}),
        timeout=DEADLINE_SECONDS,
    ),
)


@dataclass
class Outcome:
    name: str
    code: str
    seconds: float
    message: str = ""
    # The first fields the BadRequest names, and how many violations it has.
    fields: list[str] = field(default_factory=list)
    violations: int = 0
    details_bytes: int = 0
    non_finite_loss: bool = False
    figures: dict[str, object] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


def losses_of(events: list[pb.JobEvent]) -> list[float]:
    found = []
    for event in events:
        losses = event.progress.losses if event.HasField("progress") else event.completed.losses
        if event.HasField("progress") or event.HasField("completed"):
            found += [losses.total, losses.content, losses.style, losses.total_variation]
    return found


def run_attack(stub: stylize_pb2_grpc.StyleTransferStub, attack: Attack) -> Outcome:
    message = attack.build()
    began = time.monotonic()
    events: list[pb.JobEvent] = []
    error: grpc.RpcError | None = None
    try:
        for event in stub.Stylize(message, timeout=attack.timeout):
            events.append(event)
    except grpc.RpcError as caught:
        error = caught
    code = OK if error is None else error.code()
    named: list[str] = []
    outcome = Outcome(attack.name, code.name, round(time.monotonic() - began, 3))
    outcome.non_finite_loss = not all(math.isfinite(value) for value in losses_of(events))
    if error is not None:
        outcome.message = (error.details() or "")[:300]
        trailer = dict(error.trailing_metadata() or ())
        outcome.details_bytes = len(trailer.get(DETAILS_KEY, b""))
        named = [violation.field for violation in field_violations(error)]
        outcome.violations = len(named)
        outcome.fields = named[:5]
    if code not in attack.allowed:
        outcome.problems.append(f"{code.name}, expected one of {sorted(c.name for c in attack.allowed)}")
    if code == OK:
        if not (events and events[-1].HasField("completed")):
            outcome.problems.append("OK without a Completed event")
        elif attack.check is not None:
            outcome.figures, problems = attack.check(events)
            outcome.problems += problems
        if outcome.non_finite_loss:
            outcome.problems.append("OK with a non-finite loss")
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED and not any(e.HasField("started") for e in events):
        outcome.problems.append(f"refused before it started: {outcome.message}")
    elif code == INVALID:
        if not any(name.startswith(attack.field) for name in named):
            outcome.problems.append(f"no violation names {attack.field!r}: {outcome.fields}")
        if not outcome.details_bytes or outcome.details_bytes >= MAX_DETAILS_BYTES:
            outcome.problems.append(f"{outcome.details_bytes} bytes of details")
    return outcome


def run_all(stub: stylize_pb2_grpc.StyleTransferStub) -> list[Outcome]:
    return [run_attack(stub, attack) for attack in ATTACKS]
