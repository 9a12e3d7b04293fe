"""In-memory `Store` for tests. It mirrors `SqliteStore`: same ordering, pagination, output
dedupe and constraints (foreign keys, unique idempotency keys, timezone-aware datetimes), with
constraint violations raised as ValueError. Everything stored or returned is a copy.

Why one module: it is one implementation of the Store protocol, and the contract suite holds it
to the SQL stores table by table; splitting it by table would scatter the single lock-free
validate-then-apply step that makes each change set all or nothing.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import UTC, date, datetime

from taskrun.controlplane.store.eventlog import with_data
from taskrun.core.access import ApiToken, AuditEvent, AuditQuery, BootstrapToken
from taskrun.core.errors import StoreUnavailable
from taskrun.core.ids import ConversationId, RunId, TaskId, WorkerId
from taskrun.core.models import Conversation, OutputChunk, Run, Task, Turn, Usage, Worker
from taskrun.core.schedule import Schedule, copy_schedule
from taskrun.core.status import RunStatus, TaskStatus, WorkerStatus
from taskrun.core.store import (
    EVENT_RETENTION,
    FENCED,
    ChangeSet,
    ConversationQuery,
    LateUsage,
    LoggedEvent,
    RunSpending,
    TaskPage,
    TaskQuery,
    UsageSum,
)
from taskrun.core.webhooks import DeliveryStatus, Webhook, WebhookDelivery
from taskrun.core.workflow import Workflow, WorkflowRun, copy_run

__all__ = ["MemoryStore"]

_UNFINISHED_TASK = frozenset({TaskStatus.PENDING, TaskStatus.RUNNING})
_UNFINISHED_RUN = frozenset({RunStatus.PENDING, RunStatus.ASSIGNED, RunStatus.RUNNING})


def _copy_task(t: Task) -> Task:
    return replace(
        t,
        labels=dict(t.labels),
        policy=t.policy.copy(),
        usage=replace(t.usage),
    )


def _copy_workflow(w: Workflow) -> Workflow:
    return replace(w, definition=json.loads(json.dumps(w.definition)))


def _copy_run(r: Run) -> Run:
    return replace(r, usage=replace(r.usage))


def _copy_worker(w: Worker) -> Worker:
    # agents are immutable
    return replace(w, labels=dict(w.labels), enrolled_labels=dict(w.enrolled_labels))


def _copy_conversation(c: Conversation) -> Conversation:
    return replace(
        c,
        labels=dict(c.labels),
        policy=c.policy.copy(),
        usage=replace(c.usage),
    )


def _copy_turn(t: Turn) -> Turn:
    return replace(t, usage=replace(t.usage))


def _copy_bootstrap(t: BootstrapToken) -> BootstrapToken:
    return replace(t, labels=dict(t.labels))


def _copy_api(t: ApiToken) -> ApiToken:
    return replace(t)  # scopes is a frozenset


class _Unencodable(ValueError):
    """A value SQLite could not even encode: refused before it is queued, so it fences nothing."""


def _check_aware(values: Iterable[datetime | None]) -> None:
    for value in values:
        if value is not None and value.utcoffset() is None:
            raise _Unencodable(f"datetimes must be timezone-aware, got {value!r}")


class MemoryStore:
    """Dict-based `Store`; `open()` is optional, use after `close()` raises RuntimeError.

    At most `audit_retention` audit events are kept: the oldest are dropped beyond that.
    """

    def __init__(
        self, *, audit_retention: int = 100_000, event_retention: int = EVENT_RETENTION
    ) -> None:
        if audit_retention < 1:
            raise ValueError(f"audit_retention must be positive, got {audit_retention}")
        self.commits = 0
        self._tasks: dict[TaskId, Task] = {}
        self._by_key: dict[str, TaskId] = {}
        self._runs: dict[RunId, Run] = {}
        self._workers: dict[WorkerId, Worker] = {}
        self._output: dict[RunId, dict[tuple[int, int], OutputChunk]] = {}
        self._schedules: dict[str, Schedule] = {}
        self._conversations: dict[ConversationId, Conversation] = {}
        self._turns: dict[ConversationId, dict[int, Turn]] = {}
        self._bootstrap_tokens: dict[str, BootstrapToken] = {}
        self._api_tokens: dict[str, ApiToken] = {}
        self._audit: deque[AuditEvent] = deque(maxlen=audit_retention)  # oldest first
        self._last_audit_id = 0  # ids are never reused, even after retention drops events
        self._closed = False
        self._fenced = ""  # why writes are refused until `resume` (a write failed)
        self._failing = ""  # test hook: every write fails with this reason while set
        self._webhooks: dict[str, Webhook] = {}
        self._deliveries: dict[str, WebhookDelivery] = {}
        self._workflows: dict[tuple[str, int], Workflow] = {}
        self._workflow_runs: dict[str, WorkflowRun] = {}
        self._workflow_run_keys: dict[str, str] = {}
        self._events: deque[LoggedEvent] = deque(maxlen=event_retention)  # oldest first

    async def open(self) -> None:
        """Nothing to prepare."""
        if self._closed:
            raise RuntimeError("store is closed")

    async def close(self) -> None:
        """Refuse further use. Idempotent."""
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("store is not open")

    # --- writes --------------------------------------------------------------------------------

    def fail_writes(self, reason: str | None) -> None:
        """Make every write fail with StoreUnavailable(reason) until called with None (the
        memory store's stand-in for a full disk, for tests)."""
        self._failing = reason or ""

    async def resume(self) -> None:
        """Accept writes again after a failed one; StoreUnavailable while writes still fail."""
        self._check_open()
        if self._failing:
            raise StoreUnavailable(f"the store cannot write: {self._failing}")
        self._fenced = ""

    def submit(self, changes: ChangeSet) -> asyncio.Future[None]:
        """Apply now (copies, all or nothing); the returned future holds the outcome."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            self._apply_now(changes)
        except Exception as exc:
            future.set_exception(exc)
        else:
            future.set_result(None)
        return future

    async def apply(self, changes: ChangeSet) -> None:
        self._apply_now(changes)

    def _apply_now(self, changes: ChangeSet) -> None:
        """Validate the whole change set first, then store copies of it (all or nothing).

        A failure fences the store: later writes fail too until `resume`, as in SqliteStore.
        """
        self._check_open()
        if not changes:
            return
        if self._fenced:
            raise StoreUnavailable(f"{FENCED}: {self._fenced}")
        try:
            if self._failing:
                raise StoreUnavailable(f"the store cannot write: {self._failing}")
            self._validate(changes)
        except _Unencodable:
            raise
        except Exception as exc:
            self._fenced = str(exc)
            raise
        for task in changes.tasks:
            old = self._tasks.get(task.id)
            if old is not None and old.policy.idempotency_key:
                self._by_key.pop(old.policy.idempotency_key, None)
            self._tasks[task.id] = _copy_task(task)
            if task.policy.idempotency_key:
                self._by_key[task.policy.idempotency_key] = task.id
        for run in changes.runs:
            self._runs[run.id] = _copy_run(run)
        for worker in changes.workers:
            self._workers[worker.id] = _copy_worker(worker)
        for chunk in changes.chunks:
            stored = self._output.setdefault(chunk.run_id, {})
            stored.setdefault((chunk.attempt, chunk.seq), replace(chunk, task_id=None))
        for schedule in changes.schedules:
            self._schedules[schedule.name] = copy_schedule(schedule)
        for name in changes.deleted_schedules:
            self._schedules.pop(name, None)
        for token in changes.bootstrap_tokens:
            self._bootstrap_tokens[token.id] = _copy_bootstrap(token)
        for api_token in changes.api_tokens:
            self._api_tokens[api_token.id] = _copy_api(api_token)
        for conversation in changes.conversations:
            self._conversations[conversation.id] = _copy_conversation(conversation)
            self._turns.setdefault(conversation.id, {})
        for turn in changes.turns:
            self._turns[turn.conversation_id][turn.index] = _copy_turn(turn)
        for conversation_id in changes.deleted_conversations:
            self._conversations.pop(conversation_id, None)
            self._turns.pop(conversation_id, None)
        for late in changes.late_usage:
            self._add_late_usage(late)
        for event in changes.audit_events:  # frozen: no copy needed
            self._last_audit_id += 1
            self._audit.append(replace(event, id=self._last_audit_id))
        for workflow in changes.workflows:
            self._workflows[(workflow.name, workflow.version)] = _copy_workflow(workflow)
        for wf_run in changes.workflow_runs:
            self._workflow_runs[wf_run.id] = copy_run(wf_run)
            if wf_run.idempotency_key:
                self._workflow_run_keys[wf_run.idempotency_key] = wf_run.id
        self._events.extend(map(with_data, changes.events))  # encoded as the SQL stores do
        self.commits += 1

    def _add_late_usage(self, late: LateUsage) -> None:
        stored: list[Run | Task | Turn | Conversation | None] = [
            self._runs.get(late.run_id),
            self._tasks.get(late.task_id),
        ]
        if late.conversation_id is not None:
            stored.append(self._turns.get(late.conversation_id, {}).get(late.turn))
            stored.append(self._conversations.get(late.conversation_id))
        for row in stored:
            if row is not None:
                row.usage = replace(row.usage)  # readers may hold the old object
                row.usage.add(late.usage)

    def _validate(self, changes: ChangeSet) -> None:
        """Raise ValueError where SQLite's constraints would reject `changes`."""
        key_owner: dict[str, TaskId | None] = {}  # overlay on self._by_key
        key_of: dict[TaskId, str] = {}  # overlay: a task's key after this change set
        for t in changes.tasks:
            _check_aware((t.created_at, t.updated_at, t.finished_at))
            stored = self._tasks.get(t.id)
            old = key_of.get(t.id, stored.policy.idempotency_key if stored else "")
            if old:
                key_owner[old] = None
            new = t.policy.idempotency_key
            if new:
                owner = key_owner[new] if new in key_owner else self._by_key.get(new)
                if owner is not None and owner != t.id:
                    raise ValueError(f"idempotency key {new!r} already belongs to task {owner}")
                key_owner[new] = t.id
            key_of[t.id] = new
        new_runs: set[RunId] = set()
        for r in changes.runs:
            _check_aware((r.created_at, r.assigned_at, r.started_at, r.finished_at))
            if r.task_id not in self._tasks and r.task_id not in key_of:
                raise ValueError(f"run {r.id} refers to unknown task {r.task_id}")
            new_runs.add(r.id)
        for w in changes.workers:
            _check_aware(
                (
                    w.first_seen_at,
                    w.connected_at,
                    w.last_heartbeat_at,
                    w.certificate_expires_at,
                    w.revoked_at,
                    w.enrolled_at,
                )
            )
        for c in changes.chunks:
            _check_aware((c.time,))
            if c.run_id not in self._runs and c.run_id not in new_runs:
                raise ValueError(f"output chunk refers to unknown run {c.run_id}")
        for s in changes.schedules:
            _check_aware((s.created_at, s.updated_at, s.last_fire_time, s.next_fire_time))
        for b in changes.bootstrap_tokens:
            _check_aware((b.created_at, b.expires_at, b.used_at, b.revoked_at))
        for a in changes.api_tokens:
            _check_aware((a.created_at, a.expires_at, a.revoked_at))
        _check_aware(e.time for e in changes.audit_events)
        newest = self._events[-1].position if self._events else 0
        for logged in changes.events:
            if logged.position <= newest:
                raise ValueError(f"event position {logged.position} is already in the log")
            newest = logged.position
        new_conversations = {c.id for c in changes.conversations}
        for conversation in changes.conversations:
            _check_aware((conversation.created_at, conversation.updated_at))
        for turn in changes.turns:
            _check_aware((turn.created_at, turn.finished_at))
            known = turn.conversation_id in self._conversations
            if not known and turn.conversation_id not in new_conversations:
                raise ValueError(
                    f"turn {turn.index} refers to unknown conversation {turn.conversation_id}"
                )
            if turn.task_id not in self._tasks and turn.task_id not in key_of:
                raise ValueError(f"turn {turn.index} refers to unknown task {turn.task_id}")
        versions: set[tuple[str, int]] = set()
        for wf in changes.workflows:
            _check_aware((wf.created_at,))
            if (wf.name, wf.version) in self._workflows or (wf.name, wf.version) in versions:
                raise ValueError(f"workflow {wf.name!r} version {wf.version} is already stored")
            versions.add((wf.name, wf.version))
        for wr in changes.workflow_runs:
            _check_aware((wr.created_at, wr.updated_at, wr.finished_at))
            pair = (wr.workflow, wr.version)
            if pair not in self._workflows and pair not in versions:
                raise ValueError(f"workflow run {wr.id} refers to unknown workflow {pair}")
            holder = self._workflow_run_keys.get(wr.idempotency_key)
            if wr.idempotency_key and holder is not None and holder != wr.id:
                raise ValueError(f"idempotency key {wr.idempotency_key!r} belongs to run {holder}")

    # --- reads ---------------------------------------------------------------------------------

    async def get_task(self, task_id: TaskId) -> Task | None:
        self._check_open()
        task = self._tasks.get(task_id)
        return None if task is None else _copy_task(task)

    async def get_task_by_idempotency_key(self, key: str) -> Task | None:
        self._check_open()
        task_id = self._by_key.get(key) if key else None
        return None if task_id is None else _copy_task(self._tasks[task_id])

    async def list_tasks(self, query: TaskQuery) -> TaskPage:
        self._check_open()
        if query.limit < 1:
            raise ValueError(f"limit must be positive, got {query.limit}")
        page: list[Task] = []
        more = False
        for task_id in sorted(self._tasks, reverse=True):
            if query.before and task_id >= query.before:
                continue
            t = self._tasks[task_id]
            if (
                (query.statuses and t.status not in query.statuses)
                or (query.agent and t.agent != query.agent)
                or (query.worker_id and t.worker_id != query.worker_id)
                or (query.schedule and t.schedule != query.schedule)
                or (query.parent_task_id and t.parent_task_id != query.parent_task_id)
                or any(t.labels.get(k) != v for k, v in query.labels)
            ):
                continue
            if len(page) == query.limit:
                more = True
                break
            page.append(_copy_task(t))
        return TaskPage(page, page[-1].id if more else None)

    async def list_task_tree(self, root_task_id: TaskId) -> list[Task]:
        self._check_open()
        return [
            _copy_task(self._tasks[i])
            for i in sorted(self._tasks)
            if self._tasks[i].root_task_id == root_task_id
        ]

    async def list_unfinished_tasks(self) -> list[Task]:
        self._check_open()
        return [
            _copy_task(self._tasks[i])
            for i in sorted(self._tasks)
            if self._tasks[i].status in _UNFINISHED_TASK
        ]

    async def get_run(self, run_id: RunId) -> Run | None:
        self._check_open()
        run = self._runs.get(run_id)
        return None if run is None else _copy_run(run)

    async def list_runs(self, task_id: TaskId) -> list[Run]:
        self._check_open()
        runs = [r for r in self._runs.values() if r.task_id == task_id]
        return [_copy_run(r) for r in sorted(runs, key=lambda r: (r.attempt, r.id))]

    async def list_spending(self, since: datetime) -> list[RunSpending]:
        self._check_open()
        out = []
        for run in sorted(self._runs.values(), key=lambda r: (r.finished_at or since, r.id)):
            task = self._tasks.get(run.task_id)
            if run.finished_at is None or run.finished_at < since or task is None:
                continue
            out.append(RunSpending(_copy_run(run), task.agent, dict(task.labels), task.schedule))
        return out

    async def usage_sums(self, since: datetime) -> list[UsageSum]:
        groups: dict[tuple[date, str, str, str], tuple[int, Usage]] = {}
        for spent in await self.list_spending(since):
            run = spent.run
            assert run.finished_at is not None  # list_spending gives ended runs only
            model = run.backend_used.model_name if run.backend_used else ""
            key = (run.finished_at.astimezone(UTC).date(), spent.agent, model, run.worker_id or "")
            runs, total = groups.get(key, (0, Usage()))
            total.add(run.usage)
            groups[key] = (runs + 1, total)
        return [UsageSum(*key, runs, total) for key, (runs, total) in groups.items()]

    async def list_unfinished_runs(self) -> list[Run]:
        self._check_open()
        return [
            _copy_run(self._runs[i])
            for i in sorted(self._runs)
            if self._runs[i].status in _UNFINISHED_RUN
        ]

    async def get_worker(self, worker_id: WorkerId) -> Worker | None:
        self._check_open()
        worker = self._workers.get(worker_id)
        return None if worker is None else _copy_worker(worker)

    async def list_workers(self, statuses: frozenset[WorkerStatus] = frozenset()) -> list[Worker]:
        self._check_open()
        return [
            _copy_worker(self._workers[i])
            for i in sorted(self._workers)
            if not statuses or self._workers[i].status in statuses
        ]

    async def read_output(
        self, run_ids: Sequence[RunId], after: dict[RunId, int] | None = None, limit: int = 10_000
    ) -> list[OutputChunk]:
        """Chunks of these runs in (run order given, attempt, seq) order, after the given seq."""
        self._check_open()
        out: list[OutputChunk] = []
        if limit < 1:
            return out
        for run_id in dict.fromkeys(run_ids):
            stored = self._output.get(run_id)
            if not stored:
                continue
            floor = after.get(run_id) if after else None
            task_id = self._runs[run_id].task_id
            for key in sorted(stored):
                if floor is not None and key[1] <= floor:
                    continue
                if len(out) == limit:
                    return out
                out.append(replace(stored[key], task_id=task_id))
        return out

    async def output_heads(self, run_ids: Sequence[RunId]) -> dict[RunId, int]:
        self._check_open()
        return {
            run_id: max(seq for _, seq in stored)
            for run_id in dict.fromkeys(run_ids)
            if (stored := self._output.get(run_id))
        }

    # --- workflows -------------------------------------------------------------------

    async def get_workflow(self, name: str, version: int = 0) -> Workflow | None:
        self._check_open()
        if not version:
            version = max((v for n, v in self._workflows if n == name), default=0)
        workflow = self._workflows.get((name, version))
        return None if workflow is None else _copy_workflow(workflow)

    async def list_workflows(self) -> list[Workflow]:
        self._check_open()
        newest: dict[str, Workflow] = {}
        for (name, version), workflow in self._workflows.items():
            if name not in newest or newest[name].version < version:
                newest[name] = workflow
        return [_copy_workflow(newest[n]) for n in sorted(newest)]

    async def get_workflow_run(self, run_id: str) -> WorkflowRun | None:
        self._check_open()
        run = self._workflow_runs.get(run_id)
        return None if run is None else copy_run(run)

    async def get_workflow_run_by_key(self, key: str) -> WorkflowRun | None:
        self._check_open()
        run_id = self._workflow_run_keys.get(key)
        return None if run_id is None else copy_run(self._workflow_runs[run_id])

    async def list_workflow_runs(
        self,
        workflow: str = "",
        *,
        unfinished: bool = False,
        limit: int = 100,
        before: tuple[datetime, str] | None = None,
    ) -> list[WorkflowRun]:
        self._check_open()
        runs = [
            r
            for r in self._workflow_runs.values()
            if (not workflow or r.workflow == workflow)
            and (not unfinished or not r.status.finished)
            and (before is None or (r.created_at, r.id) < before)
        ]
        runs.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        return [copy_run(r) for r in (runs if unfinished else runs[:limit])]

    # --- schedules -----------------------------------------------------------------------------

    async def get_schedule(self, name: str) -> Schedule | None:
        self._check_open()
        schedule = self._schedules.get(name)
        return None if schedule is None else copy_schedule(schedule)

    async def list_schedules(self) -> list[Schedule]:
        self._check_open()
        return [copy_schedule(self._schedules[n]) for n in sorted(self._schedules)]

    # --- access control ------------------------------------------------------------------------

    # --- conversations -------------------------------------------------------------------------

    async def get_conversation(self, conversation_id: ConversationId) -> Conversation | None:
        self._check_open()
        found = self._conversations.get(conversation_id)
        return None if found is None else _copy_conversation(found)

    async def list_conversations(self, query: ConversationQuery) -> list[Conversation]:
        self._check_open()
        if query.limit < 1:
            raise ValueError(f"limit must be positive, got {query.limit}")
        out: list[Conversation] = []
        for conversation_id in sorted(self._conversations, reverse=True):
            c = self._conversations[conversation_id]
            if query.before and conversation_id >= query.before:
                continue
            if (query.agent and c.agent != query.agent) or any(
                c.labels.get(k) != v for k, v in query.labels
            ):
                continue
            out.append(_copy_conversation(c))
            if len(out) == query.limit:
                break
        return out

    async def list_turns(self, conversation_id: ConversationId) -> list[Turn]:
        self._check_open()
        turns = self._turns.get(conversation_id, {})
        return [_copy_turn(turns[i]) for i in sorted(turns)]

    async def get_bootstrap_token(self, token_id: str) -> BootstrapToken | None:
        self._check_open()
        token = self._bootstrap_tokens.get(token_id)
        return None if token is None else _copy_bootstrap(token)

    async def list_bootstrap_tokens(self) -> list[BootstrapToken]:
        """Oldest first: by (created_at, id)."""
        self._check_open()
        tokens = sorted(self._bootstrap_tokens.values(), key=lambda t: (t.created_at, t.id))
        return [_copy_bootstrap(t) for t in tokens]

    async def consume_bootstrap_token(
        self, token_id: str, now: datetime, host: str = ""
    ) -> BootstrapToken | None:
        """Mark the token used if it is neither used nor revoked (expiry is not checked)."""
        self._check_open()
        _check_aware((now,))
        if self._fenced or self._failing:
            raise StoreUnavailable(f"{FENCED}: {self._fenced or self._failing}")
        token = self._bootstrap_tokens.get(token_id)
        if token is None or token.used_at is not None or token.revoked_at is not None:
            return None
        token.used_at, token.used_by_host = now, host  # no await in between: atomic
        self.commits += 1
        return _copy_bootstrap(token)

    async def get_api_token(self, token_id: str) -> ApiToken | None:
        self._check_open()
        token = self._api_tokens.get(token_id)
        return None if token is None else _copy_api(token)

    async def list_api_tokens(self) -> list[ApiToken]:
        """Oldest first: by (created_at, id)."""
        self._check_open()
        tokens = sorted(self._api_tokens.values(), key=lambda t: (t.created_at, t.id))
        return [_copy_api(t) for t in tokens]

    async def read_events(self, after: int, limit: int = 1000) -> list[LoggedEvent]:
        self._check_open()
        return [e for e in self._events if e.position > after][:limit]

    async def event_positions(self) -> tuple[int, int]:
        self._check_open()
        if not self._events:
            return 0, 0
        return self._events[0].position, self._events[-1].position

    async def list_audit_events(self, query: AuditQuery) -> list[AuditEvent]:
        """Newest first; at most query.limit; only ids below query.before_id when it is set."""
        self._check_open()
        if query.limit < 1:
            raise ValueError(f"limit must be positive, got {query.limit}")
        out: list[AuditEvent] = []
        for event in reversed(self._audit):
            if query.before_id and event.id >= query.before_id:
                continue
            if query.kinds and event.kind not in query.kinds:
                continue
            out.append(event)
            if len(out) == query.limit:
                break
        return out

    # --- webhooks -------------------------------------------------------------------

    async def add_webhook(self, webhook: Webhook) -> None:
        self._check_open()
        _check_aware([webhook.created_at])
        if webhook.id in self._webhooks:
            raise ValueError(f"webhook {webhook.id!r} already exists")
        self._webhooks[webhook.id] = replace(webhook, labels=dict(webhook.labels))
        self.commits += 1

    async def delete_webhook(self, webhook_id: str) -> bool:
        self._check_open()
        for delivery_id in [d.id for d in self._deliveries.values() if d.webhook_id == webhook_id]:
            del self._deliveries[delivery_id]
        self.commits += 1
        return self._webhooks.pop(webhook_id, None) is not None

    async def list_webhooks(self) -> list[Webhook]:
        self._check_open()
        hooks = sorted(self._webhooks.values(), key=lambda w: (w.created_at, w.id))
        return [replace(w, labels=dict(w.labels)) for w in hooks]

    async def add_webhook_deliveries(
        self, deliveries: Sequence[WebhookDelivery]
    ) -> list[WebhookDelivery]:
        self._check_open()
        taken = {(d.webhook_id, d.event_key) for d in self._deliveries.values()}
        stored = []
        for delivery in deliveries:
            _check_aware([delivery.created_at, delivery.next_attempt_at, delivery.delivered_at])
            key = (delivery.webhook_id, delivery.event_key)
            if delivery.webhook_id not in self._webhooks or key in taken:
                continue
            if delivery.id in self._deliveries:
                raise ValueError(f"delivery {delivery.id!r} already exists")
            taken.add(key)
            self._deliveries[delivery.id] = replace(delivery)
            stored.append(replace(delivery))
        self.commits += 1
        return stored

    async def update_webhook_delivery(self, delivery: WebhookDelivery) -> None:
        self._check_open()
        current = self._deliveries.get(delivery.id)
        if current is not None:
            self._deliveries[delivery.id] = replace(
                current,
                status=delivery.status,
                attempts=delivery.attempts,
                last_status_code=delivery.last_status_code,
                last_error=delivery.last_error,
                next_attempt_at=delivery.next_attempt_at,
                delivered_at=delivery.delivered_at,
            )
        self.commits += 1

    async def list_webhook_deliveries(
        self, webhook_id: str = "", *, pending: bool = False, limit: int = 100
    ) -> list[WebhookDelivery]:
        self._check_open()
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        found = [
            d
            for d in self._deliveries.values()
            if (not webhook_id or d.webhook_id == webhook_id)
            and (not pending or d.status is DeliveryStatus.PENDING)
        ]
        if pending:
            found.sort(key=lambda d: (d.next_attempt_at, d.id))
        else:
            found.sort(key=lambda d: (d.created_at, d.id), reverse=True)
        return [replace(d) for d in found[:limit]]
