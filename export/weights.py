"""Where the VGG weights come from: `--weights imagenet | caffe | random | auto | PATH`, per `--arch`.

Downloads go through torch.hub into its cache (`$TORCH_HOME/hub/checkpoints`), with
the sha256 prefix in the file name checked on download, and checked again here for a
file already in the cache (torch.hub trusts its cache blindly). Whatever is resolved
carries its kind, source and file digest so the manifest can say exactly what was used.
"""

from __future__ import annotations

import hashlib
import re
import socket
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TextIO
from urllib.error import URLError

import torch
from torch import Tensor

from stylize.export.vgg import (
    CAFFE_NORMALIZATION,
    IMAGENET_NORMALIZATION,
    ModelError,
    Normalization,
    random_state_dict,
    validate_state_dict,
)
from stylize.server.engine.options import Backbone

# The classifier head of a full VGG checkpoint; style transfer needs only `features.*`.
CLASSIFIER_PREFIX = "classifier."
# A dead network must fail the export, not hang it: applies to each socket operation.
DOWNLOAD_TIMEOUT_S = 60.0
CHOICES = "--weights takes imagenet, caffe, random, auto or a PATH to a .pth state dict"


class WeightsError(ValueError):
    """Weights that cannot be had or used; the message is one line naming the file or URL."""


class WeightsKind(StrEnum):
    IMAGENET = "imagenet"
    CAFFE = "caffe"
    FILE = "file"
    RANDOM = "random"


@dataclass(frozen=True)
class RemoteWeights:
    """A published checkpoint; the file name ends in `-<sha256 prefix>.pth`, torch.hub's convention."""

    kind: WeightsKind
    url: str
    normalization: Normalization

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def hash_prefix(self) -> str:
        match = re.search(r"-([a-f0-9]+)\.", self.filename)
        if match is None:
            raise WeightsError(f"{self.url} has no sha256 prefix in its file name")
        return match.group(1)


REMOTE_WEIGHTS: dict[Backbone, dict[str, RemoteWeights]] = {
    Backbone.VGG19: {
        # torchvision's VGG19 (ImageNet, RGB mean/std normalization).
        "imagenet": RemoteWeights(
            WeightsKind.IMAGENET,
            "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
            IMAGENET_NORMALIZATION,
        ),
        # The original Caffe VGG19 converted to torchvision's layout, as neural-style-pt downloads it.
        "caffe": RemoteWeights(
            WeightsKind.CAFFE,
            "https://web.eecs.umich.edu/~justincj/models/vgg19-d01eb7cb.pth",
            CAFFE_NORMALIZATION,
        ),
    },
    Backbone.VGG16: {
        # torchvision's VGG16.
        "imagenet": RemoteWeights(
            WeightsKind.IMAGENET,
            "https://download.pytorch.org/models/vgg16-397923af.pth",
            IMAGENET_NORMALIZATION,
        ),
        # The Caffe VGG16 in torchvision's layout (jcjohnson/pytorch-vgg; fast-neural-style's network).
        "caffe": RemoteWeights(
            WeightsKind.CAFFE,
            "https://web.eecs.umich.edu/~justincj/models/vgg16-00b39a1b.pth",
            CAFFE_NORMALIZATION,
        ),
    },
}


@dataclass(frozen=True)
class ResolvedWeights:
    kind: WeightsKind
    source: str  # URL, file path, or "seed=N"
    sha256: str | None  # of the file the weights were read from; None for random weights
    normalization: Normalization
    state_dict: dict[str, Tensor]


def one_line(error: BaseException) -> str:
    """An exception's message as a single line, for error messages built around it."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def features_state_dict(loaded: object, origin: str, arch: str) -> dict[str, Tensor]:
    """The `features.*` tensors of a loaded checkpoint as fp32, or WeightsError naming `origin`."""
    if not isinstance(loaded, Mapping):
        raise WeightsError(f"{origin} holds a {type(loaded).__name__}, not a state dict")
    state = {k: v for k, v in loaded.items() if not str(k).startswith(CLASSIFIER_PREFIX)}
    try:
        validate_state_dict(state, arch)
    except ModelError as error:
        raise WeightsError(f"{origin}: {error}") from None
    return {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}


def random_weights(
    seed: int, normalization: Normalization = IMAGENET_NORMALIZATION, arch: str = Backbone.VGG19
) -> ResolvedWeights:
    state = random_state_dict(seed, arch)
    return ResolvedWeights(WeightsKind.RANDOM, f"seed={seed}", None, normalization, state)


def load_file(
    path: Path, normalization: Normalization = IMAGENET_NORMALIZATION, arch: str = Backbone.VGG19
) -> ResolvedWeights:
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} not found; {CHOICES}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load fails in many ways on a bad file; all mean "unreadable"
        reason = f"{type(error).__name__}: {one_line(error)}"
        raise WeightsError(f"cannot read weights file {path} as a torch state dict ({reason})") from None
    state = features_state_dict(loaded, f"weights file {path}", arch)
    return ResolvedWeights(WeightsKind.FILE, str(path.resolve()), file_sha256(path), normalization, state)


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def fetch(remote: RemoteWeights, arch: str = Backbone.VGG19) -> ResolvedWeights:
    """The published checkpoint from the torch.hub cache, downloading it there first if needed."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / remote.filename
    if cached.is_file() and not file_sha256(cached).startswith(remote.hash_prefix):
        raise WeightsError(f"cached {cached} does not match sha256 prefix {remote.hash_prefix}; delete it")
    try:
        # torch.hub reports "Downloading ..." (and its progress bar) on stderr; that is progress, not
        # an error, and stderr is kept for the one-line error when something fails.
        with _socket_timeout(DOWNLOAD_TIMEOUT_S), redirect_stderr(sys.stdout):
            loaded = torch.hub.load_state_dict_from_url(
                remote.url,
                map_location="cpu",
                check_hash=True,
                progress=sys.stdout.isatty(),
                weights_only=True,
            )
    except (URLError, OSError) as error:  # URLError, HTTPError, timeouts, refused connections
        raise WeightsError(
            f"cannot download {remote.url} to {cached} ({one_line(error)}); offline, use --weights random "
            f"or copy the file there or pass its PATH"
        ) from None
    except RuntimeError as error:
        if "invalid hash value" in str(error):
            raise WeightsError(f"{remote.url} failed its sha256 check: {one_line(error)}") from None
        raise WeightsError(f"cannot read {cached}: {one_line(error)}; delete it and retry") from None
    state = features_state_dict(loaded, str(cached), arch)
    return ResolvedWeights(remote.kind, remote.url, file_sha256(cached), remote.normalization, state)


def warn_random_fallback(reason: str, seed: int, arch: str, stream: TextIO) -> None:
    bar = "!" * 78
    print(
        f"{bar}\n"
        f"WARNING: --weights auto could not get the ImageNet {arch.upper()} weights:\n  {reason}\n"
        f"WARNING: exporting RANDOM weights (seed {seed}). Style transfer with them produces noise,\n"
        f"not art. The manifest, GetServerInfo and metrics will all say weights=random.\n"
        f"{bar}",
        file=stream,
    )


def resolve_weights(
    spec: str,
    *,
    arch: str = Backbone.VGG19,
    seed: int = 0,
    normalization: Normalization | None = None,
    warn: TextIO = sys.stderr,
) -> ResolvedWeights:
    """Resolve a `--weights` value for `arch`. `normalization` overrides the default for a PATH or random
    weights."""
    published = REMOTE_WEIGHTS[Backbone(arch)]
    if spec in published:
        remote = published[spec]
        if normalization is not None and normalization != remote.normalization:
            raise WeightsError(f"--weights {spec} needs normalization {remote.normalization.name}")
        return fetch(remote, arch)
    if spec == "auto":
        try:
            return fetch(published["imagenet"], arch)
        except WeightsError as error:
            warn_random_fallback(str(error), seed, arch, warn)
            return random_weights(seed, normalization or IMAGENET_NORMALIZATION, arch)
    if spec == WeightsKind.RANDOM:
        return random_weights(seed, normalization or IMAGENET_NORMALIZATION, arch)
    return load_file(Path(spec), normalization or IMAGENET_NORMALIZATION, arch)
