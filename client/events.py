"""Typed events of a job, converted from the API's JobEvent messages.

A job's stream is Queued, Started, then one Progress per iteration (some carrying a preview), then
Completed. Images stay encoded bytes (as the server sent them) until someone asks for pixels:
`Progress.preview_image()` and `Completed.image()` decode to PIL on demand, so a relay that only
forwards previews never pays for decoding.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import ClassVar, TypedDict

from PIL import Image

from stylize.client.options import image_format_from_proto
from stylize.v1 import stylize_pb2


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @classmethod
    def from_proto(cls, number: int) -> JobState | None:
        name = stylize_pb2.JobState.Name(number).removeprefix("JOB_STATE_").lower()
        return None if name == "unspecified" else cls(name)


@dataclass(frozen=True)
class Losses:
    """Weighted loss terms; `total` is their sum."""

    total: float
    content: float
    style: float
    total_variation: float

    @classmethod
    def from_proto(cls, message: stylize_pb2.Losses) -> Losses:
        return cls(message.total, message.content, message.style, message.total_variation)


@dataclass(frozen=True)
class EncodedImage:
    """An image as the server encoded it ("png", "jpeg" or "webp")."""

    data: bytes = field(repr=False)
    format: str
    width: int
    height: int

    @classmethod
    def from_proto(cls, message: stylize_pb2.EncodedImage) -> EncodedImage:
        return cls(message.data, image_format_from_proto(message.format), message.width, message.height)

    @property
    def suffix(self) -> str:
        return ".jpg" if self.format == "jpeg" else f".{self.format}"

    def open(self) -> Image.Image:
        """Decode into a PIL image."""
        image = Image.open(io.BytesIO(self.data))
        image.load()
        return image

    def save(self, path: str | Path) -> Path:
        """Write to `path`: the bytes as they are when the suffix matches, else re-encoded by PIL."""
        path = Path(path)
        if path.suffix.lower() in {self.suffix, f".{self.format}"}:
            path.write_bytes(self.data)
        else:
            self.open().save(path)
        return path


@dataclass(frozen=True, kw_only=True)
class Event:
    """What every event carries. `sequence` grows by one per event of a job, so gaps are visible."""

    kind: ClassVar[str]
    job_id: str
    sequence: int
    elapsed_seconds: float
    client_tag: str = ""


@dataclass(frozen=True, kw_only=True)
class Queued(Event):
    kind: ClassVar[str] = "queued"
    position: int


@dataclass(frozen=True, kw_only=True)
class Started(Event):
    kind: ClassVar[str] = "started"
    device: str
    # (width, height) of each scale, coarse to fine.
    scales: tuple[tuple[int, int], ...]
    iterations_total: int
    targets_backend: str
    # What the network really runs in ("fp32" or "bf16"), and why.
    precision: str = ""
    precision_reason: str = ""
    # Things the caller should know, such as bf16 asked for on a device that emulates it.
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Progress(Event):
    kind: ClassVar[str] = "progress"
    iteration: int  # 1-based, over all scales
    iterations_total: int
    scale: int  # 0-based
    scales: int
    width: int
    height: int
    losses: Losses
    eta_seconds: float
    preview: EncodedImage | None = None

    def preview_image(self) -> Image.Image | None:
        """The preview decoded into a PIL image, or None when this iteration carried none."""
        return None if self.preview is None else self.preview.open()


@dataclass(frozen=True, kw_only=True)
class Completed(Event):
    kind: ClassVar[str] = "completed"
    output: EncodedImage
    losses: Losses
    iterations: int
    run_seconds: float
    queue_seconds: float

    @property
    def data(self) -> bytes:
        """The final image, encoded as requested (PNG unless output_format said otherwise)."""
        return self.output.data

    @property
    def width(self) -> int:
        return self.output.width

    @property
    def height(self) -> int:
        return self.output.height

    def image(self) -> Image.Image:
        """The final image decoded into a PIL image."""
        return self.output.open()

    def save(self, path: str | Path) -> Path:
        return self.output.save(path)


def _size(message: stylize_pb2.Size) -> tuple[int, int]:
    return (message.width, message.height)


class _Common(TypedDict):
    """Event's fields, as event_from_proto reads them from every message."""

    job_id: str
    sequence: int
    elapsed_seconds: float
    client_tag: str


def event_from_proto(message: stylize_pb2.JobEvent) -> Event | None:
    """The typed event, or None for an event kind newer than this client (callers skip those)."""
    common: _Common = {
        "job_id": message.job_id,
        "sequence": message.sequence,
        "elapsed_seconds": message.elapsed_seconds,
        "client_tag": message.client_tag,
    }
    which = message.WhichOneof("event")
    if which == "queued":
        return Queued(**common, position=message.queued.position)
    if which == "started":
        started = message.started
        return Started(
            **common,
            device=started.device,
            scales=tuple(_size(size) for size in started.scales),
            iterations_total=started.iterations_total,
            targets_backend=started.targets_backend,
            precision=started.precision,
            precision_reason=started.precision_reason,
            warnings=tuple(started.warnings),
        )
    if which == "progress":
        progress = message.progress
        return Progress(
            **common,
            iteration=progress.iteration,
            iterations_total=progress.iterations_total,
            scale=progress.scale,
            scales=progress.scales,
            width=progress.size.width,
            height=progress.size.height,
            losses=Losses.from_proto(progress.losses),
            eta_seconds=progress.eta_seconds,
            preview=EncodedImage.from_proto(progress.preview) if progress.HasField("preview") else None,
        )
    if which == "completed":
        completed = message.completed
        return Completed(
            **common,
            output=EncodedImage.from_proto(completed.image),
            losses=Losses.from_proto(completed.losses),
            iterations=completed.iterations,
            run_seconds=completed.run_seconds,
            queue_seconds=completed.queue_seconds,
        )
    return None
