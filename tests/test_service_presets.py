"""Presets and backbones against the real server: bad names are INVALID_ARGUMENT naming the valid ones;
a server whose model directory holds VGG19 and VGG16 serves both, the request's backbone picking."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from serverproc import ServerProcess, export_random_model, sample, scrape

from stylize.api.options import FieldViolation
from stylize.client import Completed, InvalidArgument, Started, StylizeClient
from stylize.client.errors import field_violations
from stylize.v1 import stylize_pb2 as pb
from stylize.v1 import stylize_pb2_grpc

SAMPLES = Path(__file__).resolve().parent.parent / "assets" / "samples"
CONTENT, STYLE = SAMPLES / "chelsea.png", SAMPLES / "coffee.png"
# A preset at one 64 px scale with two iterations: the three explicit options override the preset's.
SMALL = {"size": 64, "min_size": 64, "initial_iterations": 2}


@pytest.fixture(scope="module")
def two_backbones(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server whose model directory holds a VGG19 and a VGG16 artifact (random weights)."""
    model_dir = tmp_path_factory.mktemp("two-backbones")
    export_random_model(model_dir)
    export_random_model(model_dir, "--arch", "vgg16")
    with ServerProcess(model_dir, "--device", "cpu", "--workers", "1", "--grace-seconds", "5") as process:
        yield process


def refused(address: str, request: pb.StylizeRequest) -> list[FieldViolation]:
    """The field violations of the server's INVALID_ARGUMENT, for a request sent raw (the client library
    would refuse unknown names before sending them)."""
    request.content_image = CONTENT.read_bytes()
    request.styles.add().image = STYLE.read_bytes()
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as caught:
        list(stylize_pb2_grpc.StyleTransferStub(channel).Stylize(request, timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return field_violations(caught.value)


def test_unknown_preset_layer_or_backbone_is_invalid_argument_naming_the_valid_ones(server) -> None:
    (violation,) = refused(server.address, pb.StylizeRequest(preset="gatys2015"))
    assert violation.field == "preset"
    assert (
        "unknown preset 'gatys2015'; valid: gatys2016 johnson-vgg16 keras-vgg19-adam" in violation.description
    )

    options = pb.StyleOptions(content_layers=[pb.LayerWeight(layer="block5_conv4")])
    (violation,) = refused(server.address, pb.StylizeRequest(preset="johnson-vgg16", options=options))
    assert violation.field == "options.content_layers[0].layer"  # VGG16 has three convs in block 5
    assert "unknown vgg16 layer 'block5_conv4'; valid: conv1_1" in violation.description

    # This server serves VGG19 alone.
    with StylizeClient(server.address) as client, pytest.raises(InvalidArgument) as caught:
        client.stylize(CONTENT, [STYLE], preset="johnson-vgg16", **SMALL).result()
    (violation,) = caught.value.violations
    assert violation.field == "options.backbone"
    assert violation.description == "vgg16 is not served here; available: vgg19"


def test_one_server_serves_both_backbones(two_backbones) -> None:
    with StylizeClient(two_backbones.address) as client:
        info = client.server_info()
        models = {model.arch: model for model in info.message.models}
        assert list(models) == ["vgg19", "vgg16"] and info.message.model.arch == "vgg19"
        assert info.backbones == ("vgg19", "vgg16")
        assert all(model.parity.passed and model.parity.layers for model in models.values())
        assert (
            "relu5_3" in models["vgg16"].available_layers
            and "relu5_4" not in models["vgg16"].available_layers
        )

        # VGG16 with the artifact's layers: targets from VGG16's ONNX Runtime session.
        events = list(client.stylize(CONTENT, [STYLE], backbone="vgg16", **SMALL))
        started = next(e for e in events if isinstance(e, Started))
        assert started.targets_backend == "onnxruntime:CPUExecutionProvider"
        assert isinstance(events[-1], Completed) and max(events[-1].image().size) == 64

        # johnson-vgg16 taps relu5_3, which the artifact does not export: torch targets, still VGG16.
        events = list(client.stylize(CONTENT, [STYLE], preset="johnson-vgg16", **SMALL))
        started = next(e for e in events if isinstance(e, Started))
        assert started.targets_backend == "torch" and events[-1].iterations == 2

    samples = scrape(two_backbones.metrics_url)
    for arch in ("vgg19", "vgg16"):
        assert sample(samples, "stylize_model_info", arch=arch, weights="random") == 1
        assert (
            sample(samples, "stylize_parity_relative_error", arch=arch, layer="relu5_1", quantity="gram")
            < 1e-3
        )
