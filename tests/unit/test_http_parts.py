"""Pieces of the HTTP API that need no server: event-id cursors, problem fields, status map."""

from __future__ import annotations

import grpc
import pytest

from taskrun.controlplane.http.api import BadRequest, decode_cursor, encode_cursor, parse_message
from taskrun.controlplane.http.context import Aborted
from taskrun.controlplane.http.mcp_server import task_summary
from taskrun.v1 import common_pb2, tasks_pb2


def test_a_cursor_round_trips_every_run_and_sequence_number() -> None:
    seen = {"r-1": 7, "r-2": 12345678901}
    assert decode_cursor(encode_cursor(seen)) == seen
    assert decode_cursor("") == {}


@pytest.mark.parametrize("value", ["***", "cnVuOng", "x" * 20000])
def test_a_cursor_that_this_server_did_not_send_is_refused_naming_the_header(value: str) -> None:
    with pytest.raises(BadRequest) as caught:
        decode_cursor(value)
    assert caught.value.field == "Last-Event-ID"


def test_a_nested_parse_error_names_the_dotted_field() -> None:
    with pytest.raises(BadRequest) as caught:
        parse_message({"policy": {"max_attempts": "many"}}, tasks_pb2.CreateTaskRequest())
    assert caught.value.field == "policy.max_attempts"
    with pytest.raises(BadRequest) as caught:
        parse_message({"agnet": "echo"}, tasks_pb2.CreateTaskRequest())
    assert caught.value.field == "agnet"


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400),
        (grpc.StatusCode.UNAUTHENTICATED, 401),
        (grpc.StatusCode.PERMISSION_DENIED, 403),
        (grpc.StatusCode.NOT_FOUND, 404),
        (grpc.StatusCode.ALREADY_EXISTS, 409),
        (grpc.StatusCode.FAILED_PRECONDITION, 412),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (grpc.StatusCode.UNAVAILABLE, 503),
    ],
)
def test_grpc_codes_map_to_http_statuses(code: grpc.StatusCode, status: int) -> None:
    assert Aborted(code, "x").http_status == status


def test_the_field_is_read_from_the_domain_message_prefix() -> None:
    assert Aborted(grpc.StatusCode.INVALID_ARGUMENT, "tasks[1].input_json: bad").field == (
        "tasks[1].input_json"
    )
    assert Aborted(grpc.StatusCode.NOT_FOUND, "no task 'x'").field is None


def test_an_agent_reading_a_task_over_mcp_is_told_when_earlier_runs_were_left_out() -> None:
    task = common_pb2.Task(id="tsk_1", attempts=80, earlier_runs=60)
    task.runs.add(id="run_61", attempt=61)
    summary = task_summary(task)
    assert summary["earlier_runs"] == 60 and [r["attempt"] for r in summary["runs"]] == [61]
    assert "earlier_runs" not in task_summary(common_pb2.Task(id="tsk_2", attempts=1))
