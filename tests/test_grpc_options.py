"""Every gRPC channel argument the server and the client set is one gRPC core reads.

gRPC ignores an argument it does not know, silently: the server once set
"grpc.http2.min_recv_ping_interval_without_data_ms" (the C macro's name, not its key), so it enforced the
5-minute default and sent a 9-minute job's client GOAWAY too_many_pings. gRPC core's keys are strings in
its compiled module; each argument we set must be one of them.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from stylize.client.channel import channel_options
from stylize.server.config import ServerConfig
from stylize.server.main import server_options


def core_strings() -> bytes:
    (module,) = (Path(grpc.__file__).parent / "_cython").glob("cygrpc*.so")
    return module.read_bytes()


def test_every_channel_argument_we_set_is_one_grpc_core_reads() -> None:
    known = core_strings()
    ours = {key for key, _ in server_options(ServerConfig(model_dir=Path("model")))}
    ours |= {key for key, _ in channel_options(server_name="stylize.example")}
    assert ours and all(key.startswith("grpc.") for key in ours)
    # A key's string ends with a NUL; the linker may pack another string right before it.
    unknown = sorted(key for key in ours if key.encode() + b"\0" not in known)
    assert not unknown, f"gRPC core does not know {unknown}"
    # The check can fail: the name that was wrong is not a key.
    assert b"grpc.http2.min_recv_ping_interval_without_data_ms\0" not in known
