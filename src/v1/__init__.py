"""Generated protobuf and gRPC modules for taskrun.v1 (scripts/gen-proto)."""
