"""Client library and `stylize` CLI for services that call the stylize API. Imports without torch.

    from stylize.client import Completed, Progress, StylizeClient

See stylize.client.client for the clients, .events for what a job streams, .errors for what a
failed call raises, .channel for several servers and load balancing.
"""

from stylize.api.options import FieldViolation
from stylize.client.channel import tls_credentials
from stylize.client.client import AsyncEventStream, AsyncStylizeClient, EventStream, StylizeClient, Submission
from stylize.client.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    JobFailed,
    NotFound,
    ResourceExhausted,
    StylizeError,
    Unauthenticated,
    Unavailable,
)
from stylize.client.events import (
    Completed,
    EncodedImage,
    Event,
    JobState,
    Losses,
    Progress,
    Queued,
    Started,
)
from stylize.client.info import QueueState, ServerInfo

__all__ = [
    "AsyncEventStream",
    "AsyncStylizeClient",
    "Cancelled",
    "Completed",
    "DeadlineExceeded",
    "EncodedImage",
    "Event",
    "EventStream",
    "FieldViolation",
    "InvalidArgument",
    "JobFailed",
    "JobState",
    "Losses",
    "NotFound",
    "Progress",
    "QueueState",
    "Queued",
    "ResourceExhausted",
    "ServerInfo",
    "Started",
    "StylizeClient",
    "StylizeError",
    "Submission",
    "Unauthenticated",
    "Unavailable",
    "tls_credentials",
]
