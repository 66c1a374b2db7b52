"""Issue 16's hostile inputs through the session's real server (the table in attacks.py), and property-based
requests over the float options and tiny image sizes: every outcome is OK with finite losses, or a
client-error status that names a field; never INTERNAL, and no traceback in the server's log."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from attacks import ATTACKS, MAX_DETAILS_BYTES, losses_of, png, run_attack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from serverproc import ServerProcess

from stylize.api.options import MAX_LEARNING_RATE, MAX_LOSS_WEIGHT, MAX_RELATIVE_WEIGHT
from stylize.client.errors import field_violations
from stylize.v1 import stylize_pb2 as pb
from stylize.v1 import stylize_pb2_grpc

# The request's fields a violation may name ("options.size", "styles[0].weight", ...).
REQUEST_FIELDS = tuple(f.name for f in pb.StylizeRequest.DESCRIPTOR.fields)
PROPERTY_EXAMPLES = 100
# Shallow layers, so that most drawn sizes are large enough for them (pool1 and relu2_1 need 2 px).
SHALLOW_LAYERS = ("conv1_1", "relu1_1", "relu1_2", "pool1", "relu2_1")


@pytest.fixture(scope="module")
def log_start(server: ServerProcess) -> int:
    """Where this module's part of the shared server's log begins."""
    return len(server.log())


@pytest.fixture(scope="module")
def stub(server: ServerProcess, log_start: int) -> Iterator[stylize_pb2_grpc.StyleTransferStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield stylize_pb2_grpc.StyleTransferStub(channel)


@pytest.mark.parametrize("attack", ATTACKS, ids=[attack.name for attack in ATTACKS])
def test_a_hostile_input_ends_in_its_expected_status(stub, attack) -> None:
    outcome = run_attack(stub, attack)
    assert outcome.passed, outcome


@pytest.mark.parametrize("name", ["lbfgs_history=2^32-1", "1,000 unknown layers"])
def test_the_client_reads_the_bad_request_of_the_issues_resource_cases(stub, name) -> None:
    """The client gets INVALID_ARGUMENT with its BadRequest (not RESOURCE_EXHAUSTED for oversized metadata,
    not a MemoryError reported as "try a smaller size")."""
    (attack,) = [attack for attack in ATTACKS if attack.name == name]
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Stylize(attack.build(), timeout=30))
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in field_violations(error)] == [attack.field]
    trailer = dict(error.trailing_metadata())
    assert 0 < len(trailer["grpc-status-details-bin"]) < MAX_DETAILS_BYTES


# ---------------------------------------------------------------- properties

# Each float option: anything the wire can carry (NaN, infinities, subnormals, 3e38), its documented range,
# or that range's ends (see floats_around).
FLOAT_RANGES = {
    "content_weight": (0.0, MAX_LOSS_WEIGHT),
    "style_weight": (0.0, MAX_LOSS_WEIGHT),
    "tv_weight": (0.0, MAX_LOSS_WEIGHT),
    "learning_rate": (1e-6, MAX_LEARNING_RATE),
    "ema_decay": (0.0, 0.999),
    "style_scale": (1e-3, 4.0),
    "scale_factor": (1.01, 4.0),
}
WEIGHT_RANGE = (0.0, MAX_RELATIVE_WEIGHT)
edges = st.integers(1, 24)


def floats_around(low: float, high: float) -> st.SearchStrategy[float]:
    """One draw in 8 from all float32 values, one from the range's ends, the rest from within: a request
    has about eight floats, and about half the requests should run."""
    low, high = (float(np.float32(end)) for end in (low, high))  # what the wire's float32 can hold
    choices = {0: st.floats(width=32), 1: st.sampled_from([low, high])}
    within = st.floats(low, high, width=32, exclude_min=True)  # hypothesis favours the ends, drawn above
    return st.integers(0, 7).flatmap(lambda pick: choices.get(pick, within))


def image(width: int, height: int, value: int) -> bytes:
    return png(Image.new("RGB", (width, height), (value, 255 - value, value // 2)))


def layer_weights(draw: st.DrawFn) -> list[pb.LayerWeight]:
    chosen = draw(st.lists(st.sampled_from(SHALLOW_LAYERS), min_size=1, max_size=2, unique=True))
    return [pb.LayerWeight(layer=layer, weight=draw(floats_around(*WEIGHT_RANGE))) for layer in chosen]


@st.composite
def tiny_requests(draw: st.DrawFn) -> pb.StylizeRequest:
    """1 to 32 px outputs of 1 to 24 px images, one or two iterations, shallow layers, and the float options
    (each set or left to its default) as floats_around draws them."""
    size = draw(st.integers(1, 32))
    options = pb.StyleOptions(
        size=size,
        min_size=draw(st.one_of(st.just(size), st.integers(1, size))),
        iterations=1,
        initial_iterations=draw(st.integers(1, 2)),
        optimizer=draw(st.sampled_from([pb.OPTIMIZER_LBFGS, pb.OPTIMIZER_ADAM])),
        init=draw(st.sampled_from([pb.INIT_CONTENT, pb.INIT_NOISE, pb.INIT_STYLE_STATS])),
        color=draw(st.sampled_from([pb.COLOR_MODE_NONE, pb.COLOR_MODE_LUMINANCE, pb.COLOR_MODE_HISTOGRAM])),
        content_layers=layer_weights(draw),
        style_layers=layer_weights(draw),
    )
    for name, (low, high) in FLOAT_RANGES.items():
        if draw(st.booleans()):
            setattr(options, name, draw(floats_around(low, high)))
    styles = draw(st.lists(floats_around(*WEIGHT_RANGE), min_size=1, max_size=2))
    return pb.StylizeRequest(
        content_image=image(draw(edges), draw(edges), draw(st.integers(0, 255))),
        styles=[
            pb.StyleImage(image=image(draw(edges), draw(edges), draw(st.integers(0, 255))), weight=weight)
            for weight in styles
        ],
        options=options,
    )


# How the property test's requests ended, by code: checked afterwards, so that it provably ran jobs.
OUTCOMES: Counter[str] = Counter()


@settings(
    max_examples=PROPERTY_EXAMPLES,
    deadline=None,
    derandomize=True,  # the same requests in every run: a failure reproduces
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(request=tiny_requests())
def test_float_options_and_tiny_images_end_in_finite_success_or_a_named_field(stub, request) -> None:
    events: list[pb.JobEvent] = []
    try:
        events.extend(stub.Stylize(request, timeout=60))
    except grpc.RpcError as error:
        code, details = error.code(), error.details() or ""
        OUTCOMES[code.name] += 1
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            fields = [v.field for v in field_violations(error)]
            assert fields and all(f.startswith(REQUEST_FIELDS) for f in fields), (fields, request)
        else:
            # The engine's numeric guard: FAILED_PRECONDITION naming the options behind the loss.
            assert code == grpc.StatusCode.FAILED_PRECONDITION, (code, details, request)
            assert "options most likely responsible" in details, details
        return
    OUTCOMES["OK"] += 1
    assert events and events[-1].HasField("completed"), request
    assert all(math.isfinite(value) for value in losses_of(events)), request


def test_the_property_test_ran_jobs_and_had_requests_refused() -> None:
    assert OUTCOMES["OK"] >= PROPERTY_EXAMPLES // 10, OUTCOMES
    assert OUTCOMES["INVALID_ARGUMENT"] >= PROPERTY_EXAMPLES // 10, OUTCOMES


def test_the_server_logged_no_traceback_for_any_of_them(server, log_start) -> None:
    """Runs after the tests above (pytest keeps the file's order)."""
    assert server.health() == "SERVING"
    assert "Traceback" not in server.log()[log_start:]
