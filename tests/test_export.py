"""stylize-export end to end: the artifact, ONNX Runtime parity, the round trip, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from parity_table import assert_every_layer_passes

from stylize.api.options import DEFAULT_EXPORT_LAYERS, LAYERS, Backbone
from stylize.export.onnx_export import export_artifact
from stylize.model.artifact import (
    ArtifactError,
    load_artifact,
    load_artifacts,
    manifest_filename,
    onnx_filename,
    state_dict_digest,
)
from stylize.model.parity import compare
from stylize.model.vgg import CAFFE_NORMALIZATION, VGGFeatures, expected_shapes, random_state_dict
from stylize.model.weights import random_weights

# The file-handling tests below (corrupt files, bad manifests) use the VGG19 artifact's names.
ONNX_FILENAME, MANIFEST_FILENAME = onnx_filename("vgg19"), manifest_filename("vgg19")

EXPORT_SCRIPT = Path(sys.executable).with_name("stylize-export")
TOLERANCE = 1e-4
SIZES = ((64, 64), (136, 200))  # (height, width): 64x64 and a 200x136 landscape


@dataclass(frozen=True)
class CliRun:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str) -> CliRun:
    done = subprocess.run([str(EXPORT_SCRIPT), *args], capture_output=True, text=True, timeout=240)
    return CliRun(done.returncode, done.stdout, done.stderr)


def assert_one_line_error(run: CliRun, fragment: str, code: int = 2) -> None:
    assert run.returncode == code, run
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("stylize-export: error: ")
    assert fragment in lines[0]


def image(height: int, width: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


_EXPORTS: dict[str, tuple[Path, CliRun]] = {}


def export_once(arch: str, tmp_path_factory) -> tuple[Path, CliRun]:
    """One real `stylize-export --arch ARCH --weights random` run per session, shared by the tests that
    only read its result."""
    if arch not in _EXPORTS:
        out = tmp_path_factory.mktemp(f"export-{arch}") / "model"
        run = run_cli("--arch", arch, "--weights", "random", "--out", str(out))
        assert run.returncode == 0, run.stderr
        _EXPORTS[arch] = out, run
    return _EXPORTS[arch]


@pytest.fixture(scope="session", params=[arch.value for arch in Backbone])
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def exported(arch, tmp_path_factory) -> tuple[Path, CliRun]:
    return export_once(arch, tmp_path_factory)


@pytest.fixture(scope="session")
def vgg19_export(tmp_path_factory) -> tuple[Path, CliRun]:
    return export_once("vgg19", tmp_path_factory)


@pytest.fixture(scope="session")
def reference_module(arch) -> VGGFeatures:
    """What the CLI exported: default layers, max pooling, ImageNet normalization, seed-0 random weights."""
    return VGGFeatures(arch=arch).load_weights(random_state_dict(0, arch)).eval()


def test_export_writes_both_files_and_nothing_else(exported, arch):
    out, run = exported
    assert sorted(p.name for p in out.iterdir()) == sorted([manifest_filename(arch), onnx_filename(arch)])
    assert "Traceback" not in run.stderr
    assert f"wrote {out / onnx_filename(arch)}" in run.stdout


def test_manifest_records_the_export(exported, arch):
    out, _ = exported
    data = json.loads((out / manifest_filename(arch)).read_text())
    assert data["arch"] == arch
    assert (data["weights"], data["weights_source"], data["weights_sha256"]) == ("random", "seed=0", None)
    assert data["state_dict_sha256"] == state_dict_digest(random_state_dict(0, arch))
    assert data["layers"] == data["output_names"] == list(DEFAULT_EXPORT_LAYERS)
    assert (data["pooling"], data["padding"], data["opset"], data["input_name"]) == (
        "max",
        "zeros",
        18,
        "image",
    )
    assert data["normalization"]["name"] == "imagenet"
    assert data["torch_version"] == torch.__version__ and data["onnx_version"] == onnx.__version__


def test_onnx_model_has_named_outputs_and_dynamic_sizes(exported, arch):
    out, _ = exported
    model = onnx.load(str(out / onnx_filename(arch)), load_external_data=False)
    assert min(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
    session = ort.InferenceSession(str(out / onnx_filename(arch)), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == list(DEFAULT_EXPORT_LAYERS)
    channels = {"relu1_1": 64, "relu2_1": 128, "relu3_1": 256, "relu4_1": 512, "relu4_2": 512, "relu5_1": 512}
    scale = {"relu1_1": 1, "relu2_1": 2, "relu3_1": 4, "relu4_1": 8, "relu4_2": 8, "relu5_1": 16}
    for height, width in SIZES:
        results = session.run(None, {"image": image(height, width, batch=2).numpy()})
        for name, result in zip(DEFAULT_EXPORT_LAYERS, results, strict=True):
            expected = (2, channels[name], height // scale[name], width // scale[name])
            assert result.shape == expected, name
            assert result.dtype == np.float32


def test_parity_table_shows_every_layer_below_tolerance(exported):
    _, run = exported
    assert_every_layer_passes(run.stdout, TOLERANCE)
    assert "1x3x64x64" in run.stdout and "1x3x136x200" in run.stdout


def test_onnx_runtime_matches_torch(exported, arch, reference_module):
    out, _ = exported
    session = ort.InferenceSession(str(out / onnx_filename(arch)), providers=["CPUExecutionProvider"])
    for height, width in SIZES:
        x = image(height, width, seed=5)
        with torch.no_grad():
            reference = {k: v.numpy() for k, v in reference_module(x).items()}
        candidate = dict(zip(DEFAULT_EXPORT_LAYERS, session.run(None, {"image": x.numpy()}), strict=True))
        rows = compare(reference, candidate)
        assert len(rows) == 12
        assert all(row.relative_error < TOLERANCE for row in rows), rows


def test_round_trip_from_initializers_equals_exported_module(exported, arch, reference_module):
    out, _ = exported
    artifact = load_artifact(out)
    assert artifact.manifest.arch == arch and artifact.build_extractor().arch == arch
    original = random_state_dict(0, arch)
    # every conv, also those past relu5_1
    assert list(artifact.state_dict) == list(expected_shapes(arch))
    assert all(torch.equal(artifact.state_dict[k], original[k]) for k in original)
    deepest = LAYERS[Backbone(arch)][-2]  # relu5_4 / relu5_3
    x = image(40, 56, seed=9)
    with torch.no_grad():
        rebuilt, expected = artifact.build_extractor()(x), reference_module(x)
        assert all(torch.equal(rebuilt[k], expected[k]) for k in expected)
        deep = artifact.build_extractor(layers=[deepest], pooling="average")(x)[deepest]
        want = reference_module.configured(layers=[deepest], pooling="average")(x)[deepest]
        assert torch.equal(deep, want)


def test_a_model_dir_may_hold_both_arches(tmp_path_factory):
    vgg19, _ = export_once("vgg19", tmp_path_factory)
    vgg16, _ = export_once("vgg16", tmp_path_factory)
    both = tmp_path_factory.mktemp("both")
    for source, arch in ((vgg19, "vgg19"), (vgg16, "vgg16")):
        for name in (onnx_filename(arch), manifest_filename(arch)):
            (both / name).symlink_to(source / name)
    artifacts = load_artifacts(both)
    assert {arch: a.manifest.arch for arch, a in artifacts.items()} == {"vgg19": "vgg19", "vgg16": "vgg16"}
    assert load_artifact(both).manifest.arch == "vgg19"  # the default backbone when there are both
    assert load_artifact(both, "vgg16").onnx_path == both / "vgg16.onnx"
    run = run_cli("--check", str(both))
    assert run.returncode == 0, run.stderr
    assert f"{both}: vgg19," in run.stdout and f"{both}: vgg16," in run.stdout


def test_manifest_of_the_other_arch_is_refused(vgg19_export, tmp_path):
    out, _ = vgg19_export
    (tmp_path / "vgg16.json").write_text((out / MANIFEST_FILENAME).read_text())
    with pytest.raises(ArtifactError, match=r"vgg16.json describes a vgg19 model, not vgg16"):
        load_artifact(tmp_path)


def test_onnx_runtime_loads_the_artifact_without_warnings(exported, arch, capfd):
    out, _ = exported
    options = ort.SessionOptions()
    options.log_severity_level = 2  # warnings and up: an unused initializer would be one
    ort.InferenceSession(str(out / onnx_filename(arch)), options, providers=["CPUExecutionProvider"])
    assert "[W:onnxruntime" not in capfd.readouterr().err


def test_variant_export_round_trips_and_matches(tmp_path):
    """Average pooling, replicate padding, Caffe normalization and conv/pool taps survive the export."""
    weights = random_weights(7, CAFFE_NORMALIZATION)
    module = VGGFeatures(
        ["conv1_1", "relu3_2", "pool5"],
        pooling="average",
        padding="replicate",
        normalization=CAFFE_NORMALIZATION,
    ).load_weights(weights.state_dict)
    manifest = export_artifact(module, weights, tmp_path)
    artifact = load_artifact(tmp_path)
    assert artifact.manifest == manifest
    assert (manifest.pooling, manifest.padding, manifest.normalization) == (
        "average",
        "replicate",
        CAFFE_NORMALIZATION,
    )
    session = ort.InferenceSession(str(artifact.onnx_path), providers=["CPUExecutionProvider"])
    x = image(72, 96, seed=3)
    with torch.no_grad():
        expected = module(x)
        rebuilt = artifact.build_extractor()(x)
    assert all(torch.equal(rebuilt[k], expected[k]) for k in expected)
    candidate = dict(zip(manifest.output_names, session.run(None, {"image": x.numpy()}), strict=True))
    rows = compare({k: v.numpy() for k, v in expected.items()}, candidate)
    assert all(row.relative_error < TOLERANCE for row in rows), rows


def test_check_mode_verifies_an_existing_artifact(exported, arch):
    out, _ = exported
    run = run_cli("--check", str(out))
    assert run.returncode == 0, run.stderr
    assert "relu5_1" in run.stdout and "max relative error" in run.stdout and f"{out}: {arch}," in run.stdout


# --- bad input: one line on stderr, exit code 2, no traceback -------------------------------------


def test_unknown_layer(tmp_path):
    run = run_cli("--weights", "random", "--out", str(tmp_path / "m"), "--layers", "relu1_1", "relu6_1")
    assert_one_line_error(run, "unknown layer(s) relu6_1 for vgg19; valid: conv1_1 relu1_1")
    assert not (tmp_path / "m" / ONNX_FILENAME).exists()


def test_weights_file_with_wrong_keys(tmp_path):
    path = tmp_path / "wrong-keys.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3)}, path)
    run = run_cli("--weights", str(path), "--out", str(tmp_path / "m"))
    assert_one_line_error(
        run, f"weights file {path}: weights lack 32 VGG19 key(s), first 'features.0.weight'"
    )


def test_weights_file_with_wrong_shapes(tmp_path):
    path = tmp_path / "wrong-shapes.pth"
    torch.save({**random_state_dict(0), "features.10.weight": torch.zeros(256, 128, 1, 1)}, path)
    run = run_cli("--weights", str(path), "--out", str(tmp_path / "m"))
    assert_one_line_error(run, "'features.10.weight' has shape (256, 128, 1, 1), expected (256, 128, 3, 3)")


def test_weights_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"these are not the weights you are looking for")
    run = run_cli("--weights", str(path), "--out", str(tmp_path / "m"))
    assert_one_line_error(run, f"cannot read weights file {path} as a torch state dict")


def test_unwritable_out_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    run = run_cli("--weights", "random", "--out", str(blocker / "model"))
    assert_one_line_error(run, f"cannot write to output directory {blocker / 'model'}")


def copy_artifact(source: Path, target: Path, *, onnx_bytes: bytes | None = None) -> Path:
    """A model dir with the same manifest; the .onnx is linked, or replaced by `onnx_bytes`."""
    target.mkdir()
    (target / MANIFEST_FILENAME).write_text((source / MANIFEST_FILENAME).read_text())
    if onnx_bytes is None:
        (target / ONNX_FILENAME).symlink_to(source / ONNX_FILENAME)
    else:
        (target / ONNX_FILENAME).write_bytes(onnx_bytes)
    return target


def damaged(data: bytes, damage: str) -> bytes:
    if damage == "truncated":
        return data[: len(data) // 2]
    if damage == "garbage":
        return np.random.default_rng(0).bytes(4096)
    flipped = bytearray(data)  # one bit in the middle of the file: inside some weight's raw data
    flipped[len(data) // 2] ^= 0x10
    return bytes(flipped)


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        ("truncated", "vgg19.onnx is not a valid ONNX model"),
        ("garbage", "vgg19.onnx is not a valid ONNX model"),
        ("bitflip", "disagrees with vgg19.json's state_dict_sha256"),
    ],
)
def test_corrupt_onnx(vgg19_export, tmp_path, damage, fragment):
    out, _ = vgg19_export
    bad = damaged((out / ONNX_FILENAME).read_bytes(), damage)
    model_dir = copy_artifact(out, tmp_path / "model", onnx_bytes=bad)
    with pytest.raises(ArtifactError) as info:
        load_artifact(model_dir)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert_one_line_error(run_cli("--check", str(model_dir)), fragment)


def test_an_unreadable_onnx_is_reported_as_unreadable_not_corrupt(vgg19_export, tmp_path, monkeypatch):
    """Issue 16: a permission-denied .onnx was "not a valid ONNX model". (Tests run as root, for whom
    chmod denies nothing, so onnx.load itself is made to fail as it does for other users.)"""
    out, _ = vgg19_export
    model_dir = copy_artifact(out, tmp_path / "model")

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("stylize.model.artifact.onnx.load", denied)
    with pytest.raises(ArtifactError) as info:
        load_artifact(model_dir)
    assert "cannot read" in str(info.value) and "Permission denied" in str(info.value)
    assert "not a valid ONNX model" not in str(info.value)


def test_manifest_digest_disagreeing_with_weights(vgg19_export, tmp_path):
    out, _ = vgg19_export
    model_dir = copy_artifact(out, tmp_path / "model")
    data = json.loads((model_dir / MANIFEST_FILENAME).read_text())
    data["state_dict_sha256"] = state_dict_digest(random_state_dict(1))
    (model_dir / MANIFEST_FILENAME).write_text(json.dumps(data))
    assert_one_line_error(run_cli("--check", str(model_dir)), "disagrees with vgg19.json's state_dict_sha256")


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda d: d.pop("layers"), "vgg19.json is not a valid manifest: missing field 'layers'"),
        (lambda d: d.update(layers=["relu1_1", "relu9_1"]), "unknown layer(s) relu9_1"),
        (lambda d: d.update(pooling="l2"), "unknown pooling 'l2'; valid: max average"),
        (lambda d: d.update(output_names=["relu1_1"]), "has outputs ['relu1_1', 'relu2_1'"),
        (lambda d: d.update(format=99), "format 99 is not the supported 1"),
    ],
)
def test_bad_manifest(vgg19_export, tmp_path, edit, fragment):
    out, _ = vgg19_export
    model_dir = copy_artifact(out, tmp_path / "model")
    data = json.loads((model_dir / MANIFEST_FILENAME).read_text())
    edit(data)
    (model_dir / MANIFEST_FILENAME).write_text(json.dumps(data))
    with pytest.raises(ArtifactError) as info:
        load_artifact(model_dir)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_missing_files(vgg19_export, tmp_path):
    with pytest.raises(ArtifactError, match=r"holds no model \(vgg19.json or vgg16.json not found\); create"):
        load_artifact(tmp_path)
    with pytest.raises(ArtifactError, match=r"vgg16.json not found; create the artifact with stylize-export"):
        load_artifact(tmp_path, "vgg16")
    (tmp_path / MANIFEST_FILENAME).write_text((vgg19_export[0] / MANIFEST_FILENAME).read_text())
    with pytest.raises(ArtifactError, match=r"vgg19.onnx not found"):
        load_artifact(tmp_path)
    (tmp_path / MANIFEST_FILENAME).write_text("{not json")
    with pytest.raises(ArtifactError, match=r"vgg19.json is not a valid manifest"):
        load_artifact(tmp_path)
