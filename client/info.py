"""What GetServerInfo tells a caller, as a typed record (the full message stays at hand in `.message`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from google.protobuf import json_format

from stylize.client.options import style_options_from_proto
from stylize.v1 import stylize_pb2


@dataclass(frozen=True)
class QueueState:
    depth: int
    capacity: int
    running: int
    workers: int
    draining: bool


@dataclass(frozen=True)
class ServerInfo:
    version: str
    device: str
    providers: tuple[str, ...]
    # "imagenet", "caffe", "file" or "random" (a random-weight server only tests the plumbing).
    weights: str
    parity_passed: bool
    targets_backend: str
    queue: QueueState
    limits: dict[str, int]
    # Every option with the server's default, by engine name.
    default_options: dict[str, object]
    available_layers: tuple[str, ...]
    # The backbones the server serves ("vgg19", "vgg16"); a job's `backbone` option picks one.
    backbones: tuple[str, ...]
    message: stylize_pb2.ServerInfo = field(repr=False)

    @classmethod
    def from_proto(cls, message: stylize_pb2.ServerInfo) -> ServerInfo:
        queue = message.queue
        return cls(
            version=message.version,
            device=message.device,
            providers=tuple(message.providers),
            weights=message.model.weights,
            parity_passed=message.parity.passed,
            targets_backend=message.parity.targets_backend,
            queue=QueueState(queue.depth, queue.capacity, queue.running, queue.workers, queue.draining),
            limits={f.name: getattr(message.limits, f.name) for f in message.limits.DESCRIPTOR.fields},
            default_options=style_options_from_proto(message.default_options),
            available_layers=tuple(message.available_layers),
            backbones=tuple(model.arch for model in message.models),
            message=message,
        )

    def as_dict(self) -> dict[str, Any]:
        """The whole message as JSON-ready data (field names as in the proto)."""
        # protobuf has no type information: MessageToDict's dict comes back as Any.
        return cast(
            dict[str, Any],
            json_format.MessageToDict(
                self.message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            ),
        )
