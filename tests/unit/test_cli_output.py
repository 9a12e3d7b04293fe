"""What the command line prints: stable JSON documents, aligned tables, the follow stream."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest

from taskrun.cli import output
from taskrun.cli.client import OutputReceived, TaskChanged
from taskrun.core.ids import RunId, TaskId, WorkerId
from taskrun.core.models import (
    AgentSpec,
    ModelBackend,
    ModelSettings,
    OutputChunk,
    OutputKind,
    Run,
    Task,
    TaskPolicy,
    Usage,
    Worker,
)
from taskrun.core.status import Fault, RunStatus, TaskStatus, WorkerStatus

NOW = datetime(2026, 11, 2, 12, 0, 0, tzinfo=UTC)
TASK_KEYS = [
    "id",
    "agent",
    "input",
    "labels",
    "policy",
    "status",
    "created_at",
    "updated_at",
    "attempts",
    "current_run_id",
    "worker_id",
    "finished_at",
    "error",
    "result",
    "usage",
    "schedule",
    "cancel_requested",
    "waiting_reason",
    "conversation_id",
    "turn",
    "parent_task_id",
    "root_task_id",
    "depth",
]
RUN_KEYS = [
    "id",
    "task_id",
    "attempt",
    "status",
    "created_at",
    "worker_id",
    "assigned_at",
    "started_at",
    "finished_at",
    "error",
    "result",
    "usage",
    "backend_used",
    "session_id",
    "prompt",
    "fault",
]


def make_task(**changes: object) -> Task:
    values: dict[str, object] = {
        "id": TaskId("tsk_1"),
        "agent": "echo",
        "input": '{"text": "hi"}',
        "labels": {"team": "a"},
        "policy": TaskPolicy(timeout=30.0, required_labels={"gpu": "a100"}),
        "status": TaskStatus.RUNNING,
        "created_at": NOW - timedelta(minutes=5),
        "updated_at": NOW - timedelta(seconds=3),
        "attempts": 1,
        "current_run_id": RunId("run_1"),
        "worker_id": WorkerId("worker-1"),
    }
    values.update(changes)
    return Task(**values)  # type: ignore[arg-type]


def make_run(**changes: object) -> Run:
    values: dict[str, object] = {
        "id": RunId("run_1"),
        "task_id": TaskId("tsk_1"),
        "attempt": 1,
        "status": RunStatus.FAILED,
        "created_at": NOW - timedelta(minutes=5),
        "worker_id": WorkerId("worker-1"),
        "assigned_at": NOW - timedelta(minutes=4),
        "started_at": NOW - timedelta(minutes=4),
        "finished_at": NOW - timedelta(minutes=3, seconds=56),
        "error": "boom",
        "backend_used": ModelBackend("anthropic", "claude-x", 200_000),
    }
    values.update(changes)
    return Run(**values)  # type: ignore[arg-type]


def make_worker() -> Worker:
    return Worker(
        id=WorkerId("worker-1"),
        hostname="gpu-box",
        version="0.1.0",
        agents=(
            AgentSpec(
                "claude",
                "Claude Code",
                (ModelBackend("anthropic", "claude-x", 200_000, ("text", "image")),),
                supports_sessions=True,
            ),
            AgentSpec("echo"),
        ),
        labels={"gpu": "a100", "zone": "b"},
        max_concurrent_runs=4,
        status=WorkerStatus.ONLINE,
        last_heartbeat_at=NOW - timedelta(seconds=2),
    )


# --- JSON ------------------------------------------------------------------------------------


def test_task_document_has_stable_snake_case_keys() -> None:
    doc = output.task_doc(make_task())
    assert list(doc) == TASK_KEYS
    assert list(doc["policy"]) == [
        "priority",
        "timeout",
        "max_attempts",
        "idempotency_key",
        "required_labels",
        "queue_timeout",
        "retry_on_failure",
        "required_provider",
        "required_model",
        "output_schema",
        "output_retries",
        "model_settings",
        "max_cost_usd",
        "allow_subtasks",
        "max_subtasks",
        "subtask_budget_usd",
    ]
    assert list(doc["policy"]["model_settings"]) == [
        "system_prompt",
        "max_tokens",
        "temperature",
        "stop_sequences",
        "append_system_prompt",
        "env",
        "mcp_servers",
        "allowed_tools",
        "disallowed_tools",
    ]
    assert list(doc["usage"]) == [
        "input_tokens",
        "output_tokens",
        "cache_read_tokens",
        "cache_creation_tokens",
        "cost_usd",
        "turns",
        "duration_ms",
    ]


def test_task_document_values() -> None:
    doc = output.task_doc(make_task())
    assert doc["status"] == "running"
    assert doc["created_at"] == "2026-11-02T11:55:00Z"
    assert doc["finished_at"] is None
    assert doc["input"] == {"text": "hi"}  # embedded, not a string
    assert doc["result"] is None
    assert doc["policy"]["timeout"] == 30.0
    assert doc["policy"]["queue_timeout"] is None
    assert doc["labels"] == {"team": "a"}


def test_task_result_is_embedded_as_json() -> None:
    doc = output.task_doc(make_task(result='{"answer": 42}', status=TaskStatus.COMPLETED))
    assert doc["result"] == {"answer": 42}
    assert doc["status"] == "completed"


def test_task_get_document_adds_runs() -> None:
    doc = output.task_doc(make_task(), [make_run()])
    assert list(doc) == [*TASK_KEYS, "runs"]
    (run,) = doc["runs"]
    assert list(run) == RUN_KEYS
    assert run["status"] == "failed"
    assert run["fault"] == "unknown"
    assert run["backend_used"] == {
        "provider": "anthropic",
        "model_name": "claude-x",
        "context_window": 200000,
        "modalities": ["text"],
        "tools": [],
    }


def test_worker_document() -> None:
    doc = output.worker_doc(make_worker(), [RunId("run_1")])
    assert doc["status"] == "online"
    assert doc["active_runs"] == 1
    assert doc["run_ids"] == ["run_1"]
    assert doc["agents"][0]["backends"][0]["modalities"] == ["text", "image"]
    assert doc["connected_at"] is None
    assert doc["last_heartbeat_at"] == "2026-11-02T11:59:58Z"


def test_documents_survive_a_json_round_trip() -> None:
    text = output.dumps(output.task_doc(make_task(), [make_run()]))
    assert text.endswith("\n")
    assert json.loads(text)["runs"][0]["id"] == "run_1"


def test_time_is_shown_in_utc() -> None:
    plus_two = datetime(2026, 1, 1, 14, 0, tzinfo=UTC).astimezone(timezone(timedelta(hours=2)))
    assert output.format_time(plus_two) == "2026-01-01T14:00:00Z"


# --- formatting ------------------------------------------------------------------------------


def test_age_and_duration() -> None:
    assert output.format_age(NOW - timedelta(seconds=12), NOW) == "12s"
    assert output.format_age(NOW - timedelta(minutes=5, seconds=59), NOW) == "5m"
    assert output.format_age(NOW - timedelta(hours=3), NOW) == "3h"
    assert output.format_age(NOW - timedelta(days=2), NOW) == "2d"
    assert output.format_age(None, NOW) == "-"
    assert output.format_age(NOW + timedelta(seconds=5), NOW) == "0s"  # clock skew
    assert output.format_duration(0.85) == "850ms"
    assert output.format_duration(4.2) == "4.2s"
    assert output.format_duration(184) == "3m04s"
    assert output.format_duration(3720) == "1h02m"
    assert output.format_duration(None) == "-"


def test_table_columns_are_aligned() -> None:
    text = output.render_table(("A", "LONGER"), [("xxxx", "1"), ("y", "22")])
    assert text == "A     LONGER\nxxxx  1\ny     22\n"


def test_tasks_table() -> None:
    text = output.tasks_table([make_task(), make_task(id="tsk_2", worker_id=None)], NOW)
    lines = text.splitlines()
    assert lines[0].split() == ["ID", "AGENT", "STATUS", "ATTEMPTS", "WORKER", "AGE"]
    assert lines[1].split() == ["tsk_1", "echo", "running", "1", "worker-1", "5m"]
    assert lines[2].split() == ["tsk_2", "echo", "running", "1", "-", "5m"]


def test_task_detail_shows_policy_runs_result_and_usage() -> None:
    task = make_task(
        status=TaskStatus.FAILED,
        error="boom",
        usage=Usage(input_tokens=10, output_tokens=20, cost_usd=0.5),
    )
    text = output.task_detail(task, [make_run()], NOW)
    assert "Status:    failed" in text
    assert "Attempts:  1 of 3" in text
    assert "Error:     boom" in text
    assert "10 in / 20 out tokens, $0.5000" in text
    assert "timeout:            30.0s" in text
    assert "required labels:    gpu=a100" in text
    runs = text.split("Runs:\n")[1].splitlines()
    assert runs[0].split()[:4] == ["ATTEMPT", "RUN", "STATUS", "WORKER"]
    # the worker did not say whose fault it was
    assert runs[1].split() == ["1", "run_1", "failed", "worker-1", "4m", "ago", "4.0s", "-", "boom"]


def test_task_detail_of_a_turn_names_its_conversation() -> None:
    text = output.task_detail(make_task(conversation_id="cnv_1", turn=3), [], NOW)
    assert "Conversation:  cnv_1, turn 3" in text
    assert "Conversation" not in output.task_detail(make_task(), [], NOW)


def test_task_detail_without_runs() -> None:
    text = output.task_detail(make_task(status=TaskStatus.PENDING, attempts=0), [], NOW)
    assert "none yet" in text


def test_workers_table() -> None:
    text = output.workers_table([(make_worker(), [RunId("run_1")])], NOW)
    header, row = text.splitlines()
    assert header.split() == [
        "ID",
        "HOST",
        "STATUS",
        "RUNS",
        "HEALTH",
        "AGENTS",
        "LABELS",
        "LAST",
        "HEARTBEAT",
    ]
    assert row.split() == [
        *("worker-1", "gpu-box", "online", "1/4", "ok", "claude,echo", "gpu=a100,zone=b"),
        *("2s", "ago"),
    ]


def test_workers_table_marks_unavailable_agents_and_quarantine() -> None:
    worker = make_worker()
    worker.agents = (worker.agents[0], replace(worker.agents[1], unavailable_reason="no key"))
    worker.quarantined_until = NOW + timedelta(seconds=42)
    worker.consecutive_failures = 5
    row = output.workers_table([(worker, [])], NOW).splitlines()[1]
    assert "quarantined 42s" in row and "claude,echo!" in row
    worker.quarantined_until = None
    assert "5 fast failures" in output.workers_table([(worker, [])], NOW)


def test_worker_detail_shows_why_an_agent_is_unavailable_and_the_quarantine() -> None:
    worker = make_worker()
    worker.agents = (replace(worker.agents[0], unavailable_reason="no ANTHROPIC_API_KEY"),)
    worker.quarantined_until = NOW + timedelta(minutes=1)
    worker.quarantine_reason = "5 runs in a row failed within 10s; last error: boom"
    text = output.worker_detail(worker, [], NOW)
    assert "  claude - Claude Code [sessions] [UNAVAILABLE: no ANTHROPIC_API_KEY]\n" in text
    assert "5 runs in a row failed within 10s; last error: boom" in text


def test_worker_detail_lists_agents_with_their_backends() -> None:
    text = output.worker_detail(make_worker(), [RunId("run_1")], NOW)
    assert (
        "  claude - Claude Code [sessions] [available]\n"
        "    anthropic/claude-x (200000 tokens; text,image)\n" in text
    )
    assert "  echo [available]\n" in text
    assert "Active runs:\n  run_1\n" in text


def test_worker_detail_says_when_and_why_a_worker_was_revoked() -> None:
    worker = make_worker()
    assert "Revoked" not in output.worker_detail(worker, [], NOW)
    worker.status, worker.revoked_reason = WorkerStatus.REVOKED, "stolen laptop"
    worker.revoked_at = NOW - timedelta(minutes=5)
    text = output.worker_detail(worker, [], NOW)
    assert "revoked" in text
    assert "(5m ago): stolen laptop\n" in text


def test_event_chunks_are_one_line() -> None:
    assert (
        output.format_event('{"type": "tool_use", "name": "bash"}') == 'tool_use {"name": "bash"}'
    )
    assert output.format_event('{"type": "thinking"}') == "thinking"
    assert output.format_event("not json\nat all") == "not json at all"


def test_events_that_warn_are_said_in_words() -> None:
    refused = {
        "type": "tool_refused",
        "name": "Bash",
        "input": {"command": "rm -rf build"},
        "permission_mode": "default",
        "reason": "needs approval",
    }
    assert output.format_event(json.dumps(refused)) == (
        'warning: tool refused by permission mode default: Bash {"command": "rm -rf build"} '
        "(needs approval)"
    )
    hint = "cost unknown: model 'x' is not in the price table; " + "add it " * 40
    line = output.format_event(json.dumps({"type": "cost_unknown", "model": "x", "hint": hint}))
    assert line == "warning: " + " ".join(hint.split())  # not cut at 200 characters


# --- following -------------------------------------------------------------------------------


def chunk(seq: int, data: str, kind: OutputKind = OutputKind.TEXT) -> OutputReceived:
    return OutputReceived(OutputChunk(RunId("run_1"), 1, seq, data, kind, task_id=TaskId("tsk_1")))


def test_stream_writes_text_raw_and_events_to_stderr() -> None:
    out, err = io.StringIO(), io.StringIO()
    printer = output.StreamPrinter(out, err, color=False)
    printer.event(TaskChanged(make_task()))
    printer.event(chunk(1, "hel"))
    printer.event(chunk(2, '{"type": "tool_use"}', OutputKind.EVENT))
    printer.event(chunk(3, "lo"))
    printer.finish(make_task(status=TaskStatus.COMPLETED))
    assert out.getvalue() == "hello"
    assert err.getvalue() == "[event] tool_use\ntask tsk_1 completed\n"


def test_stream_notes_a_retry() -> None:
    out, err = io.StringIO(), io.StringIO()
    printer = output.StreamPrinter(out, err, color=False)
    printer.event(TaskChanged(make_task()))
    printer.event(TaskChanged(make_task(attempts=2, worker_id=WorkerId("worker-2"))))
    assert err.getvalue() == "[retry] attempt 2 of 3 on worker-2\n"


def test_stream_as_json_lines() -> None:
    out, err = io.StringIO(), io.StringIO()
    printer = output.StreamPrinter(out, err, json_lines=True)
    printer.event(chunk(1, "hi"))
    printer.event(TaskChanged(make_task(status=TaskStatus.COMPLETED)))
    printer.finish(make_task(status=TaskStatus.COMPLETED))
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["event"] == "output" and first["data"] == "hi" and first["kind"] == "text"
    assert second["event"] == "task" and second["status"] == "completed"
    assert err.getvalue() == ""


def test_final_line_does_not_repeat_the_status() -> None:
    cancelled = make_task(status=TaskStatus.CANCELLED, error="cancelled: changed my mind")
    assert output.finish_line(cancelled) == "task tsk_1 cancelled: changed my mind"
    failed = make_task(status=TaskStatus.FAILED, error="boom")
    assert output.finish_line(failed) == "task tsk_1 failed: boom"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_color_turns_colour_off_even_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert output.StreamPrinter(io.StringIO(), _Terminal()).color
    assert not output.StreamPrinter(io.StringIO(), io.StringIO()).color  # not a terminal
    monkeypatch.setenv("NO_COLOR", "1")
    assert not output.StreamPrinter(io.StringIO(), _Terminal()).color


def test_task_detail_shows_what_the_task_asks_of_the_model_and_no_env_values() -> None:
    policy = TaskPolicy(
        output_schema='{"type":"object"}',
        max_cost_usd=0.5,
        model_settings=ModelSettings(max_tokens=200, env={"TOKEN": "s3cret"}, stop_sequences=["#"]),
    )
    text = " ".join(output.task_detail(make_task(policy=policy), [], NOW).split())
    assert 'output schema: {"type":"object"}' in text
    assert "output retries: 2" in text and "max cost: $0.5" in text
    assert "max tokens: 200" in text and 'stop sequences: "#"' in text
    assert "env: TOKEN" in text and "s3cret" not in text
    assert "system prompt" not in output.task_detail(make_task(), [], NOW)


def test_the_runs_table_says_whose_fault_a_failed_run_was() -> None:
    runs = [
        make_run(fault=Fault.WORKER, error="authentication failed"),
        make_run(attempt=2, fault=Fault.TASK, error="cost limit reached"),
        make_run(attempt=3, status=RunStatus.LOST, fault=Fault.WORKER, error="lease ended"),
    ]
    lines = output.runs_table(runs, NOW).splitlines()
    assert lines[0].split()[6:] == ["FAULT", "ERROR"]
    assert [line.split()[7] for line in lines[1:]] == ["worker", "task", "-"]
