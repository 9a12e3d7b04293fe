"""Generated protobuf and gRPC modules for taskrun.v1. Do not edit: run scripts/gen-proto."""
