from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_FORMAT_UNSPECIFIED: _ClassVar[ImageFormat]
    IMAGE_FORMAT_PNG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_JPEG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_WEBP: _ClassVar[ImageFormat]

class StyleLoss(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STYLE_LOSS_UNSPECIFIED: _ClassVar[StyleLoss]
    STYLE_LOSS_GRAM: _ClassVar[StyleLoss]
    STYLE_LOSS_MEAN_COVARIANCE: _ClassVar[StyleLoss]

class LossNormalization(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOSS_NORMALIZATION_UNSPECIFIED: _ClassVar[LossNormalization]
    LOSS_NORMALIZATION_RELATIVE: _ClassVar[LossNormalization]
    LOSS_NORMALIZATION_GATYS: _ClassVar[LossNormalization]
    LOSS_NORMALIZATION_POSITIONS: _ClassVar[LossNormalization]

class StyleResize(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STYLE_RESIZE_UNSPECIFIED: _ClassVar[StyleResize]
    STYLE_RESIZE_KEEP_ASPECT: _ClassVar[StyleResize]
    STYLE_RESIZE_MATCH_OUTPUT: _ClassVar[StyleResize]

class Backbone(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKBONE_UNSPECIFIED: _ClassVar[Backbone]
    BACKBONE_VGG19: _ClassVar[Backbone]
    BACKBONE_VGG16: _ClassVar[Backbone]

class Optimizer(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPTIMIZER_UNSPECIFIED: _ClassVar[Optimizer]
    OPTIMIZER_LBFGS: _ClassVar[Optimizer]
    OPTIMIZER_ADAM: _ClassVar[Optimizer]

class Init(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INIT_UNSPECIFIED: _ClassVar[Init]
    INIT_CONTENT: _ClassVar[Init]
    INIT_NOISE: _ClassVar[Init]
    INIT_GRAY: _ClassVar[Init]
    INIT_STYLE_STATS: _ClassVar[Init]

class ColorMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COLOR_MODE_UNSPECIFIED: _ClassVar[ColorMode]
    COLOR_MODE_NONE: _ClassVar[ColorMode]
    COLOR_MODE_LUMINANCE: _ClassVar[ColorMode]
    COLOR_MODE_HISTOGRAM: _ClassVar[ColorMode]

class Pooling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POOLING_UNSPECIFIED: _ClassVar[Pooling]
    POOLING_MAX: _ClassVar[Pooling]
    POOLING_AVERAGE: _ClassVar[Pooling]

class Padding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PADDING_UNSPECIFIED: _ClassVar[Padding]
    PADDING_ZEROS: _ClassVar[Padding]
    PADDING_REPLICATE: _ClassVar[Padding]

class Precision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRECISION_UNSPECIFIED: _ClassVar[Precision]
    PRECISION_AUTO: _ClassVar[Precision]
    PRECISION_FP32: _ClassVar[Precision]
    PRECISION_BF16: _ClassVar[Precision]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
IMAGE_FORMAT_UNSPECIFIED: ImageFormat
IMAGE_FORMAT_PNG: ImageFormat
IMAGE_FORMAT_JPEG: ImageFormat
IMAGE_FORMAT_WEBP: ImageFormat
STYLE_LOSS_UNSPECIFIED: StyleLoss
STYLE_LOSS_GRAM: StyleLoss
STYLE_LOSS_MEAN_COVARIANCE: StyleLoss
LOSS_NORMALIZATION_UNSPECIFIED: LossNormalization
LOSS_NORMALIZATION_RELATIVE: LossNormalization
LOSS_NORMALIZATION_GATYS: LossNormalization
LOSS_NORMALIZATION_POSITIONS: LossNormalization
STYLE_RESIZE_UNSPECIFIED: StyleResize
STYLE_RESIZE_KEEP_ASPECT: StyleResize
STYLE_RESIZE_MATCH_OUTPUT: StyleResize
BACKBONE_UNSPECIFIED: Backbone
BACKBONE_VGG19: Backbone
BACKBONE_VGG16: Backbone
OPTIMIZER_UNSPECIFIED: Optimizer
OPTIMIZER_LBFGS: Optimizer
OPTIMIZER_ADAM: Optimizer
INIT_UNSPECIFIED: Init
INIT_CONTENT: Init
INIT_NOISE: Init
INIT_GRAY: Init
INIT_STYLE_STATS: Init
COLOR_MODE_UNSPECIFIED: ColorMode
COLOR_MODE_NONE: ColorMode
COLOR_MODE_LUMINANCE: ColorMode
COLOR_MODE_HISTOGRAM: ColorMode
POOLING_UNSPECIFIED: Pooling
POOLING_MAX: Pooling
POOLING_AVERAGE: Pooling
PADDING_UNSPECIFIED: Padding
PADDING_ZEROS: Padding
PADDING_REPLICATE: Padding
PRECISION_UNSPECIFIED: Precision
PRECISION_AUTO: Precision
PRECISION_FP32: Precision
PRECISION_BF16: Precision
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class StylizeRequest(_message.Message):
    __slots__ = ("content_image", "styles", "options", "preview", "output_format", "client_tag", "preset")
    CONTENT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    STYLES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TAG_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    content_image: bytes
    styles: _containers.RepeatedCompositeFieldContainer[StyleImage]
    options: StyleOptions
    preview: PreviewOptions
    output_format: ImageFormat
    client_tag: str
    preset: str
    def __init__(self, content_image: _Optional[bytes] = ..., styles: _Optional[_Iterable[_Union[StyleImage, _Mapping]]] = ..., options: _Optional[_Union[StyleOptions, _Mapping]] = ..., preview: _Optional[_Union[PreviewOptions, _Mapping]] = ..., output_format: _Optional[_Union[ImageFormat, str]] = ..., client_tag: _Optional[str] = ..., preset: _Optional[str] = ...) -> None: ...

class StyleImage(_message.Message):
    __slots__ = ("image", "weight")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    weight: float
    def __init__(self, image: _Optional[bytes] = ..., weight: _Optional[float] = ...) -> None: ...

class LayerWeight(_message.Message):
    __slots__ = ("layer", "weight")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    layer: str
    weight: float
    def __init__(self, layer: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class StyleOptions(_message.Message):
    __slots__ = ("size", "min_size", "scale_factor", "iterations", "initial_iterations", "content_weight", "style_weight", "tv_weight", "content_layers", "style_layers", "style_loss", "loss_normalization", "optimizer", "learning_rate", "ema_decay", "lbfgs_history", "init", "seed", "style_scale", "color", "style_resize", "backbone", "pooling", "padding", "precision", "tile_size", "tile_halo")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MIN_SIZE_FIELD_NUMBER: _ClassVar[int]
    SCALE_FACTOR_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    STYLE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TV_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CONTENT_LAYERS_FIELD_NUMBER: _ClassVar[int]
    STYLE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    STYLE_LOSS_FIELD_NUMBER: _ClassVar[int]
    LOSS_NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    EMA_DECAY_FIELD_NUMBER: _ClassVar[int]
    LBFGS_HISTORY_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STYLE_SCALE_FIELD_NUMBER: _ClassVar[int]
    COLOR_FIELD_NUMBER: _ClassVar[int]
    STYLE_RESIZE_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    TILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    TILE_HALO_FIELD_NUMBER: _ClassVar[int]
    size: int
    min_size: int
    scale_factor: float
    iterations: int
    initial_iterations: int
    content_weight: float
    style_weight: float
    tv_weight: float
    content_layers: _containers.RepeatedCompositeFieldContainer[LayerWeight]
    style_layers: _containers.RepeatedCompositeFieldContainer[LayerWeight]
    style_loss: StyleLoss
    loss_normalization: LossNormalization
    optimizer: Optimizer
    learning_rate: float
    ema_decay: float
    lbfgs_history: int
    init: Init
    seed: int
    style_scale: float
    color: ColorMode
    style_resize: StyleResize
    backbone: Backbone
    pooling: Pooling
    padding: Padding
    precision: Precision
    tile_size: int
    tile_halo: int
    def __init__(self, size: _Optional[int] = ..., min_size: _Optional[int] = ..., scale_factor: _Optional[float] = ..., iterations: _Optional[int] = ..., initial_iterations: _Optional[int] = ..., content_weight: _Optional[float] = ..., style_weight: _Optional[float] = ..., tv_weight: _Optional[float] = ..., content_layers: _Optional[_Iterable[_Union[LayerWeight, _Mapping]]] = ..., style_layers: _Optional[_Iterable[_Union[LayerWeight, _Mapping]]] = ..., style_loss: _Optional[_Union[StyleLoss, str]] = ..., loss_normalization: _Optional[_Union[LossNormalization, str]] = ..., optimizer: _Optional[_Union[Optimizer, str]] = ..., learning_rate: _Optional[float] = ..., ema_decay: _Optional[float] = ..., lbfgs_history: _Optional[int] = ..., init: _Optional[_Union[Init, str]] = ..., seed: _Optional[int] = ..., style_scale: _Optional[float] = ..., color: _Optional[_Union[ColorMode, str]] = ..., style_resize: _Optional[_Union[StyleResize, str]] = ..., backbone: _Optional[_Union[Backbone, str]] = ..., pooling: _Optional[_Union[Pooling, str]] = ..., padding: _Optional[_Union[Padding, str]] = ..., precision: _Optional[_Union[Precision, str]] = ..., tile_size: _Optional[int] = ..., tile_halo: _Optional[int] = ...) -> None: ...

class PreviewOptions(_message.Message):
    __slots__ = ("every", "max_size", "format", "quality")
    EVERY_FIELD_NUMBER: _ClassVar[int]
    MAX_SIZE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    every: int
    max_size: int
    format: ImageFormat
    quality: int
    def __init__(self, every: _Optional[int] = ..., max_size: _Optional[int] = ..., format: _Optional[_Union[ImageFormat, str]] = ..., quality: _Optional[int] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "watch_token")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WATCH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    watch_token: str
    def __init__(self, job_id: _Optional[str] = ..., watch_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SubmitJobResponse(_message.Message):
    __slots__ = ("job_id", "queue_position", "watch_token")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    WATCH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    queue_position: int
    watch_token: str
    def __init__(self, job_id: _Optional[str] = ..., queue_position: _Optional[int] = ..., watch_token: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    def __init__(self, state: _Optional[_Union[JobState, str]] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "sequence", "elapsed_seconds", "client_tag", "queued", "started", "progress", "completed", "retrying")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TAG_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    RETRYING_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    sequence: int
    elapsed_seconds: float
    client_tag: str
    queued: Queued
    started: Started
    progress: Progress
    completed: Completed
    retrying: Retrying
    def __init__(self, job_id: _Optional[str] = ..., sequence: _Optional[int] = ..., elapsed_seconds: _Optional[float] = ..., client_tag: _Optional[str] = ..., queued: _Optional[_Union[Queued, _Mapping]] = ..., started: _Optional[_Union[Started, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., completed: _Optional[_Union[Completed, _Mapping]] = ..., retrying: _Optional[_Union[Retrying, _Mapping]] = ...) -> None: ...

class Retrying(_message.Message):
    __slots__ = ("attempt", "max_attempts", "reason")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    attempt: int
    max_attempts: int
    reason: str
    def __init__(self, attempt: _Optional[int] = ..., max_attempts: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Queued(_message.Message):
    __slots__ = ("position",)
    POSITION_FIELD_NUMBER: _ClassVar[int]
    position: int
    def __init__(self, position: _Optional[int] = ...) -> None: ...

class Started(_message.Message):
    __slots__ = ("device", "scales", "iterations_total", "targets_backend", "precision", "precision_reason", "warnings", "attempt")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TARGETS_BACKEND_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    PRECISION_REASON_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    device: str
    scales: _containers.RepeatedCompositeFieldContainer[Size]
    iterations_total: int
    targets_backend: str
    precision: str
    precision_reason: str
    warnings: _containers.RepeatedScalarFieldContainer[str]
    attempt: int
    def __init__(self, device: _Optional[str] = ..., scales: _Optional[_Iterable[_Union[Size, _Mapping]]] = ..., iterations_total: _Optional[int] = ..., targets_backend: _Optional[str] = ..., precision: _Optional[str] = ..., precision_reason: _Optional[str] = ..., warnings: _Optional[_Iterable[str]] = ..., attempt: _Optional[int] = ...) -> None: ...

class Size(_message.Message):
    __slots__ = ("width", "height")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class Losses(_message.Message):
    __slots__ = ("total", "content", "style", "total_variation")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    STYLE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_VARIATION_FIELD_NUMBER: _ClassVar[int]
    total: float
    content: float
    style: float
    total_variation: float
    def __init__(self, total: _Optional[float] = ..., content: _Optional[float] = ..., style: _Optional[float] = ..., total_variation: _Optional[float] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("iteration", "iterations_total", "scale", "scales", "size", "losses", "eta_seconds", "preview")
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    iterations_total: int
    scale: int
    scales: int
    size: Size
    losses: Losses
    eta_seconds: float
    preview: EncodedImage
    def __init__(self, iteration: _Optional[int] = ..., iterations_total: _Optional[int] = ..., scale: _Optional[int] = ..., scales: _Optional[int] = ..., size: _Optional[_Union[Size, _Mapping]] = ..., losses: _Optional[_Union[Losses, _Mapping]] = ..., eta_seconds: _Optional[float] = ..., preview: _Optional[_Union[EncodedImage, _Mapping]] = ...) -> None: ...

class Completed(_message.Message):
    __slots__ = ("image", "losses", "iterations", "run_seconds", "queue_seconds")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    RUN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    image: EncodedImage
    losses: Losses
    iterations: int
    run_seconds: float
    queue_seconds: float
    def __init__(self, image: _Optional[_Union[EncodedImage, _Mapping]] = ..., losses: _Optional[_Union[Losses, _Mapping]] = ..., iterations: _Optional[int] = ..., run_seconds: _Optional[float] = ..., queue_seconds: _Optional[float] = ...) -> None: ...

class EncodedImage(_message.Message):
    __slots__ = ("data", "format", "width", "height")
    DATA_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    format: ImageFormat
    width: int
    height: int
    def __init__(self, data: _Optional[bytes] = ..., format: _Optional[_Union[ImageFormat, str]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("version", "model", "providers", "device", "parity", "limits", "queue", "default_options", "available_layers", "models", "devices")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PARITY_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    version: str
    model: ModelInfo
    providers: _containers.RepeatedScalarFieldContainer[str]
    device: str
    parity: ParityReport
    limits: Limits
    queue: QueueState
    default_options: StyleOptions
    available_layers: _containers.RepeatedScalarFieldContainer[str]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    devices: _containers.RepeatedCompositeFieldContainer[DeviceInfo]
    def __init__(self, version: _Optional[str] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ..., providers: _Optional[_Iterable[str]] = ..., device: _Optional[str] = ..., parity: _Optional[_Union[ParityReport, _Mapping]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., queue: _Optional[_Union[QueueState, _Mapping]] = ..., default_options: _Optional[_Union[StyleOptions, _Mapping]] = ..., available_layers: _Optional[_Iterable[str]] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., devices: _Optional[_Iterable[_Union[DeviceInfo, _Mapping]]] = ...) -> None: ...

class DeviceInfo(_message.Message):
    __slots__ = ("device", "auto_precision", "auto_precision_reason")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    AUTO_PRECISION_FIELD_NUMBER: _ClassVar[int]
    AUTO_PRECISION_REASON_FIELD_NUMBER: _ClassVar[int]
    device: str
    auto_precision: str
    auto_precision_reason: str
    def __init__(self, device: _Optional[str] = ..., auto_precision: _Optional[str] = ..., auto_precision_reason: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("arch", "weights", "weights_sha256", "onnx_sha256", "layers", "pooling", "opset", "manifest_json", "parity", "available_layers")
    ARCH_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    ONNX_SHA256_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    OPSET_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    PARITY_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    arch: str
    weights: str
    weights_sha256: str
    onnx_sha256: str
    layers: _containers.RepeatedScalarFieldContainer[str]
    pooling: str
    opset: int
    manifest_json: str
    parity: ParityReport
    available_layers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, arch: _Optional[str] = ..., weights: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., onnx_sha256: _Optional[str] = ..., layers: _Optional[_Iterable[str]] = ..., pooling: _Optional[str] = ..., opset: _Optional[int] = ..., manifest_json: _Optional[str] = ..., parity: _Optional[_Union[ParityReport, _Mapping]] = ..., available_layers: _Optional[_Iterable[str]] = ...) -> None: ...

class ParityReport(_message.Message):
    __slots__ = ("passed", "tolerance", "targets_backend", "layers")
    PASSED_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    TARGETS_BACKEND_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    passed: bool
    tolerance: float
    targets_backend: str
    layers: _containers.RepeatedCompositeFieldContainer[LayerParity]
    def __init__(self, passed: _Optional[bool] = ..., tolerance: _Optional[float] = ..., targets_backend: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[LayerParity, _Mapping]]] = ...) -> None: ...

class LayerParity(_message.Message):
    __slots__ = ("layer", "quantity", "relative_error")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_ERROR_FIELD_NUMBER: _ClassVar[int]
    layer: str
    quantity: str
    relative_error: float
    def __init__(self, layer: _Optional[str] = ..., quantity: _Optional[str] = ..., relative_error: _Optional[float] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_size", "max_pixels", "max_iterations", "max_styles", "max_image_bytes", "max_queue", "finished_job_ttl_seconds")
    MAX_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_STYLES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    FINISHED_JOB_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    max_size: int
    max_pixels: int
    max_iterations: int
    max_styles: int
    max_image_bytes: int
    max_queue: int
    finished_job_ttl_seconds: int
    def __init__(self, max_size: _Optional[int] = ..., max_pixels: _Optional[int] = ..., max_iterations: _Optional[int] = ..., max_styles: _Optional[int] = ..., max_image_bytes: _Optional[int] = ..., max_queue: _Optional[int] = ..., finished_job_ttl_seconds: _Optional[int] = ...) -> None: ...

class QueueState(_message.Message):
    __slots__ = ("depth", "capacity", "running", "workers", "draining")
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    depth: int
    capacity: int
    running: int
    workers: int
    draining: bool
    def __init__(self, depth: _Optional[int] = ..., capacity: _Optional[int] = ..., running: _Optional[int] = ..., workers: _Optional[int] = ..., draining: _Optional[bool] = ...) -> None: ...
