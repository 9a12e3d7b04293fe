"""The OpenAPI 3.1 document of the HTTP API, built from the endpoint table and the protobuf
descriptors of its messages (the protobuf JSON mapping, snake_case names).

`python -m taskrun.controlplane.http.openapi > docs/openapi.json` writes the checked-in copy.
"""

from __future__ import annotations

import json
import sys
from typing import Any, cast

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from taskrun.controlplane.http.endpoints import ENDPOINTS, Endpoint
from taskrun.v1 import events_pb2 as epb
from taskrun.v1 import tasks_pb2 as tpb

_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "description": 'seconds with "s", e.g. "1.5s"'},
    "google.protobuf.FieldMask": {
        "type": "string",
        "description": 'comma-separated field paths, e.g. "cron,timezone"',
    },
}
_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "uint32"},
    FieldDescriptor.TYPE_INT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_UINT64: {"type": "string", "format": "uint64"},
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
}


def _of(message: type[Message]) -> Descriptor:
    return cast(Descriptor, message.DESCRIPTOR)


def _name(descriptor: Descriptor) -> str:
    return descriptor.full_name.removeprefix("taskrun.v1.")


def _ref(descriptor: Descriptor) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{_name(descriptor)}"}


class _Schemas:
    def __init__(self) -> None:
        self.schemas: dict[str, dict[str, Any]] = {}

    def field(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            message = cast(Descriptor, field.message_type)
            if message.GetOptions().map_entry:
                value = message.fields_by_name["value"]
                return {"type": "object", "additionalProperties": self.field(value)}
            if message.full_name in _WELL_KNOWN:
                schema = dict(_WELL_KNOWN[message.full_name])
            else:
                schema = self.message(message)
        elif field.type == FieldDescriptor.TYPE_ENUM:
            values = field.enum_type.values if field.enum_type else ()
            schema = {"type": "string", "enum": [v.name for v in values]}
        else:
            schema = dict(_SCALARS[field.type])
        if field.is_repeated:
            return {"type": "array", "items": schema}
        return schema

    def message(self, descriptor: Descriptor) -> dict[str, Any]:
        name = _name(descriptor)
        if name not in self.schemas:
            self.schemas[name] = {}  # placeholder: messages may refer to themselves
            properties = {f.name: self.field(f) for f in descriptor.fields}
            self.schemas[name] = {"type": "object", "properties": properties}
        return _ref(descriptor)


_PROBLEM = {
    "description": "RFC 9457 problem details",
    "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
}
_ERRORS = {
    "400": "invalid input; `field` names it",
    "401": "no, unknown, expired or revoked API token",
    "403": "the token lacks the scope",
    "404": "no such task, worker or schedule",
    "409": "an idempotency key or name already holds something different",
    "412": "not in a state that allows this",
    "503": "the control plane could not complete it now; try again",
}


def _operation(endpoint: Endpoint, schemas: _Schemas) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name, _ in endpoint.path_fields
    ]
    for query in endpoint.query:
        schema: dict[str, Any] = {"type": "string"}
        if query.repeated or query.pairs:
            schema = {"type": "array", "items": schema}
        parameters.append(
            {"name": query.name, "in": "query", "description": query.description, "schema": schema}
        )
    operation: dict[str, Any] = {
        "operationId": endpoint.operation_id,
        "summary": endpoint.summary,
        "description": f"gRPC: {endpoint.service} {endpoint.rpc}. Needs scope "
        f"`{endpoint.scope.value}`.",
        "responses": {
            "200": {
                "description": "OK",
                "content": {
                    "application/json": {"schema": schemas.message(_of(endpoint.response))}
                },
            },
            **{code: {**_PROBLEM, "description": text} for code, text in _ERRORS.items()},
        },
    }
    if endpoint.created_status:
        operation["responses"]["201"] = operation["responses"]["200"] | {"description": "Created"}
    if parameters:
        operation["parameters"] = parameters
    if endpoint.body:
        operation["requestBody"] = {
            "required": False,
            "content": {"application/json": {"schema": schemas.message(_of(endpoint.request))}},
        }
    return operation


def _sse(summary: str, description: str, parameters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "description": description,
            "parameters": parameters,
            "responses": {
                "200": {
                    "description": "server-sent events",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                },
                **{code: {**_PROBLEM, "description": text} for code, text in _ERRORS.items()},
            },
        }
    }


def _param(name: str, where: str = "query", description: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "in": where, "schema": {"type": "string"}}
    if where == "path":
        out["required"] = True
    if description:
        out["description"] = description
    return out


def build() -> dict[str, Any]:
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in ENDPOINTS:
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = _operation(endpoint, schemas)
    schemas.message(_of(tpb.TaskUpdate))
    schemas.message(_of(epb.Event))
    paths["/v1/tasks/{task_id}/output"] = {
        "get": {
            "operationId": "taskOutput",
            "summary": "The stored output of a task: one TaskUpdate with the task and every chunk",
            "description": "Needs scope `read`.",
            "parameters": [_param("task_id", "path"), _param("include_events")],
            "responses": {
                "200": {
                    "description": "OK",
                    "content": {"application/json": {"schema": _ref(_of(tpb.TaskUpdate))}},
                },
                **{code: {**_PROBLEM, "description": text} for code, text in _ERRORS.items()},
            },
        }
    }
    paths["/v1/tasks/{task_id}/follow"] = _sse(
        "Follow a task: output chunks and status changes until it ends",
        "Needs scope `read`. Each `update` event's data is a TaskUpdate; its id is a cursor. "
        "Reconnect with the header `Last-Event-ID` (or `?last_event_id=`) to get only what came "
        "after it (the first event then holds the current task). `end` closes a finished "
        "stream; `error` carries problem details.",
        [
            _param("task_id", "path"),
            _param("include_events"),
            _param("last_event_id"),
            {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}},
        ],
    )
    paths["/v1/conversations/{conversation_id}/messages"] = {
        "post": {
            **_sse(
                "Send the next message of a conversation and stream the answer",
                "Needs scope `submit`. The body is a SendMessageRequest (`message`). Events: "
                "`turn` (a Turn: the new one, then again as it ended), `update` (a TaskUpdate of "
                "the turn's task: output chunks and status changes), `end`; `error` carries "
                "problem details.",
                [_param("conversation_id", "path")],
            )["get"],
            "operationId": "sendMessage",
        }
    }
    paths["/v1/events"] = _sse(
        "Every committed change in the control plane (`taskrun events`)",
        "Needs scope `read`. Each event is named after its EventKind; its data is an Event. "
        "The id of an event is its position in the durable event log: reconnect with the "
        "header `Last-Event-ID` (or `?after_position=`) to get every change after it, also "
        "after a failover to another control plane.",
        [
            _param("task_id"),
            _param("worker_id"),
            _param("kind", description="EventKind (`task_changed` or `EVENT_KIND_TASK_CHANGED`)"),
            _param("include_output"),
            _param("snapshot"),
            _param("after_position"),
            {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}},
        ],
    )
    paths["/v1/healthz"] = {
        "get": {
            "summary": "Health (no token needed)",
            "security": [],
            "responses": {"200": {"description": "serving"}},
        }
    }
    paths["/v1/openapi.json"] = {
        "get": {
            "summary": "This document (no token needed)",
            "security": [],
            "responses": {"200": {"description": "OpenAPI 3.1"}},
        }
    }
    problem = {
        "type": "object",
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "code": {"type": "string", "description": "the gRPC status name"},
            "field": {"type": "string", "description": "the input at fault, when one is"},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "TaskRun HTTP API",
            "version": "v1",
            "description": "JSON is the protobuf JSON mapping of the taskrun.v1 messages "
            "(snake_case names); the same checks and answers as the gRPC API.",
        },
        "security": [{"bearer": []}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an API token (`taskrun api-token create`)",
                }
            },
            "schemas": dict(sorted({**schemas.schemas, "Problem": problem}.items())),
        },
    }


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
