"""Storage protocols. Every store (memory, SQLite, later PostgreSQL) implements `Store`.

Writes go through `Store.apply(ChangeSet)`: one atomic, durable unit (upserts of tasks, runs and
workers, and appends of output). Implementations may group several change sets into one
transaction, but each change set is all-or-nothing and durable once `apply` returns.

A failed write fences the store: the change set that failed, every one queued behind it and every
one submitted later fail too (StoreUnavailable) until the owner calls `resume`. Change sets are
built on the ones before them, so letting a later one land after an earlier one failed would
store a state that never existed; the owner reloads its view from the store before resuming.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import NamedTuple, Protocol

from taskrun.core.access import ApiToken, AuditEvent, AuditQuery, BootstrapToken
from taskrun.core.ids import ConversationId, RunId, TaskId, WorkerId
from taskrun.core.models import Conversation, OutputChunk, Run, Task, Turn, Usage, Worker
from taskrun.core.schedule import Schedule
from taskrun.core.status import TaskStatus, WorkerStatus
from taskrun.core.webhooks import Webhook, WebhookDelivery
from taskrun.core.workflow import Workflow, WorkflowRun

FENCED = "the store refuses writes after a failed one until the control plane recovers"
# How many events the durable event log keeps (the oldest are deleted beyond it, a thousand
# at a time: a delete in every transaction cost the SQL stores a round trip each).
EVENT_RETENTION = 100_000
_TRIM_EVERY = 1000


def trim_due(first: int, last: int, retention: int = EVENT_RETENTION) -> bool:
    """Whether a transaction that logs positions first..last should delete the oldest."""
    return last > retention and first // _TRIM_EVERY != (last + 1) // _TRIM_EVERY


class LoggedEvent(NamedTuple):  # a tuple: made for every change, it must be cheap to make
    """One event of the durable event log: a change a watcher can resume after.

    Positions are given by the control plane that leads (one more than the newest stored when
    it started), so they increase across control planes; the store refuses a position it
    already holds. `data` is what the store keeps and gives back, opaque to it: the event as the
    wire carries it (serialized taskrun.v1.Event), or the compact form of
    `controlplane/store/eventlog.py`. A task or run change is logged with `subject` set and no
    `data`: the store encodes it from the row it writes for that object in the same change set,
    so logging the change costs next to nothing beyond writing it (`time`: microseconds since
    the epoch).
    """

    position: int
    kind: int
    task_id: str
    worker_id: str
    data: bytes = b""
    subject: Task | Run | None = None
    time: int = 0


@dataclass(frozen=True, slots=True)
class LateUsage:
    """What a run spent, reported after the run had already ended in the store (its task was
    cancelled while the worker still ran it). The store adds `usage` to the stored usage of the
    run, its task and, for a conversation's turn, the turn and the conversation, in the write
    transaction itself: those rows may have been rewritten since the engine last read them, and
    a row that is gone (a deleted conversation) is left gone."""

    run_id: RunId
    task_id: TaskId
    usage: Usage
    conversation_id: ConversationId | None = None
    turn: int = 0
    agent: str = ""  # for metrics: the stores ignore these three
    model: str = ""
    worker_id: str = ""


@dataclass(slots=True)
class ChangeSet:
    # Upserts by id. What a task is created with (agent, input, labels, created_at, schedule,
    # its place in a tree) and a run's task, attempt and created_at never change afterwards:
    # a store may leave them as first written when the same id comes again.
    tasks: list[Task] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)
    chunks: list[OutputChunk] = field(default_factory=list)  # duplicates are ignored
    # Schedules: upserts by name, then deletions by name (deleting a missing one is a no-op).
    schedules: list[Schedule] = field(default_factory=list)
    deleted_schedules: list[str] = field(default_factory=list)
    # Access control: token upserts by id; audit events are appended (the store numbers them).
    bootstrap_tokens: list[BootstrapToken] = field(default_factory=list)
    api_tokens: list[ApiToken] = field(default_factory=list)
    audit_events: list[AuditEvent] = field(default_factory=list)
    # Conversations: upserts by id, turns by (conversation_id, index); deleting a conversation
    # deletes its turns (its tasks stay, as history). Deletions run after the upserts.
    conversations: list[Conversation] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    deleted_conversations: list[ConversationId] = field(default_factory=list)
    # Workflow definitions are inserted (a (name, version) is never rewritten);
    # workflow runs are upserts by id (their steps' state included).
    workflows: list[Workflow] = field(default_factory=list)
    workflow_runs: list[WorkflowRun] = field(default_factory=list)
    late_usage: list[LateUsage] = field(default_factory=list)  # applied after the upserts
    # Appended to the event log in the same transaction as the changes they describe.
    events: list[LoggedEvent] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(
            self.tasks
            or self.runs
            or self.workers
            or self.chunks
            or self.schedules
            or self.deleted_schedules
            or self.bootstrap_tokens
            or self.api_tokens
            or self.audit_events
            or self.conversations
            or self.turns
            or self.deleted_conversations
            or self.workflows
            or self.workflow_runs
            or self.late_usage
            or self.events
        )

    def merge(self, other: ChangeSet) -> None:
        self.tasks.extend(other.tasks)
        self.runs.extend(other.runs)
        self.workers.extend(other.workers)
        self.chunks.extend(other.chunks)
        self.schedules.extend(other.schedules)
        self.deleted_schedules.extend(other.deleted_schedules)
        self.bootstrap_tokens.extend(other.bootstrap_tokens)
        self.api_tokens.extend(other.api_tokens)
        self.audit_events.extend(other.audit_events)
        self.conversations.extend(other.conversations)
        self.turns.extend(other.turns)
        self.deleted_conversations.extend(other.deleted_conversations)
        self.workflows.extend(other.workflows)
        self.workflow_runs.extend(other.workflow_runs)
        self.late_usage.extend(other.late_usage)
        self.events.extend(other.events)


@dataclass(frozen=True, slots=True)
class TaskQuery:
    statuses: frozenset[TaskStatus] = frozenset()
    agent: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    worker_id: str = ""
    schedule: str = ""
    parent_task_id: str = ""  # only the direct sub-tasks of this task
    limit: int = 50
    before: TaskId | None = None  # newest first: only ids smaller than this


@dataclass(frozen=True, slots=True)
class TaskPage:
    tasks: list[Task]
    next_before: TaskId | None  # None on the last page


class TaskStore(Protocol):
    async def get_task(self, task_id: TaskId) -> Task | None: ...
    async def get_task_by_idempotency_key(self, key: str) -> Task | None: ...
    async def list_tasks(self, query: TaskQuery) -> TaskPage: ...
    async def list_unfinished_tasks(self) -> list[Task]: ...
    async def list_task_tree(self, root_task_id: TaskId) -> list[Task]:
        """Every task below this root (its sub-tasks, theirs...), oldest first."""
        ...


@dataclass(frozen=True, slots=True)
class RunSpending:
    """What one ended run spent, with what its task was: for usage totals and budgets."""

    run: Run
    agent: str
    labels: dict[str, str]
    schedule: str


@dataclass(frozen=True, slots=True)
class UsageSum:
    """What the runs that ended on one UTC day spent, per agent, model and worker."""

    day: date
    agent: str
    model: str  # "" when the runs reported none
    worker_id: str
    runs: int
    usage: Usage


class RunStore(Protocol):
    async def get_run(self, run_id: RunId) -> Run | None: ...
    async def list_runs(self, task_id: TaskId) -> list[Run]: ...
    async def list_unfinished_runs(self) -> list[Run]: ...
    async def list_spending(self, since: datetime) -> list[RunSpending]:
        """Runs that ended at or after `since`, with their task's agent, labels and schedule."""
        ...

    async def usage_sums(self, since: datetime) -> list[UsageSum]:
        """What the runs that ended at or after `since` spent, summed per UTC day, agent, model
        and worker (in no particular order): one row a group, however many runs it holds."""
        ...


class WorkerStore(Protocol):
    async def get_worker(self, worker_id: WorkerId) -> Worker | None: ...
    async def list_workers(
        self, statuses: frozenset[WorkerStatus] = frozenset()
    ) -> list[Worker]: ...


class OutputStore(Protocol):
    async def read_output(
        self, run_ids: Sequence[RunId], after: dict[RunId, int] | None = None, limit: int = 10_000
    ) -> list[OutputChunk]:
        """Chunks of these runs in (run order given, seq) order, after the given seq per run."""
        ...

    async def output_heads(self, run_ids: Sequence[RunId]) -> dict[RunId, int]:
        """The highest chunk seq stored of each of these runs that has output."""
        ...


class ScheduleStore(Protocol):
    async def get_schedule(self, name: str) -> Schedule | None: ...
    async def list_schedules(self) -> list[Schedule]:
        """Every schedule, ordered by name."""
        ...


class TokenStore(Protocol):
    async def get_bootstrap_token(self, token_id: str) -> BootstrapToken | None: ...
    async def list_bootstrap_tokens(self) -> list[BootstrapToken]:
        """Every bootstrap token, oldest first."""
        ...

    async def consume_bootstrap_token(
        self, token_id: str, now: datetime, host: str = ""
    ) -> BootstrapToken | None:
        """Atomically mark the token used (used_at=now, used_by_host=host) if it is neither used
        nor revoked, and return it as updated; None when it is missing, used or revoked.

        Expiry is deliberately not checked here: the caller consumes first and checks after, so
        that a replay of any token, expired or not, always fails. Durable on return.
        """
        ...

    async def get_api_token(self, token_id: str) -> ApiToken | None: ...
    async def list_api_tokens(self) -> list[ApiToken]:
        """Every API token, oldest first."""
        ...


class AuditStore(Protocol):
    async def list_audit_events(self, query: AuditQuery) -> list[AuditEvent]:
        """Newest first; at most query.limit; only ids below query.before_id when it is set."""
        ...


class WebhookStore(Protocol):
    """webhook subscriptions and their deliveries. Each write is its own transaction,
    durable on return (webhooks are not part of the engine's change sets)."""

    async def add_webhook(self, webhook: Webhook) -> None:
        """Store a new webhook; ValueError when its id is taken."""
        ...

    async def delete_webhook(self, webhook_id: str) -> bool:
        """Delete the webhook and its deliveries; False when there was none."""
        ...

    async def list_webhooks(self) -> list[Webhook]:
        """Every webhook, oldest first."""
        ...

    async def add_webhook_deliveries(
        self, deliveries: Sequence[WebhookDelivery]
    ) -> list[WebhookDelivery]:
        """Store new deliveries; one whose (webhook_id, event_key) is already stored, or whose
        webhook is gone, is skipped. Returns those stored."""
        ...

    async def update_webhook_delivery(self, delivery: WebhookDelivery) -> None:
        """Record an attempt: status, attempts, last code and error, next attempt, delivered."""
        ...

    async def list_webhook_deliveries(
        self, webhook_id: str = "", *, pending: bool = False, limit: int = 100
    ) -> list[WebhookDelivery]:
        """Pending ones by next attempt (`pending`), else every one newest first."""
        ...


@dataclass(frozen=True, slots=True)
class ConversationQuery:
    agent: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    limit: int = 50
    before: ConversationId | None = None  # newest first: only ids smaller than this


class ConversationStore(Protocol):
    async def get_conversation(self, conversation_id: ConversationId) -> Conversation | None: ...
    async def list_conversations(self, query: ConversationQuery) -> list[Conversation]:
        """Newest first, at most query.limit."""
        ...

    async def list_turns(self, conversation_id: ConversationId) -> list[Turn]:
        """The conversation's turns in order."""
        ...


class WorkflowStore(Protocol):
    """Workflow definitions (every version) and workflow runs."""

    async def get_workflow(self, name: str, version: int = 0) -> Workflow | None:
        """That version of the workflow; the newest when `version` is 0."""
        ...

    async def list_workflows(self) -> list[Workflow]:
        """The newest version of every workflow, ordered by name."""
        ...

    async def get_workflow_run(self, run_id: str) -> WorkflowRun | None: ...
    async def get_workflow_run_by_key(self, key: str) -> WorkflowRun | None: ...
    async def list_workflow_runs(
        self,
        workflow: str = "",
        *,
        unfinished: bool = False,
        limit: int = 100,
        before: tuple[datetime, str] | None = None,
    ) -> list[WorkflowRun]:
        """Newest first (all of them when `unfinished`), of one workflow when it is named; only
        runs older than `before` (created_at, id) when it is given."""
        ...


class EventLogStore(Protocol):
    async def read_events(self, after: int, limit: int = 1000) -> list[LoggedEvent]:
        """Logged events with a position above `after`, oldest first, at most `limit`."""
        ...

    async def event_positions(self) -> tuple[int, int]:
        """(oldest, newest) position in the log; (0, 0) when it is empty."""
        ...


class Store(
    TaskStore,
    RunStore,
    WorkerStore,
    OutputStore,
    ScheduleStore,
    TokenStore,
    AuditStore,
    WebhookStore,
    ConversationStore,
    WorkflowStore,
    EventLogStore,
    Protocol,
):
    async def open(self) -> None: ...

    async def apply(self, changes: ChangeSet) -> None:
        """Commit atomically; return once durable."""
        ...

    def submit(self, changes: ChangeSet) -> Awaitable[None]:
        """Capture `changes` now (later mutation of the objects cannot leak in) and queue them.

        The returned awaitable completes once they are durable. Change sets commit in the order
        they were submitted. Once one fails, it and all after it fail until `resume` (see above):
        StoreUnavailable when the store cannot write, ValueError for a constraint violation.
        """
        ...

    async def resume(self) -> None:
        """Accept writes again after a failure, once a test write succeeds.

        Raises StoreUnavailable while the store still cannot write (the fence stays up).
        """
        ...

    async def close(self) -> None: ...
