"""The HTTP API (JSON over TLS, server-sent events) and the MCP server, on one port.

Every endpoint calls the same gRPC servicer method the gRPC API serves, through a call context
that carries the HTTP caller's bearer token; request and response bodies are the protobuf JSON
mapping of the same messages. So the two APIs authenticate, validate and answer alike.
"""
