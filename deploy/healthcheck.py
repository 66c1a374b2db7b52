"""Container HEALTHCHECK: ask the server's grpc.health.v1 service whether stylize.v1.StyleTransfer is SERVING.

Exit 0 when SERVING, 1 otherwise (NOT_SERVING while starting, draining or after a failed parity probe;
unreachable; timeout), as Docker expects. The port comes from STYLIZE_PORT, the same variable the server
reads, so the check follows the server when an operator moves it. Kubernetes does not use this file: its
probes call the health service natively (deploy/k8s/base/deployment.yaml).
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE = "stylize.v1.StyleTransfer"
TIMEOUT_SECONDS = 4.0


def check(address: str, service: str = SERVICE, timeout: float = TIMEOUT_SECONDS) -> str:
    """The health status name ("SERVING", "NOT_SERVING", ...), or the gRPC code name if the call fails."""
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main() -> int:
    address = f"127.0.0.1:{os.environ.get('STYLIZE_PORT', '50051')}"
    status = check(address)
    print(f"{address} {SERVICE}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
