"""Plain typed domain objects. Protobuf stays at the edges; these are what the code works with."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from enum import IntEnum
from operator import attrgetter
from typing import Any, Final

from taskrun.core.ids import ConversationId, RunId, TaskId, WorkerId
from taskrun.core.status import Fault, RunStatus, TaskStatus, WorkerStatus


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class ModelBackend:
    """The model behind an agent."""

    provider: str
    model_name: str = ""
    context_window: int = 0
    modalities: tuple[str, ...] = ("text",)
    tools: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """What a worker announces about one agent it can run."""

    name: str
    description: str = ""
    backends: tuple[ModelBackend, ...] = ()
    input_schema: str = ""  # JSON Schema text; empty when unconstrained
    supports_sessions: bool = False
    # why the worker cannot run it now (no credentials, SDK or CLI missing); "" when it can
    unavailable_reason: str = ""

    @property
    def available(self) -> bool:
        return not self.unavailable_reason


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    cost_usd: float = 0.0
    turns: int = 0
    duration_ms: int = 0

    def add(self, other: Usage) -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cache_read_tokens += other.cache_read_tokens
        self.cache_creation_tokens += other.cache_creation_tokens
        self.cost_usd += other.cost_usd
        self.turns += other.turns
        self.duration_ms += other.duration_ms

    @property
    def empty(self) -> bool:
        return self == _NO_USAGE


_NO_USAGE = Usage()  # compared with, never handed out


DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_OUTPUT_RETRIES = 2  # re-asks after a reply that does not match the output schema


@dataclass(slots=True)
class ModelSettings:
    """What a task asks of the model behind its agent; empty fields leave the agent's defaults.
    `append_system_prompt`, `env`, `mcp_servers` (a JSON object, as text) and the tool lists are
    for claude_code; other agents ignore them."""

    system_prompt: str = ""
    max_tokens: int = 0
    temperature: float | None = None
    stop_sequences: list[str] = field(default_factory=list)
    append_system_prompt: str = ""
    env: dict[str, str] = field(default_factory=dict)
    mcp_servers: str = ""
    allowed_tools: list[str] = field(default_factory=list)
    disallowed_tools: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        # asked of every task created and assigned: field by field, not a dataclass comparison
        return not (
            self.system_prompt
            or self.max_tokens
            or self.temperature is not None
            or self.stop_sequences
            or self.append_system_prompt
            or self.env
            or self.mcp_servers
            or self.allowed_tools
            or self.disallowed_tools
        )

    def copy(self) -> ModelSettings:
        return replace(
            self,
            stop_sequences=list(self.stop_sequences),
            env=dict(self.env),
            allowed_tools=list(self.allowed_tools),
            disallowed_tools=list(self.disallowed_tools),
        )


@dataclass(slots=True)
class TaskPolicy:
    """How a task is scheduled, retried and bounded. Durations are seconds."""

    priority: int = 0
    timeout: float | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    idempotency_key: str = ""
    required_labels: dict[str, str] = field(default_factory=dict)
    queue_timeout: float | None = None
    retry_on_failure: bool = False
    required_provider: str = ""
    required_model: str = ""
    output_schema: str = ""  # a JSON Schema object, as text; empty: any result
    output_retries: int = DEFAULT_OUTPUT_RETRIES
    model_settings: ModelSettings = field(default_factory=ModelSettings)
    max_cost_usd: float = 0.0  # the worker stops a run that spends more; 0: no limit
    # Agents orchestrating agents: the run may create sub-tasks through the MCP server, within
    # the tree's budget (given to its root: sub-tasks in all, cost of the finished ones; 0 = no
    # limit).
    allow_subtasks: bool = False
    max_subtasks: int = 0
    subtask_budget_usd: float = 0.0

    def copy(self) -> TaskPolicy:
        """A copy sharing nothing mutable with this one."""
        return replace(
            self,
            required_labels=dict(self.required_labels),
            model_settings=self.model_settings.copy(),
        )


def asked_model(required_model: str, input_json: str) -> str:
    """The model a task asks for: its policy's required model, else a `model` its input names
    (a non-empty string, as the model agents take it). Either binds dispatch alike: the run goes
    only to a worker whose agent announces that model, a task that may wait says why, and
    submission refuses one that no online worker offers. The required model wins when both are
    given (it is also the one the agent uses)."""
    if required_model:
        return required_model
    if "model" not in input_json and "\\u" not in input_json:  # cheap: most inputs name none
        return ""
    try:
        value = json.loads(input_json)
    except ValueError:
        return ""
    named = value.get("model") if isinstance(value, dict) else None
    return named if isinstance(named, str) else ""


@dataclass(slots=True)
class RunOptions:
    """What a run's task asks of its agent beyond the input (from the policy, checked at
    submission): the schema its result must match, how often to re-ask the model for it, the
    model settings, and the cost at which the worker stops the run (0: none)."""

    output_schema: dict[str, Any] | None = None
    output_retries: int = DEFAULT_OUTPUT_RETRIES
    model_settings: ModelSettings = field(default_factory=ModelSettings)
    max_cost_usd: float = 0.0


@dataclass(slots=True)
class TaskSpec:
    """A validated submission: what the user asked for, before it becomes a Task."""

    agent: str
    input: str  # a JSON object, as text
    labels: dict[str, str] = field(default_factory=dict)
    policy: TaskPolicy = field(default_factory=TaskPolicy)
    schedule: str = ""
    parent_task_id: TaskId | None = None  # a sub-task: a run of this task created it


@dataclass(slots=True)
class Task:
    id: TaskId
    agent: str
    input: str
    labels: dict[str, str]
    policy: TaskPolicy
    status: TaskStatus
    created_at: datetime
    updated_at: datetime
    attempts: int = 0
    current_run_id: RunId | None = None
    worker_id: WorkerId | None = None
    finished_at: datetime | None = None
    error: str = ""
    result: str = ""
    usage: Usage = field(default_factory=Usage)
    schedule: str = ""
    cancel_requested: bool = False
    # why a PENDING task waits; computed by the control plane when the task is read, never stored
    waiting_reason: str = ""
    conversation_id: ConversationId | None = None  # set when the task is a conversation's turn
    turn: int = 0  # its index in the conversation, from 1
    parent_task_id: TaskId | None = None  # a sub-task: a run of this task created it
    root_task_id: TaskId | None = None  # the top of its tree (None for a root)
    depth: int = 0  # 0 for a root; parent's depth + 1

    @property
    def tree_root(self) -> TaskId:
        return self.root_task_id or self.id

    def snapshot(self) -> Task:
        """A copy that later changes to this task leave as it is: the engine replaces a task's
        mutable parts rather than changing them in place, except its usage, which is copied.
        (Field by field in one call: copy.copy takes five times as long, for every task
        created.)"""
        copied = Task(*_TASK_FIELDS(self))
        copied.usage = Usage(*_USAGE_FIELDS(self.usage))
        return copied

    def same_request(self, spec: TaskSpec) -> bool:
        """Whether `spec` asks for exactly this task (idempotent resubmission)."""
        return (
            self.agent == spec.agent
            and self.input == spec.input
            and self.labels == spec.labels
            and self.policy == spec.policy
            and self.parent_task_id == spec.parent_task_id
        )


# every field of both, in __init__'s order (no field is init=False)
_TASK_FIELDS: Final = attrgetter(*(f.name for f in fields(Task)))
_USAGE_FIELDS: Final = attrgetter(*(f.name for f in fields(Usage)))


@dataclass(slots=True)
class Run:
    id: RunId
    task_id: TaskId
    attempt: int
    status: RunStatus
    created_at: datetime
    worker_id: WorkerId | None = None
    assigned_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str = ""
    result: str = ""
    usage: Usage = field(default_factory=Usage)
    backend_used: ModelBackend | None = None
    session_id: str = ""
    prompt: str = ""
    # SHA-256 of the run's sub-task credential (a task that allows sub-tasks); "" for none
    credential_hash: str = ""
    # a failed run: whose fault its worker said it was (only the worker's count towards the
    # worker's quarantine)
    fault: Fault = Fault.UNKNOWN


@dataclass(slots=True)
class Worker:
    id: WorkerId
    hostname: str = ""
    version: str = ""
    agents: tuple[AgentSpec, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    max_concurrent_runs: int = 1
    status: WorkerStatus = WorkerStatus.OFFLINE
    first_seen_at: datetime | None = None
    connected_at: datetime | None = None
    last_heartbeat_at: datetime | None = None
    certificate_expires_at: datetime | None = None
    revoked_at: datetime | None = None  # revoked by an operator: refused for good
    revoked_reason: str = ""
    # Labels bound to the worker's bootstrap token at enrollment; they override what the worker
    # announces in its hello, so a worker cannot claim labels it was not enrolled with.
    enrolled_labels: dict[str, str] = field(default_factory=dict)
    enrolled_at: datetime | None = None
    # Worker health, kept in memory by the control plane (never stored): runs that failed fast
    # in a row, and the quarantine they caused (no new runs before then).
    consecutive_failures: int = 0
    quarantined_until: datetime | None = None
    quarantine_reason: str = ""


class OutputKind(IntEnum):
    TEXT = 1
    EVENT = 2


@dataclass(frozen=True, slots=True)
class OutputChunk:
    """One piece of a run's output; (run_id, attempt, seq) identifies it, seq from 1."""

    run_id: RunId
    attempt: int
    seq: int
    data: str
    kind: OutputKind = OutputKind.TEXT
    time: datetime | None = None
    task_id: TaskId | None = None


# --- conversations -----------------------------------------------------------------------------

MAX_SESSION_SNAPSHOT_BYTES = 2 * 1024 * 1024  # compressed; larger sessions are not moved


@dataclass(slots=True)
class Conversation:
    """An ordered list of turns with one agent; each turn is one Task. The transcript (the turns'
    messages and answers) lives in the control plane, so any worker offering the agent can run the
    next turn. `session_*` is the agent's own state (claude_code) as of the newest turn that
    reported it: its id, its file (zlib-compressed JSONL) and the running cost total it had."""

    id: ConversationId
    agent: str
    title: str
    labels: dict[str, str]
    input: str  # JSON object: the agent options every turn starts from ("prompt" excluded)
    policy: TaskPolicy
    created_at: datetime
    updated_at: datetime
    turns: int = 0
    usage: Usage = field(default_factory=Usage)  # the sum of the turns' usage
    session_id: str = ""
    session_snapshot: bytes = b""
    session_cost_usd: float = 0.0
    session_turn: int = 0  # the turn whose end left the session as it is
    summarized_through: int = 0  # turns up to this one are summarized (0: none)
    summary: str = ""


@dataclass(slots=True)
class Turn:
    """One user message of a conversation and what the agent answered; `task_id` ran it."""

    conversation_id: ConversationId
    index: int  # from 1
    task_id: TaskId
    message: str
    created_at: datetime
    status: TaskStatus = TaskStatus.PENDING
    answer: str = ""
    tools: str = ""  # compact JSON array of the tool calls and results, bounded
    error: str = ""
    usage: Usage = field(default_factory=Usage)  # what this turn spent, never a running total
    finished_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class TranscriptMessage:
    role: str  # "user" or "assistant"
    text: str
    turn: int = 0  # the turn it belongs to; 0 for the summary of earlier turns


@dataclass(frozen=True, slots=True)
class TurnContext:
    """What a worker needs to run a conversation's turn: the earlier turns and the session."""

    conversation_id: ConversationId
    turn: int
    history: tuple[TranscriptMessage, ...] = ()
    session_id: str = ""
    session_snapshot: bytes = b""
    session_cost_usd: float = 0.0
    session_turn: int = 0  # the turn whose end left the session as it is; later ones it lacks
    # Compaction: the history would not fit the model's context window, so the agent first
    # summarizes the messages of turns up to this one (and any earlier summary) into one, uses
    # that instead, and returns the summary with its result. 0: no compaction.
    summarize_through: int = 0


# Compaction: when the transcript would take more than this share of the model's context window
# (estimated at 4 characters a token), older turns are summarized; the newest are kept verbatim.
COMPACT_AT = 0.5
KEEP_RECENT_TURNS = 1
SUMMARY_PREFIX = "Summary of our conversation so far:\n"


def estimated_tokens(messages: tuple[TranscriptMessage, ...], message: str) -> int:
    return (sum(len(m.text) for m in messages) + len(message)) // 4 + 4 * len(messages)


def transcript(
    turns: list[Turn], summary: str = "", summarized_through: int = 0
) -> tuple[TranscriptMessage, ...]:
    """The messages of finished turns, in order: each user message, then the answer when there
    is one (a failed or cancelled turn keeps its message and says how it ended), with the tool
    calls in compact form. Turns up to `summarized_through` are replaced by `summary`."""
    out: list[TranscriptMessage] = []
    if summary and summarized_through:
        out.append(TranscriptMessage("user", SUMMARY_PREFIX + summary))
        out.append(TranscriptMessage("assistant", "Understood."))
    for turn in turns:
        if turn.index <= summarized_through:
            continue
        out.append(TranscriptMessage("user", turn.message, turn.index))
        answer = turn.answer
        if turn.tools:
            answer = f"[tools used: {turn.tools}]\n{answer}".strip()
        if turn.status is TaskStatus.COMPLETED or answer:
            out.append(TranscriptMessage("assistant", answer or "(no answer)", turn.index))
        elif turn.status.terminal:
            what = turn.status.name.lower()
            text = f"(this turn {what}: {turn.error})"
            out.append(TranscriptMessage("assistant", text, turn.index))
    return tuple(out)
