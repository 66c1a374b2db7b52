"""Export a VGGFeatures module to the ONNX artifact (see artifact.py for the layout).

Uses torch's dynamo exporter (torch.export + onnxscript): it gives a clean graph of
Conv/Relu/MaxPool with named dynamic dims. Its optimizer merges identical initializers
(all-zero biases of random weights become one tensor, or vanish from Conv entirely), so
the exported graph is canonicalized afterwards: the k-th Conv node is the network's k-th conv,
its inputs are renamed `features.N.weight` / `features.N.bias` and set from the module's
own fp32 tensors, after checking the exporter's weight equals them bit for bit.
"""

from __future__ import annotations

import logging
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from stylize.model.artifact import (
    INPUT_NAME,
    Manifest,
    manifest_filename,
    onnx_filename,
    state_dict_digest,
)
from stylize.model.vgg import CONV_SHAPES, VGGFeatures
from stylize.model.weights import ResolvedWeights

MIN_OPSET = 18
DEFAULT_OPSET = 18
UNTAPPED_WEIGHTS_GRAPH = "vgg_untapped_weights"


class ExportError(RuntimeError):
    """The exporter produced something this module cannot vouch for; one-line message."""


def trace_to_onnx(extractor: VGGFeatures, opset: int) -> onnx.ModelProto:
    """The raw dynamo export: input `image` (batch, 3, height, width), one output per tapped layer."""
    side = extractor.min_side
    example = torch.rand(
        2, 3, max(64, 2 * side), max(64, 2 * side), generator=torch.Generator().manual_seed(0)
    )
    dims = {
        0: torch.export.Dim("batch"),
        2: torch.export.Dim("height", min=side),
        3: torch.export.Dim("width", min=side),
    }
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)  # "torchvision is not installed" notes concern ops we do not use
    try:
        with warnings.catch_warnings():
            # Deprecation notices from torch's own export internals, not about this code.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            program = torch.onnx.export(
                extractor.eval(),
                (example,),
                input_names=[INPUT_NAME],
                output_names=list(extractor.layers),
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=(dims,),
                optimize=True,
                verbose=False,
            )
    finally:
        onnx_logger.setLevel(level)
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    return program.model_proto


def canonicalize_weights(model: onnx.ModelProto, extractor: VGGFeatures) -> None:
    """Give every conv its own `features.N.*` initializers and store the untapped convs' weights too."""
    state = {k: v.detach().to(torch.float32).cpu().numpy() for k, v in extractor.state_dict().items()}
    graph = model.graph
    exported = {t.name: t for t in graph.initializer}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    conv_indices = sorted(CONV_SHAPES[extractor.arch])
    if len(convs) > len(conv_indices):
        raise ExportError(
            f"exported graph has {len(convs)} Conv nodes, {extractor.arch} has {len(conv_indices)}"
        )
    used: list[str] = []
    for node, index in zip(convs, conv_indices, strict=False):
        weight, bias = f"features.{index}.weight", f"features.{index}.bias"
        original = exported.get(node.input[1])
        if original is None or not np.array_equal(numpy_helper.to_array(original), state[weight]):
            raise ExportError(
                f"Conv node {node.name!r} does not carry {weight}; the export is not trustworthy"
            )
        del node.input[1:]
        node.input.extend([weight, bias])
        used += [weight, bias]
    consumed = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in consumed and t.name not in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + [numpy_helper.from_array(state[name], name) for name in used])
    untapped = [name for name in state if name not in used]
    if untapped:
        holder = helper.make_graph(
            [], UNTAPPED_WEIGHTS_GRAPH, [], [], [numpy_helper.from_array(state[n], n) for n in untapped]
        )
        info = onnx.TrainingInfoProto()
        info.initialization.CopyFrom(holder)
        model.training_info.append(info)


def export_artifact(
    extractor: VGGFeatures, weights: ResolvedWeights, out_dir: Path, *, opset: int = DEFAULT_OPSET
) -> Manifest:
    """Write `<arch>.onnx` and `<arch>.json` for `extractor` (already loaded with `weights`) into out_dir."""
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is below the supported minimum {MIN_OPSET}")
    model = trace_to_onnx(extractor, opset)
    canonicalize_weights(model, extractor)
    onnx.checker.check_model(model)
    onnx.save(model, str(out_dir / onnx_filename(extractor.arch)))
    manifest = Manifest(
        arch=extractor.arch.value,
        weights=weights.kind.value,
        weights_source=weights.source,
        weights_sha256=weights.sha256,
        state_dict_sha256=state_dict_digest(extractor.state_dict()),
        normalization=extractor.normalization,
        pooling=extractor.pooling.value,
        padding=extractor.padding.value,
        layers=extractor.layers,
        opset=opset,
        torch_version=torch.__version__,
        onnx_version=onnx.__version__,
        exported_at=datetime.now(UTC).isoformat(timespec="seconds"),
        input_name=INPUT_NAME,
        output_names=tuple(o.name for o in model.graph.output),
        weights_origin=weights.origin,
        weights_licence=weights.licence,
    )
    (out_dir / manifest_filename(extractor.arch)).write_text(manifest.to_json())
    return manifest
