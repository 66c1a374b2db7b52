"""The client's pieces that need no server: options <-> proto, request building, targets, events, errors."""

from __future__ import annotations

import io
import json
from enum import StrEnum

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from PIL import Image

from stylize.api import options as engine
from stylize.client import errors
from stylize.client.channel import SERVICE_CONFIG, channel_options, resolve_target
from stylize.client.events import Completed, JobState, Progress, Queued, Started, event_from_proto
from stylize.client.options import (
    HELP,
    PREVIEW_OPTIONS,
    STYLE_OPTIONS,
    style_options_from_proto,
    style_options_to_proto,
)
from stylize.client.request import build_request
from stylize.v1 import stylize_pb2


def png_bytes(size: tuple[int, int] = (8, 6), image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 40)).save(buffer, format=image_format)
    return buffer.getvalue()


def fields_of(error: errors.InvalidArgument) -> list[str]:
    return [violation.field for violation in error.violations]


def test_specs_cover_every_engine_option_with_its_default() -> None:
    assert list(STYLE_OPTIONS) == engine.option_names()
    for name, spec in STYLE_OPTIONS.items():
        assert spec.default == getattr(engine.DEFAULTS, name)
        assert spec.help, name
    assert list(PREVIEW_OPTIONS) == ["every", "max_size", "format", "quality"]
    assert set(HELP) == set(STYLE_OPTIONS) | set(PREVIEW_OPTIONS)


@pytest.mark.parametrize("name", [n for n, s in STYLE_OPTIONS.items() if issubclass(s.kind, StrEnum)])
def test_every_enum_choice_round_trips_through_the_proto(name: str) -> None:
    for choice in STYLE_OPTIONS[name].kind:
        message = style_options_to_proto({name: choice.value.upper()})
        assert getattr(message, name) != 0
        assert style_options_from_proto(message) == {name: choice}


def test_only_given_options_are_set_and_they_round_trip() -> None:
    given = {
        "size": 64,
        "seed": 2**40,
        "style_weight": 5.0,
        "content_layers": ["relu4_2"],
        "style_layers": [("relu1_1", 0.5), "relu2_1:2"],
        "optimizer": engine.Optimizer.ADAM,
    }
    message = style_options_to_proto(given)
    assert not message.HasField("iterations")
    assert message.style_loss == stylize_pb2.STYLE_LOSS_UNSPECIFIED
    assert style_options_from_proto(message) == {
        "size": 64,
        "seed": 2**40,
        "style_weight": 5.0,
        "content_layers": (("relu4_2", 1.0),),
        "style_layers": (("relu1_1", 0.5), ("relu2_1", 2.0)),
        "optimizer": engine.Optimizer.ADAM,
    }


def test_every_problem_is_reported_at_once_with_its_field() -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        style_options_to_proto(
            {
                "size": -1,
                "iterations": 2.5,
                "seed": 2**64,
                "style_loss": "gramm",
                "tv_weight": float("nan"),
                "style_layers": ["relu1_1", "relu9_9", "relu2_1:x"],
                "learning_rate": "fast",
                "colour": "none",
            }
        )
    assert fields_of(caught.value) == [
        "options.size",
        "options.iterations",
        "options.seed",
        "options.style_loss",
        "options.tv_weight",
        "options.style_layers[1].layer",
        "options.style_layers[2].weight",
        "options.learning_rate",
        "options.colour",
    ]
    message = str(caught.value)
    assert "\n" not in message
    assert "gram, mean_covariance" in message
    assert isinstance(caught.value, ValueError)


def test_request_from_paths_bytes_and_pil_images(tmp_path) -> None:
    content = tmp_path / "content.jpg"
    content.write_bytes(png_bytes(image_format="JPEG"))
    bmp = tmp_path / "style.bmp"
    bmp.write_bytes(png_bytes((5, 4), "BMP"))
    request = build_request(
        str(content),
        [(bmp, 2.0), png_bytes(), Image.new("L", (3, 3))],
        size=64,
        preview_every=3,
        preview_format="webp",
        output_format="jpeg",
        client_tag="t",
    )
    assert request.content_image == content.read_bytes()  # a wire format goes as it is
    assert Image.open(io.BytesIO(request.styles[0].image)).format == "PNG"  # BMP re-encoded
    assert request.styles[0].weight == 2.0
    assert not request.styles[1].HasField("weight")
    assert Image.open(io.BytesIO(request.styles[2].image)).size == (3, 3)
    assert request.options.size == 64
    assert request.preview.every == 3
    assert request.preview.format == stylize_pb2.IMAGE_FORMAT_WEBP
    assert request.output_format == stylize_pb2.IMAGE_FORMAT_JPEG


def test_bad_inputs_name_their_fields(tmp_path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(errors.InvalidArgument) as caught:
        build_request(
            tmp_path / "missing.png",
            [text, (b"", 1.0), (png_bytes(), "heavy"), 42],
            preview_every=-1,
            output_format="gif",
            client_tag="x" * 129,
        )
    assert fields_of(caught.value) == [
        "content_image",
        "styles[0].image",
        "styles[1].image",
        "styles[2].weight",
        "styles[3].image",
        "client_tag",
        "preview.every",
        "output_format",
    ]
    assert "no such file" in caught.value.violations[0].description
    with pytest.raises(errors.InvalidArgument, match="at least one style"):
        build_request(png_bytes(), [])


def test_targets() -> None:
    assert resolve_target("10.0.0.1:50051") == "10.0.0.1:50051"
    assert resolve_target("dns:///stylize.default.svc:50051") == "dns:///stylize.default.svc:50051"
    assert resolve_target(["127.0.0.1:1", "127.0.0.1:2"]) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert resolve_target("127.0.0.1:1, 127.0.0.2:2") == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert resolve_target(["[::1]:1", "::1:2"]) == "ipv6:[::1]:1,[::1]:2"
    with pytest.raises(errors.InvalidArgument, match="dns:///"):
        resolve_target(["a.example:1", "127.0.0.1:2"])
    with pytest.raises(errors.InvalidArgument, match="all IPv4 or all IPv6"):
        resolve_target(["[::1]:1", "127.0.0.1:2"])


def test_default_target_comes_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("STYLIZE_SERVER", "127.0.0.9:7")
    assert resolve_target(None) == "127.0.0.9:7"
    monkeypatch.delenv("STYLIZE_SERVER")
    assert resolve_target(None) == "127.0.0.1:50051"


def test_service_config_balances_and_retries_unavailable_only() -> None:
    options = dict(channel_options())
    assert json.loads(options["grpc.service_config"]) == SERVICE_CONFIG
    assert SERVICE_CONFIG["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = SERVICE_CONFIG["methodConfig"]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert options["grpc.max_receive_message_length"] == 64 * 1024 * 1024
    assert options["grpc.keepalive_time_ms"] == 30_000


def job_event(**fields: object) -> stylize_pb2.JobEvent:
    return stylize_pb2.JobEvent(job_id="j1", sequence=3, elapsed_seconds=1.5, client_tag="tag", **fields)


def test_events_from_proto() -> None:
    assert event_from_proto(job_event(queued=stylize_pb2.Queued(position=2))) == Queued(
        job_id="j1", sequence=3, elapsed_seconds=1.5, client_tag="tag", position=2
    )
    started = event_from_proto(
        job_event(started=stylize_pb2.Started(device="cpu", scales=[stylize_pb2.Size(width=4, height=3)]))
    )
    assert isinstance(started, Started) and started.scales == ((4, 3),)
    png = stylize_pb2.IMAGE_FORMAT_PNG
    preview = stylize_pb2.EncodedImage(data=png_bytes(), format=png, width=8, height=6)
    losses = stylize_pb2.Losses(total=3.0)
    progress = event_from_proto(
        job_event(progress=stylize_pb2.Progress(iteration=2, losses=losses, preview=preview))
    )
    assert isinstance(progress, Progress) and progress.losses.total == 3.0
    assert progress.preview_image().size == (8, 6)
    bare = event_from_proto(job_event(progress=stylize_pb2.Progress(iteration=3)))
    assert isinstance(bare, Progress) and bare.preview is None and bare.preview_image() is None
    completed = event_from_proto(job_event(completed=stylize_pb2.Completed(image=preview, iterations=5)))
    assert isinstance(completed, Completed) and completed.image().size == (8, 6)
    assert completed.data == preview.data
    assert event_from_proto(job_event()) is None  # a kind newer than this client: skipped
    assert JobState.from_proto(stylize_pb2.JOB_STATE_CANCELLED) is JobState.CANCELLED


class FakeRpcError(grpc.RpcError):
    """What a failed call looks like to the client: code, details and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, details: str, metadata: tuple = ()):
        self._code, self._details, self._metadata = code, details, metadata

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return self._metadata


def test_errors_from_status_codes() -> None:
    violation = error_details_pb2.BadRequest.FieldViolation(field="options.size", description="too big")
    bad_request = error_details_pb2.BadRequest(field_violations=[violation])
    detail = any_pb2.Any()
    detail.Pack(bad_request)
    rich = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="bad\nrequest", details=[detail])
    metadata = (("grpc-status-details-bin", rich.SerializeToString()),)
    error = errors.error_from_rpc(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad\nrequest", metadata))
    assert isinstance(error, errors.InvalidArgument)
    assert [(v.field, v.description) for v in error.violations] == [("options.size", "too big")]
    assert str(error) == "bad request: options.size: too big"
    for code, cls in [
        (grpc.StatusCode.UNAVAILABLE, errors.Unavailable),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhausted),
        (grpc.StatusCode.CANCELLED, errors.Cancelled),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceeded),
        (grpc.StatusCode.NOT_FOUND, errors.NotFound),
        (grpc.StatusCode.INTERNAL, errors.JobFailed),
    ]:
        converted = errors.error_from_rpc(FakeRpcError(code, "x"))
        assert type(converted) is cls and converted.code is code
