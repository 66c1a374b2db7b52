"""Generated protobuf and gRPC code for stylize.v1 (scripts/gen_proto.py)."""
