"""How the CLI shows core objects: aligned tables for people, stable JSON for programs.

JSON documents are built from the core dataclasses: field names as in `taskrun.core.models`
(snake_case), enums as lower-case names ("pending"), datetimes as ISO-8601 UTC ("...Z"), None as
null, tuples as lists. A task's `input` and `result` (JSON text in the models) are embedded as
JSON values; `result` is null while there is none.

Why one module: the tables and the JSON documents of every command share the same formatting
rules (durations, money, labels, time); what would move out next is the task-specific part
(policy fields, runs table), beside `cli/task_tree.py`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from enum import Enum
from typing import IO, Any

from taskrun.cli.client import FleetEvent, OutputReceived, TaskEvent
from taskrun.core.ids import RunId
from taskrun.core.models import (
    AgentSpec,
    ModelBackend,
    OutputChunk,
    OutputKind,
    Run,
    Task,
    TaskPolicy,
    Usage,
    Worker,
)
from taskrun.core.status import Fault, RunStatus, TaskStatus
from taskrun.logging import wants_color

NONE = "-"

# --- JSON ----------------------------------------------------------------------------------------


def format_time(value: datetime) -> str:
    """ISO-8601 in UTC with a `Z`, e.g. `2026-11-02T10:00:01.250000Z`."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def to_json_value(value: Any) -> Any:
    """A JSON-ready copy of a core value (dataclass, enum, datetime, mapping, sequence)."""
    if isinstance(value, Enum):  # before int: statuses are IntEnums
        return value.name.lower()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, datetime):
        return format_time(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_json_value(v) for v in value]
    raise TypeError(f"cannot show {type(value).__name__} as JSON")


def _embedded_json(text: str) -> Any:
    """JSON text as a JSON value; None when empty; the text itself if it is not JSON."""
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def run_doc(run: Run) -> dict[str, Any]:
    doc: dict[str, Any] = to_json_value(run)
    doc["result"] = _embedded_json(run.result)
    doc.pop("credential_hash", None)  # the control plane's business, never shown
    return doc


def task_doc(task: Task, runs: Sequence[Run] | None = None) -> dict[str, Any]:
    """The task's document; with `runs` (as from `task get`), a "runs" list is added."""
    doc: dict[str, Any] = to_json_value(task)
    doc["input"] = _embedded_json(task.input) or {}
    doc["result"] = _embedded_json(task.result)
    if runs is not None:
        doc["runs"] = [run_doc(r) for r in runs]
    return doc


def worker_doc(worker: Worker, run_ids: Sequence[RunId]) -> dict[str, Any]:
    doc: dict[str, Any] = to_json_value(worker)
    for agent in doc.get("agents", []):  # a JSON Schema is a JSON object, not text inside JSON
        agent["input_schema"] = _embedded_json(agent.get("input_schema", ""))
    doc["active_runs"] = len(run_ids)
    doc["run_ids"] = list(run_ids)
    return doc


def chunk_doc(chunk: OutputChunk) -> dict[str, Any]:
    doc: dict[str, Any] = to_json_value(chunk)
    return doc


def dumps(doc: Any, *, indent: int | None = 2) -> str:
    """One JSON document as text (UTF-8, not ASCII-escaped), ending with a newline.

    A lone surrogate in stored data (`"\\ud800"`, which has no UTF-8 form) is written as its
    JSON escape, so the document still encodes and parses back to the same value."""
    return printable(json.dumps(doc, indent=indent, ensure_ascii=False) + "\n")


def printable(text: str) -> str:
    """`text` with any lone surrogate replaced by its `\\uXXXX` escape (encodable as UTF-8)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode(errors="backslashreplace").decode()
    return text


# --- small formatters ----------------------------------------------------------------------------


def format_age(value: datetime | None, now: datetime) -> str:
    """A short age like `12s`, `5m`, `3h`, `2d`; `-` for None."""
    if value is None:
        return NONE
    return format_span((now - value).total_seconds())


def format_span(seconds: float) -> str:
    """A short span of time like `12s`, `5m`, `3h`, `2d` (rounded down)."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def format_duration(seconds: float | None) -> str:
    """`850ms`, `4.2s`, `3m04s`, `1h02m`; `-` for None."""
    if seconds is None:
        return NONE
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _ago(value: datetime | None, now: datetime) -> str:
    return f"{format_age(value, now)} ago" if value is not None else NONE


def format_when(value: datetime | None, now: datetime) -> str:
    """`2026-11-02 10:00:01 UTC (5m ago)`; `-` for None."""
    if value is None:
        return NONE
    stamp = value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{stamp} ({format_age(value, now)} ago)"


def format_labels(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or NONE


def status_name(status: Enum) -> str:
    return status.name.lower()


def format_usage(usage: Usage) -> str:
    if usage.empty:
        return NONE
    parts = [f"{usage.input_tokens} in / {usage.output_tokens} out tokens"]
    if usage.cache_read_tokens or usage.cache_creation_tokens:
        parts.append(
            f"cache {usage.cache_read_tokens} read / {usage.cache_creation_tokens} written"
        )
    if usage.cost_usd:
        parts.append(f"${usage.cost_usd:.4f}")
    if usage.turns:
        parts.append(f"{usage.turns} turns")
    if usage.duration_ms:
        parts.append(format_duration(usage.duration_ms / 1000))
    return ", ".join(parts)


def format_backend(backend: ModelBackend) -> str:
    """`anthropic/claude-x (200000 tokens; text,image)`."""
    name = f"{backend.provider}/{backend.model_name}" if backend.model_name else backend.provider
    details = []
    if backend.context_window:
        details.append(f"{backend.context_window} tokens")
    if backend.modalities:
        details.append(",".join(backend.modalities))
    if backend.tools:
        details.append("tools: " + ",".join(backend.tools))
    return f"{name} ({'; '.join(details)})" if details else name


# events that mean the run did not go as it seems: said in words, never cut short
_WARNINGS: dict[str, Callable[[dict[str, Any]], str]] = {
    "tool_refused": lambda e: (
        f"tool refused by permission mode {e.get('permission_mode', '?')}: {e.get('name', '?')} "
        f"{json.dumps(e.get('input', {}), ensure_ascii=False)}"
        + (f" ({e['reason']})" if e.get("reason") else "")
    ),
    "cost_unknown": lambda e: str(e.get("hint", "")),
}


def format_event(data: str, limit: int = 200) -> str:
    """An event chunk (a JSON object with a "type") on one line: `type {rest as JSON}`."""
    try:
        value = json.loads(data)
    except json.JSONDecodeError:
        return _one_line(data, limit)
    if isinstance(value, dict) and value.get("type") in _WARNINGS:
        return "warning: " + _one_line(_WARNINGS[value["type"]](value), 2 * limit)
    if isinstance(value, dict) and isinstance(value.get("type"), str):
        rest = {k: v for k, v in value.items() if k != "type"}
        text = value["type"] + (" " + json.dumps(rest, ensure_ascii=False) if rest else "")
        return _one_line(text, limit)
    return _one_line(json.dumps(value, ensure_ascii=False), limit)


def _one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


# --- tables --------------------------------------------------------------------------------------


def render_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    body = [list(r) for r in rows]
    widths = [len(h) for h in headers]
    for row in body:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *body]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def render_fields(fields: Sequence[tuple[str, str]], indent: str = "") -> str:
    """`Name:  value` lines with the values aligned."""
    width = max((len(name) for name, _ in fields), default=0) + 1
    return "".join(f"{indent}{(name + ':').ljust(width)}  {value}\n" for name, value in fields)


def tasks_table(tasks: Sequence[Task], now: datetime) -> str:
    rows = [
        (
            t.id,
            t.agent,
            status_name(t.status),
            str(t.attempts),
            t.worker_id or NONE,
            format_age(t.created_at, now),
        )
        for t in tasks
    ]
    return render_table(("ID", "AGENT", "STATUS", "ATTEMPTS", "WORKER", "AGE"), rows)


def _policy_fields(policy: TaskPolicy) -> list[tuple[str, str]]:
    return [
        ("priority", str(policy.priority)),
        ("timeout", format_duration(policy.timeout)),
        ("max attempts", str(policy.max_attempts)),
        ("queue timeout", format_duration(policy.queue_timeout)),
        ("retry on failure", "yes" if policy.retry_on_failure else "no"),
        ("idempotency key", policy.idempotency_key or NONE),
        ("required labels", format_labels(policy.required_labels)),
        ("required provider", policy.required_provider or NONE),
        ("required model", policy.required_model or NONE),
        ("sub-tasks", _subtask_policy(policy)),
        *_model_fields(policy),
    ]


def _model_fields(policy: TaskPolicy) -> list[tuple[str, str]]:
    """What the task asks of the model, only the parts it set (most tasks set none)."""
    s = policy.model_settings
    fields = [
        ("output schema", _one_line(policy.output_schema, 80)),
        ("output retries", str(policy.output_retries) if policy.output_schema else ""),
        ("max cost", f"${policy.max_cost_usd:g}" if policy.max_cost_usd else ""),
        ("system prompt", _one_line(s.system_prompt, 80)),
        ("max tokens", str(s.max_tokens) if s.max_tokens else ""),
        ("temperature", f"{s.temperature:g}" if s.temperature is not None else ""),
        ("stop sequences", ", ".join(json.dumps(x) for x in s.stop_sequences)),
        ("append system prompt", _one_line(s.append_system_prompt, 80)),
        ("env", ", ".join(sorted(s.env))),  # names only: values may be secrets
        ("mcp servers", ", ".join(json.loads(s.mcp_servers)) if s.mcp_servers else ""),
        ("allowed tools", ", ".join(s.allowed_tools)),
        ("disallowed tools", ", ".join(s.disallowed_tools)),
    ]
    return [(name, value) for name, value in fields if value]


def _subtask_policy(policy: TaskPolicy) -> str:
    if not policy.allow_subtasks:
        return "not allowed"
    limits = [f"at most {policy.max_subtasks}"] if policy.max_subtasks else []
    if policy.subtask_budget_usd:
        limits.append(f"budget ${policy.subtask_budget_usd:g}")
    return "allowed" + (f" ({', '.join(limits)} for the tree)" if limits else "")


def _run_duration(run: Run) -> float | None:
    start = run.started_at or run.assigned_at
    if start is None or run.finished_at is None:
        return None
    return (run.finished_at - start).total_seconds()


def runs_table(runs: Sequence[Run], now: datetime) -> str:
    rows = [
        (
            str(r.attempt),
            r.id,
            status_name(r.status),
            r.worker_id or NONE,
            _ago(r.started_at or r.assigned_at, now),
            format_duration(_run_duration(r)),
            _fault(r),
            _one_line(r.error, 60) or NONE,
        )
        for r in runs
    ]
    return render_table(
        ("ATTEMPT", "RUN", "STATUS", "WORKER", "STARTED", "DURATION", "FAULT", "ERROR"), rows
    )


def _fault(run: Run) -> str:
    """Whose fault a failed run was, as its worker said: only the worker's count towards the
    worker's quarantine."""
    if run.status is not RunStatus.FAILED or run.fault is Fault.UNKNOWN:
        return NONE
    return run.fault.name.lower()


def task_detail(task: Task, runs: Sequence[Run], now: datetime) -> str:
    """Everything about one task: state, policy, runs, result and usage."""
    fields = [
        ("ID", task.id),
        ("Agent", task.agent),
        (
            "Status",
            status_name(task.status) + (" (cancel requested)" if _cancel_note(task) else ""),
        ),
        ("Attempts", f"{task.attempts} of {task.policy.max_attempts}"),
        ("Worker", task.worker_id or NONE),
        *([("Waiting", task.waiting_reason)] if task.waiting_reason else []),
        ("Labels", format_labels(task.labels)),
        ("Created", format_when(task.created_at, now)),
        ("Updated", format_when(task.updated_at, now)),
        ("Finished", format_when(task.finished_at, now)),
        ("Input", _one_line(task.input)),
    ]
    if task.schedule:
        fields.append(("Schedule", task.schedule))
    if task.conversation_id:
        fields.append(("Conversation", f"{task.conversation_id}, turn {task.turn}"))
    if task.error:
        fields.append(("Error", task.error))
    fields.append(("Result", _one_line(task.result) if task.result else NONE))
    fields.append(("Usage", format_usage(task.usage)))
    out = render_fields(fields)
    out += "Policy:\n" + render_fields(_policy_fields(task.policy), indent="  ")
    if runs:
        out += "Runs:\n" + _indent(runs_table(runs, now))
    else:
        out += "Runs:     none yet\n"
    return out


def _cancel_note(task: Task) -> bool:
    return task.cancel_requested and not task.status.terminal


def _indent(text: str, prefix: str = "  ") -> str:
    return "".join(prefix + line + "\n" for line in text.splitlines())


def agent_names(agents: Sequence[AgentSpec]) -> str:
    """Agent names; one the worker cannot run now is marked with "!" (see `workers get`)."""
    return ",".join(a.name if a.available else f"{a.name}!" for a in agents) or NONE


def _health(worker: Worker, now: datetime) -> str:
    if worker.quarantined_until is not None and worker.quarantined_until > now:
        left = (worker.quarantined_until - now).total_seconds()
        return f"quarantined {left:.0f}s"
    if worker.consecutive_failures:
        return f"{worker.consecutive_failures} fast failures"
    return "ok"


def workers_table(workers: Sequence[tuple[Worker, Sequence[RunId]]], now: datetime) -> str:
    rows = [
        (
            w.id,
            w.hostname or NONE,
            status_name(w.status),
            f"{len(runs)}/{w.max_concurrent_runs}",
            _health(w, now),
            agent_names(w.agents),
            format_labels(w.labels),
            _ago(w.last_heartbeat_at, now),
        )
        for w, runs in workers
    ]
    return render_table(
        ("ID", "HOST", "STATUS", "RUNS", "HEALTH", "AGENTS", "LABELS", "LAST HEARTBEAT"), rows
    )


def worker_detail(worker: Worker, run_ids: Sequence[RunId], now: datetime) -> str:
    """One worker: identity, capacity, timing, its agents with their model backends, its runs."""
    fields = [
        ("ID", worker.id),
        ("Host", worker.hostname or NONE),
        ("Version", worker.version or NONE),
        ("Status", status_name(worker.status)),
        ("Runs", f"{len(run_ids)} of {worker.max_concurrent_runs}"),
        ("Labels", format_labels(worker.labels)),
        ("First seen", format_when(worker.first_seen_at, now)),
        ("Connected", format_when(worker.connected_at, now)),
        ("Last heartbeat", format_when(worker.last_heartbeat_at, now)),
        ("Cert expires", format_expiry(worker.certificate_expires_at, now)),
    ]
    if worker.revoked_at is not None:
        fields.append(
            ("Revoked", f"{format_when(worker.revoked_at, now)}: {worker.revoked_reason}")
        )
    fields.append(("Health", _health(worker, now)))
    if worker.quarantined_until is not None and worker.quarantined_until > now:
        fields.append(
            (
                "Quarantined",
                f"until {format_when(worker.quarantined_until, now)}: {worker.quarantine_reason}",
            )
        )
    out = render_fields(fields)
    out += "Agents:\n" if worker.agents else "Agents:  none\n"
    for agent in worker.agents:
        line = f"  {agent.name}"
        if agent.description:
            line += f" - {agent.description}"
        if agent.supports_sessions:
            line += " [sessions]"
        line += " [available]" if agent.available else f" [UNAVAILABLE: {agent.unavailable_reason}]"
        out += line + "\n"
        for backend in agent.backends:
            out += f"    {format_backend(backend)}\n"
    out += "Active runs:\n" + "".join(f"  {r}\n" for r in run_ids) if run_ids else ""
    return out


def format_expiry(value: datetime | None, now: datetime) -> str:
    if value is None:
        return NONE
    stamp = value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    if value <= now:
        return f"{stamp} (expired)"
    return f"{stamp} (in {format_span((value - now).total_seconds())})"


# --- following a task ----------------------------------------------------------------------------


class StreamPrinter:
    """Writes a followed task: text raw to stdout, events and status notes to stderr.

    With json_lines every event is one JSON object per line on stdout instead.
    """

    def __init__(
        self, out: IO[str], err: IO[str], *, json_lines: bool = False, color: bool | None = None
    ) -> None:
        self.out, self.err, self.json_lines = out, err, json_lines
        self.color = wants_color(err) if color is None else color
        self.attempts = 0
        self.ends_with_newline = True
        self.waiting = ""  # the last reason given for waiting, said once

    def _note(self, text: str, style: str = "2") -> None:
        if self.color:
            text = f"\x1b[{style}m{text}\x1b[0m"
        self.err.write(text + "\n")
        self.err.flush()

    def event(self, event: TaskEvent) -> None:
        if isinstance(event, OutputReceived):
            self.chunk(event)
        else:
            self.task(event.task)

    def chunk(self, event: OutputReceived) -> None:
        chunk = event.chunk
        if self.json_lines:
            self.out.write(dumps({"event": "output", **chunk_doc(chunk)}, indent=None))
            self.out.flush()
        elif chunk.kind is OutputKind.EVENT:
            self._note(f"[event] {format_event(chunk.data)}")
        elif chunk.data:
            self.out.write(chunk.data)
            self.out.flush()
            self.ends_with_newline = chunk.data.endswith("\n")

    def task(self, task: Task) -> None:
        if self.json_lines:
            self.out.write(dumps({"event": "task", **task_doc(task)}, indent=None))
            self.out.flush()
        elif self.attempts and task.attempts > self.attempts:
            where = f" on {task.worker_id}" if task.worker_id else ""
            self._note(f"[retry] attempt {task.attempts} of {task.policy.max_attempts}{where}")
        if not self.json_lines and task.waiting_reason and task.waiting_reason != self.waiting:
            self._note(f"[waiting] {task.waiting_reason}")
        self.waiting = task.waiting_reason
        self.attempts = max(self.attempts, task.attempts)

    def break_line(self) -> None:
        """End a partly written line of output on a terminal, before a note on stderr."""
        if not self.json_lines and not self.ends_with_newline and self.out.isatty():
            self.out.write("\n")
            self.out.flush()
            self.ends_with_newline = True

    def finish(self, task: Task) -> None:
        """A final status line on stderr (nothing in JSON mode: the last line says it)."""
        if self.json_lines:
            return
        if not self.ends_with_newline and self.out.isatty():
            self.out.write("\n")
            self.out.flush()
        self._note(finish_line(task), _STATUS_STYLE.get(task.status, "33"))


class DocumentPrinter:
    """`--output json` of a followed task: nothing while it streams, then one JSON document,
    `{"task": <task>, "output": [<chunk>, …]}`, with the task as it ended (or as it was, when
    only the stored output was printed)."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.chunks: list[dict[str, Any]] = []

    def event(self, event: TaskEvent) -> None:
        if isinstance(event, OutputReceived):
            self.chunks.append(chunk_doc(event.chunk))

    def break_line(self) -> None:
        """Nothing is written before the end."""

    def finish(self, task: Task) -> None:
        self.out.write(dumps({"task": task_doc(task), "output": self.chunks}))
        self.out.flush()


_STATUS_STYLE = {TaskStatus.COMPLETED: "32", TaskStatus.FAILED: "31"}


def finish_line(task: Task) -> str:
    """`task tsk_... completed`, or `... failed: <error>` (no repeated "cancelled: cancelled")."""
    status = status_name(task.status)
    error = task.error
    if error.lower().startswith(status):
        error = error[len(status) :].lstrip(" :")
    if task.status is TaskStatus.COMPLETED or not error:
        return f"task {task.id} {status}"
    return f"task {task.id} {status}: {error}"


# --- fleet events (`taskrun events`) -------------------------------------------------------------


def event_doc(event: FleetEvent) -> dict[str, Any]:
    """One JSON object per event: kind, time, snapshot, and the worker, task, run or chunk."""
    doc: dict[str, Any] = {
        "kind": status_name(event.kind),
        "time": format_time(event.time) if event.time else None,
        "snapshot": event.snapshot,
    }
    if event.position:
        doc["position"] = event.position
    if event.worker is not None:
        doc["worker"] = worker_doc(event.worker, event.worker_runs)
    if event.task is not None:
        doc["task"] = task_doc(event.task)
    if event.run is not None:
        doc["run"] = run_doc(event.run)
    if event.chunk is not None:
        doc["chunk"] = chunk_doc(event.chunk)
    if event.inbox_item is not None:
        i = event.inbox_item
        doc["inbox_item"] = {
            "id": i.id,
            "workflow_run_id": i.run_id,
            "workflow": i.workflow,
            "step": i.step,
            "question": i.question,
            "choices": list(i.choices),
        }
    return doc


def event_line(event: FleetEvent) -> str:
    """One line per event: `10:00:01.250  task_changed  t-… echo running worker=worker-1`."""
    stamp = event.time.astimezone(UTC).strftime("%H:%M:%S.%f")[:-3] if event.time else NONE
    kind = status_name(event.kind)
    if event.worker is not None:
        w = event.worker
        text = (
            f"{w.id} {status_name(w.status)} host={w.hostname or NONE} "
            f"runs={len(event.worker_runs)}/{w.max_concurrent_runs} "
            f"agents={agent_names(w.agents)}"
        )
    elif event.task is not None:
        t = event.task
        text = f"{t.id} {t.agent} {status_name(t.status)} attempts={t.attempts}"
        if t.worker_id:
            text += f" worker={t.worker_id}"
        if t.error:
            text += f" error={_one_line(t.error, 80)}"
    elif event.run is not None:
        r = event.run
        text = f"{r.id} task={r.task_id} attempt={r.attempt} {status_name(r.status)}"
        if r.worker_id:
            text += f" worker={r.worker_id}"
        if r.error:
            text += f" error={_one_line(r.error, 80)}"
    elif event.chunk is not None:
        c = event.chunk
        data = format_event(c.data, 120) if c.kind is OutputKind.EVENT else _one_line(c.data, 120)
        text = f"{c.task_id or NONE} {c.run_id} #{c.seq} {data}"
    elif event.inbox_item is not None:
        i = event.inbox_item
        text = f"{i.id} {i.workflow}/{i.step} {_one_line(i.question, 100)}"
    else:
        text = "snapshot complete; live changes follow" if event.kind.name == "SNAPSHOT_END" else ""
    marker = " (snapshot)" if event.snapshot and event.kind.name != "SNAPSHOT_END" else ""
    return f"{stamp}  {kind:<19} {text}{marker}\n"
