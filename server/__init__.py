"""The stylize service: engine, runtime, gRPC service and metrics."""
