"""Start-up of the compute side: the artifacts (one per backbone), the torch extractors, the ONNX Runtime
sessions, the parity probes, and running jobs on the workers (the jobs.Executor the JobManager drives).

Targets (style Grams, content features) come from ONNX Runtime when the job's network matches the
artifact's graph: same pooling and padding, and every requested layer among the graph's outputs. Any other
job (average pooling on a max-pooling artifact, a conv3_1 tap, ...) gets its targets from the torch
extractor, which can tap any layer with the same weights; Started.targets_backend says which was used.

Parity: at start-up a fixed probe image (seeded noise over a gradient, 96x128 so height and width differ)
goes through ONNX Runtime and through torch in fp32; every tapped layer and its Gram matrix must agree to
`--parity-tolerance` in relative error max|ort - torch| / max|torch|. The default 1e-3 leaves two orders
of magnitude of headroom over fp32 CPU (about 1e-6) while catching any real difference (a wrong weight or
constant moves errors to 1e-2 and beyond). TF32 is disabled on both sides for the probe: TF32 convs alone
reach 1e-3. A failed probe keeps the server NOT_SERVING unless --on-parity-failure=torch, which serves
with torch targets and says so in GetServerInfo and the metrics.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image

from stylize.api.options import (
    DEFAULTS,
    Backbone,
    FieldViolation,
    OptionsError,
    Precision,
    StyleOptions,
)
from stylize.model.artifact import Artifact, ArtifactError, Manifest, load_artifacts
from stylize.model.parity import ParityRow, compare, format_table
from stylize.model.vgg import VGGFeatures
from stylize.model.weights import file_sha256
from stylize.server.engine import precision
from stylize.server.engine.imageio import pil_to_tensor, tensor_to_pil
from stylize.server.engine.records import Progress, Result, Started
from stylize.server.engine.run import TargetFn, stylize, to_network_layout

from .config import ServerConfig
from .convert import JobRequest

log = logging.getLogger(__name__)

PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
# Shape range of TensorRT's optimization profile for `image`: the engine built once covers every job.
TRT_MIN_EDGE = 32
TRT_OPT_EDGE = 512
PROBE_HEIGHT, PROBE_WIDTH = 96, 128
TORCH_BACKEND = "torch"
T = TypeVar("T")


# On CUDA every Progress record reads its losses back to the host: a sync that drains the GPU's queue of
# work. One record every this many iterations (and at every preview and each scale's last iteration) keeps
# it off most iterations. On the CPU each iteration already ends with its results at hand.
CUDA_PROGRESS_EVERY = 10


def progress_every(device: torch.device) -> int:
    """How often the engine reports Progress for a job on `device`."""
    return CUDA_PROGRESS_EVERY if device.type == "cuda" else 1


class StartupError(Exception):
    """The server cannot start as configured; the message is one line."""


@dataclass(frozen=True)
class ParityReport:
    passed: bool
    tolerance: float
    # The backend compared against torch, e.g. "onnxruntime:CPUExecutionProvider".
    candidate: str
    # Where job targets come from: "onnxruntime", or "torch" after a failed probe with the torch fallback.
    targets_backend: str
    rows: tuple[ParityRow, ...]


def resolve_devices(device: str, workers: int) -> list[torch.device]:
    """The torch device of each worker: one per GPU (cuda:0..N-1 for --device cuda), else all on one."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise StartupError(f"--device {device}: torch sees no CUDA device")
        count = torch.cuda.device_count()
        if device == "cuda":
            if workers > count:
                log.warning("%d workers on %d GPU(s): some GPUs run several workers", workers, count)
            return [torch.device("cuda", index % count) for index in range(workers)]
        index = int(device.split(":")[1])
        if index >= count:
            raise StartupError(f"--device {device}: torch sees {count} CUDA device(s)")
        return [torch.device("cuda", index)] * workers
    return [torch.device("cpu")] * workers


def intra_op_threads(config: ServerConfig) -> int:
    """torch's intra-op threads: the operator's --threads, else the usable cores shared out between the
    workers (more threads than cores only make the workers' OpenMP pools fight)."""
    if config.threads:
        return config.threads
    return max(1, len(os.sched_getaffinity(0)) // config.workers)


def on_a_thread_of_its_own(work: Callable[[], T], name: str) -> T:
    """work() on a new thread that has ended when this returns; its result, or its exception raised here.

    Why torch's start-up work goes there: torch's CPU operators run on OpenMP (libgomp), which gives
    every thread that opens a parallel region a pool of team threads, kept until that thread ends, and
    counts the threads of all pools together. While they outnumber the usable cores, a waiting thread
    spins 100 times instead of 300000 (libgomp's defaults) before it sleeps on a futex, so every parallel
    region (many per optimizer iteration) pays a sleep and a wake-up on each of its threads. Start-up
    work done on the caller's thread (the server builds the Runtime on an asyncio executor thread, which
    lives on) would leave a pool beside each worker's: with one worker using every core, one too many.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=name) as executor:
        return executor.submit(work).result()  # leaving the block joins the thread


def provider_chain(config: ServerConfig, device: torch.device) -> list[tuple[str, dict[str, str]]]:
    """The ONNX Runtime providers to ask for, best first, with their options."""
    available = ort.get_available_providers()
    if config.providers == ("auto",):
        wanted = ["tensorrt", "cuda", "cpu"] if device.type == "cuda" else ["cpu"]
        names = [n for n in wanted if PROVIDER_NAMES[n] in available]
    else:
        missing = [n for n in config.providers if PROVIDER_NAMES[n] not in available]
        if missing:
            raise StartupError(
                f"--providers {','.join(config.providers)}: this onnxruntime build lacks {','.join(missing)} "
                f"(available: {', '.join(available)})"
            )
        names = list(config.providers)
    device_id = str(device.index or 0)
    max_edge = config.limits.max_size
    cache = config.trt_cache_dir or config.model_dir / "trt-cache"
    if "tensorrt" in names:
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StartupError(f"TensorRT engine cache {cache}: {error}; set --trt-cache-dir") from None
    options = {
        "tensorrt": {
            "device_id": device_id,
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": str(cache),
            # fp32: the parity probe holds ORT to torch's fp32 features.
            "trt_fp16_enable": "False",
            "trt_profile_min_shapes": f"image:1x3x{TRT_MIN_EDGE}x{TRT_MIN_EDGE}",
            "trt_profile_opt_shapes": f"image:1x3x{TRT_OPT_EDGE}x{TRT_OPT_EDGE}",
            "trt_profile_max_shapes": f"image:1x3x{max_edge}x{max_edge}",
        },
        # TF32 would cost parity (see the module docstring).
        "cuda": {"device_id": device_id, "use_tf32": "0"},
        "cpu": {},
    }
    return [(PROVIDER_NAMES[n], options[n]) for n in names]


def open_session(
    onnx_path: Path, chain: Sequence[tuple[str, dict[str, str]]], explicit: bool
) -> ort.InferenceSession:
    """Open the session and check which providers really run (ORT silently drops ones that fail to load)."""
    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session_options.log_severity_level = (
        3  # errors only: ORT's warnings about provider fallbacks are ours to report
    )
    try:
        session = ort.InferenceSession(
            str(onnx_path),
            sess_options=session_options,
            providers=[name for name, _ in chain],
            provider_options=[options for _, options in chain],
        )
    except Exception as error:
        raise StartupError(
            f"ONNX Runtime cannot open {onnx_path}: {' '.join(str(error).split())[:300]}"
        ) from None
    running = session.get_providers()
    dropped = [name for name, _ in chain if name not in running]
    if dropped and explicit:
        raise StartupError(
            f"--providers asked for {', '.join(n for n, _ in chain)}; ONNX Runtime runs {', '.join(running)}"
        )
    if dropped:
        log.warning("ONNX Runtime could not enable %s; running %s", ", ".join(dropped), ", ".join(running))
    return session


def probe_image() -> np.ndarray:
    """A fixed 1x3xHxW image in [0, 1]: seeded noise over a gradient (texture at every layer's scale)."""
    noise = np.random.default_rng(0).random((1, 3, PROBE_HEIGHT, PROBE_WIDTH), dtype=np.float32)
    ramp = np.linspace(0.0, 1.0, PROBE_WIDTH, dtype=np.float32)[None, None, None, :]
    return (0.5 * noise + 0.5 * ramp).astype(np.float32)


def torch_features(extractor: VGGFeatures, image: np.ndarray, device: torch.device) -> dict[str, np.ndarray]:
    """fp32 features of the artifact's layers, TF32 off (the reference side of the parity probe)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            features = extractor(torch.from_numpy(image).to(device))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return {name: value.float().cpu().numpy() for name, value in features.items()}


def run_parity_probe(
    session: ort.InferenceSession, extractor: VGGFeatures, device: torch.device, tolerance: float
) -> tuple[bool, str, list[ParityRow]]:
    """(passed, candidate backend name, rows)."""
    image = probe_image()
    layers = list(extractor.layers)
    candidate = dict(zip(layers, session.run(layers, {session.get_inputs()[0].name: image}), strict=True))
    rows = compare(torch_features(extractor, image, device), candidate)
    passed = all(row.passed(tolerance) for row in rows)
    return passed, f"onnxruntime:{session.get_providers()[0]}", rows


class OrtTargets:
    """A TargetFn backed by the ONNX Runtime session: forward-only features of the requested layers.

    Inputs and outputs go through host memory; targets are computed once per style image and scale, so the
    copies are a negligible part of a job.
    """

    def __init__(self, session: ort.InferenceSession, layers: Sequence[str], device: torch.device):
        self._session = session
        self._input = session.get_inputs()[0].name
        self._layers = list(layers)
        self._device = device

    def __call__(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        array = image.detach().to("cpu", torch.float32).contiguous().numpy()
        outputs = self._session.run(self._layers, {self._input: array})
        return {
            name: torch.from_numpy(out).to(self._device)
            for name, out in zip(self._layers, outputs, strict=True)
        }


@dataclass(frozen=True)
class Model:
    """One artifact being served: per worker its torch extractor and ONNX Runtime session (workers on
    the same device share both), and the parity of every device's pair."""

    artifact: Artifact
    onnx_sha256: str
    extractors: tuple[VGGFeatures, ...]
    sessions: tuple[ort.InferenceSession, ...]
    parity: ParityReport

    @property
    def manifest(self) -> Manifest:
        return self.artifact.manifest

    @property
    def providers(self) -> list[str]:
        return self.sessions[0].get_providers()


class Runtime:
    """Everything the workers compute with; implements jobs.Executor.

    Serves every artifact of the model directory (a VGG19 and a VGG16 one side by side): a job's
    `backbone` option picks the model. Each model has its own session and parity probe; the server is
    ready only when every model is.
    """

    def __init__(self, config: ServerConfig):
        self.config = config
        self.threads = intra_op_threads(config)
        # torch keeps one count for the process, which threads started later take up, and sets the
        # calling thread's OpenMP count.
        torch.set_num_threads(self.threads)
        on_a_thread_of_its_own(self._start_up, "stylize-startup")

    def _start_up(self) -> None:
        """Everything the Runtime loads and probes: all of its start-up's torch work."""
        config = self.config
        try:
            artifacts = load_artifacts(config.model_dir)
        except ArtifactError as error:
            raise StartupError(str(error)) from None
        for arch, artifact in artifacts.items():
            digest = artifact.manifest.state_dict_sha256  # load_artifact checked it against the .onnx
            if config.expect_weights_sha256 and digest not in config.expect_weights_sha256:
                raise StartupError(
                    f"{arch} weights have state_dict_sha256 {digest}, not one --expect-weights-sha256 allows"
                )
        self.devices = resolve_devices(config.device, config.workers)
        self.models: dict[Backbone, Model] = {
            arch: self._load(artifact) for arch, artifact in artifacts.items()
        }
        # The model of the default backbone when it is served, else the only one: what ServerInfo.model shows.
        self.default = self.models.get(DEFAULTS.backbone) or next(iter(self.models.values()))
        # What AUTO means on each device, probed now so that no job pays for it and ServerInfo can say.
        self.auto_precision: dict[str, precision.PrecisionChoice] = {
            str(device): precision.resolve(Precision.AUTO, device, extractor)
            for device, extractor in zip(self.devices, self.default.extractors, strict=True)
        }

    def _load(self, artifact: Artifact) -> Model:
        # One extractor and one ONNX Runtime session per distinct device, shared by that device's workers
        # (both are re-entrant): each worker's targets are computed on its own GPU.
        pairs: dict[torch.device, tuple[VGGFeatures, ort.InferenceSession]] = {}
        explicit = self.config.providers != ("auto",)
        for device in self.devices:
            if device not in pairs:
                chain = provider_chain(self.config, device)
                # Weights in the engine's layout now, so that no job converts them (nor AUTO's bf16 copy).
                extractor = artifact.build_extractor().to(device)
                to_network_layout(extractor)
                pairs[device] = (
                    extractor.eval(),
                    open_session(artifact.onnx_path, chain, explicit=explicit),
                )
        parity = self._check_parity(artifact.manifest.arch, pairs)
        return Model(
            artifact,
            file_sha256(artifact.onnx_path),
            tuple(pairs[device][0] for device in self.devices),
            tuple(pairs[device][1] for device in self.devices),
            parity,
        )

    def _check_parity(
        self, arch: str, pairs: dict[torch.device, tuple[VGGFeatures, ort.InferenceSession]]
    ) -> ParityReport:
        """Every device's session against its torch extractor; the report keeps each row's worst error."""
        tolerance = self.config.parity_tolerance
        worst: dict[tuple[str, str], ParityRow] = {}
        passed, candidate = True, ""
        for device, (extractor, session) in pairs.items():
            device_passed, candidate, rows = run_parity_probe(session, extractor, device, tolerance)
            passed = passed and device_passed
            for row in rows:
                key = (row.layer, row.quantity)
                if key not in worst or not row.relative_error <= worst[key].relative_error:  # NaN wins
                    worst[key] = row
        rows = list(worst.values())
        table = format_table(rows, tolerance)
        if passed:
            log.info("%s parity probe passed (%s vs torch):\n%s", arch, candidate, table)
            backend = "onnxruntime"
        elif self.config.on_parity_failure == "torch":
            log.error(
                "%s parity probe FAILED (%s vs torch); serving with torch targets:\n%s",
                arch,
                candidate,
                table,
            )
            backend = TORCH_BACKEND
        else:
            log.error("%s parity probe FAILED (%s vs torch); NOT_SERVING:\n%s", arch, candidate, table)
            backend = TORCH_BACKEND
        return ParityReport(passed, tolerance, candidate, backend, tuple(rows))

    @property
    def ready(self) -> bool:
        """Whether jobs may run: every model's probe passed, or the operator chose the torch fallback."""
        return (
            all(model.parity.passed for model in self.models.values())
            or self.config.on_parity_failure == "torch"
        )

    def check_backbone(self, options: StyleOptions) -> None:
        """OptionsError naming options.backbone when this server does not serve the job's backbone."""
        if options.backbone not in self.models:
            served = " ".join(self.models)
            raise OptionsError(
                [
                    FieldViolation(
                        "options.backbone", f"{options.backbone} is not served here; available: {served}"
                    )
                ]
            )

    def _targets(self, model: Model, options: StyleOptions, worker: int) -> tuple[TargetFn | None, str]:
        layers = list(dict.fromkeys(name for name, _ in (*options.content_layers, *options.style_layers)))
        manifest = model.manifest
        use_ort = (
            model.parity.targets_backend == "onnxruntime"
            and options.pooling == manifest.pooling
            and options.padding == manifest.padding
            and set(layers) <= set(manifest.output_names)
        )
        if not use_ort:
            return None, TORCH_BACKEND
        session = model.sessions[worker]
        return OrtTargets(session, layers, self.devices[worker]), f"onnxruntime:{session.get_providers()[0]}"

    # ------------------------------------------------------------ jobs.Executor

    def device_name(self, worker: int) -> str:
        return str(self.devices[worker])

    def run(
        self, request: JobRequest, cancel: threading.Event, worker: int
    ) -> tuple[str, Iterator[Started | Progress | Result]]:
        # On the worker's thread, before the job's torch work: OpenMP keeps a thread count per thread, and
        # a new thread has OpenMP's default (one per core) until torch's parallel code first runs on it.
        torch.set_num_threads(self.threads)
        self.check_backbone(request.options)
        model = self.models[Backbone(request.options.backbone)]
        targets, backend = self._targets(model, request.options, worker)
        records = stylize(
            pil_to_tensor(request.content),
            [(pil_to_tensor(image), weight) for image, weight in request.styles],
            request.checked,
            model.extractors[worker],
            device=self.devices[worker],
            targets=targets,
            preview_every=request.preview.every,
            preview_max_size=request.preview.max_size,
            cancel=cancel,
            limits=self.config.limits,
            progress_every=progress_every(self.devices[worker]),
        )
        return backend, records

    def to_image(self, tensor: object) -> Image.Image:
        assert isinstance(tensor, torch.Tensor)
        return tensor_to_pil(tensor)

    def release_memory(self, worker: int) -> None:
        if self.devices[worker].type == "cuda":
            torch.cuda.empty_cache()
