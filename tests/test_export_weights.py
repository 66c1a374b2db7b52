"""`--weights` resolution up to the network call: the cache, the hash check, offline errors, files.

Nothing here touches the network: downloads are either `file://` URLs (urllib serves them
through the same torch.hub code path) or a downloader monkeypatched to fail like DNS does offline.
"""

from __future__ import annotations

import io
from pathlib import Path
from urllib.error import URLError

import pytest
import torch

from stylize.export import weights as weights_module
from stylize.export.vgg import CAFFE_NORMALIZATION, IMAGENET_NORMALIZATION, random_state_dict
from stylize.export.weights import (
    REMOTE_WEIGHTS,
    RemoteWeights,
    WeightsError,
    WeightsKind,
    fetch,
    file_sha256,
    resolve_weights,
)


@pytest.fixture(autouse=True)
def torch_home(tmp_path, monkeypatch) -> Path:
    """A private torch hub cache, so tests neither read nor fill the real one."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path / "torch-home" / "hub" / "checkpoints"


@pytest.fixture
def offline(monkeypatch) -> None:
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


def test_auto_falls_back_to_random_loudly(offline):
    warning = io.StringIO()
    resolved = resolve_weights("auto", seed=5, warn=warning)
    assert (resolved.kind, resolved.source, resolved.sha256) == ("random", "seed=5", None)
    assert torch.equal(resolved.state_dict["features.0.weight"], random_state_dict(5)["features.0.weight"])
    text = warning.getvalue()
    assert "WARNING" in text and "RANDOM weights (seed 5)" in text and "vgg19-dcbb9e9d.pth" in text


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
        WeightsError, match=r"weights file '.*imagent' not found; --weights takes imagenet, caffe"
    ):
        resolve_weights(str(tmp_path / "imagent"))


def test_normalization_is_fixed_for_published_weights(offline):
    with pytest.raises(WeightsError, match=r"--weights imagenet needs normalization imagenet"):
        resolve_weights("imagenet", normalization=CAFFE_NORMALIZATION)
