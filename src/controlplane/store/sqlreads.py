"""Reads the SQL stores make the same way in both dialects, written once.

`SqliteStore` and `PostgresStore` inherit `SqlReads`, give their placeholder (`MARK`), how they
match one label in a JSON column (`LABEL_MATCHES`), and their `_fetchall` / `_fetchone`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, ClassVar

from taskrun.controlplane.store.rows import (
    CONVERSATION_COLUMNS,
    LATEST_WORKFLOWS,
    RUN_COLUMNS,
    TASK_COLUMNS,
    TURN_COLUMNS,
    WEBHOOK_COLUMNS,
    WORKFLOW_COLUMNS,
    WORKFLOW_RUN_COLUMNS,
    RowLike,
    column_list,
    conversation_from,
    conversations_query,
    deliveries_query,
    delivery_from,
    loads,
    run_from,
    task_from,
    turn_from,
    us,
    usage_sum_from,
    usage_sums_query,
    webhook_from,
    workflow_from,
    workflow_run_from,
    workflow_runs_query,
)
from taskrun.core.ids import ConversationId, RunId, TaskId
from taskrun.core.models import Conversation, Task, Turn
from taskrun.core.store import ConversationQuery, LoggedEvent, RunSpending, UsageSum
from taskrun.core.webhooks import Webhook, WebhookDelivery
from taskrun.core.workflow import Workflow, WorkflowRun

_IN_LIST = 500  # ids per IN (...) list: far below either dialect's limit on parameters
_TASKS = f"SELECT {column_list(TASK_COLUMNS)} FROM tasks"
_CONVERSATIONS = f"SELECT {column_list(CONVERSATION_COLUMNS)} FROM conversations"
_TURNS = f"SELECT {column_list(TURN_COLUMNS)} FROM turns"
_WORKFLOWS = f"SELECT {column_list(WORKFLOW_COLUMNS)} FROM workflows"
_WORKFLOW_RUNS = f"SELECT {column_list(WORKFLOW_RUN_COLUMNS)} FROM workflow_runs"
_WEBHOOKS = f"SELECT {column_list(WEBHOOK_COLUMNS)} FROM webhooks"
_SPENDING = (
    f"SELECT {column_list(RUN_COLUMNS, 'r.')}, t.agent AS task_agent, t.labels AS task_labels,"
    " t.schedule AS task_schedule FROM runs r JOIN tasks t ON t.id = r.task_id"
    " WHERE r.finished_at >= {mark} ORDER BY r.finished_at, r.id"
)


class SqlReads:
    MARK: ClassVar[str]  # "?" or "%s"
    LABEL_MATCHES: ClassVar[str]  # a condition on conversations.labels, given (key, value)
    JSON_FIELD: ClassVar[str]  # one key of a JSON column: "{column}" and "{key}" to fill

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        raise NotImplementedError

    async def _fetchone(self, sql: str, params: Sequence[Any]) -> Any:
        raise NotImplementedError

    async def _one(self, sql: str, params: Sequence[Any]) -> RowLike | None:
        row: RowLike | None = await self._fetchone(sql, params)
        return row

    # --- spending --------------------------------------------------------------------------------

    async def list_spending(self, since: datetime) -> list[RunSpending]:
        rows = await self._fetchall(_SPENDING.format(mark=self.MARK), (us(since),))
        return [
            RunSpending(run_from(r), r["task_agent"], loads(r["task_labels"]), r["task_schedule"])
            for r in rows
        ]

    async def usage_sums(self, since: datetime) -> list[UsageSum]:
        sql = usage_sums_query(self.JSON_FIELD, self.MARK)
        return [usage_sum_from(r) for r in await self._fetchall(sql, (us(since),))]

    # --- output --------------------------------------------------------------------------------

    async def output_heads(self, run_ids: Sequence[RunId]) -> dict[RunId, int]:
        heads: dict[RunId, int] = {}
        wanted = list(dict.fromkeys(run_ids))
        for start in range(0, len(wanted), _IN_LIST):
            part = wanted[start : start + _IN_LIST]
            marks = ", ".join([self.MARK] * len(part))
            rows = await self._fetchall(
                "SELECT run_id, MAX(seq) AS head FROM output"
                f" WHERE run_id IN ({marks}) GROUP BY run_id",
                part,
            )
            heads.update((RunId(r["run_id"]), int(r["head"])) for r in rows)
        return heads

    # --- task trees ----------------------------------------------------------------------------

    async def list_task_tree(self, root_task_id: TaskId) -> list[Task]:
        rows = await self._fetchall(
            f"{_TASKS} WHERE root_task_id = {self.MARK} ORDER BY id", (root_task_id,)
        )
        return [task_from(r) for r in rows]

    # --- the event log ---------------------------------------------------------------------------

    async def read_events(self, after: int, limit: int = 1000) -> list[LoggedEvent]:
        m = self.MARK
        rows = await self._fetchall(
            "SELECT position, kind, task_id, worker_id, data FROM events"
            f" WHERE position > {m} ORDER BY position LIMIT {m}",
            (after, limit),
        )
        return [
            LoggedEvent(
                position=int(r["position"]),
                kind=int(r["kind"]),
                task_id=str(r["task_id"]),
                worker_id=str(r["worker_id"]),
                data=bytes(r["data"]),
            )
            for r in rows
        ]

    async def event_positions(self) -> tuple[int, int]:
        row = await self._fetchone(
            "SELECT coalesce(min(position), 0) AS oldest, coalesce(max(position), 0) AS newest"
            " FROM events",
            (),
        )
        return (int(row["oldest"]), int(row["newest"])) if row else (0, 0)

    # --- conversations -------------------------------------------------------------------------

    async def get_conversation(self, conversation_id: ConversationId) -> Conversation | None:
        row = await self._one(f"{_CONVERSATIONS} WHERE id = {self.MARK}", (conversation_id,))
        return None if row is None else conversation_from(row)

    async def list_conversations(self, query: ConversationQuery) -> list[Conversation]:
        sql, params = conversations_query(
            query.agent, query.labels, query.before, query.limit, self.MARK, self.LABEL_MATCHES
        )
        return [conversation_from(r) for r in await self._fetchall(sql, params)]

    async def list_turns(self, conversation_id: ConversationId) -> list[Turn]:
        sql = f"{_TURNS} WHERE conversation_id = {self.MARK} ORDER BY idx"
        return [turn_from(r) for r in await self._fetchall(sql, (conversation_id,))]

    # --- workflows -----------------------------------------------------------------------------

    async def get_workflow(self, name: str, version: int = 0) -> Workflow | None:
        m = self.MARK
        if version:
            row = await self._one(
                f"{_WORKFLOWS} WHERE name = {m} AND version = {m}", (name, version)
            )
        else:
            row = await self._one(
                f"{_WORKFLOWS} WHERE name = {m} ORDER BY version DESC LIMIT 1", (name,)
            )
        return None if row is None else workflow_from(row)

    async def list_workflows(self) -> list[Workflow]:
        return [workflow_from(r) for r in await self._fetchall(LATEST_WORKFLOWS)]

    async def get_workflow_run(self, run_id: str) -> WorkflowRun | None:
        row = await self._one(f"{_WORKFLOW_RUNS} WHERE id = {self.MARK}", (run_id,))
        return None if row is None else workflow_run_from(row)

    async def get_workflow_run_by_key(self, key: str) -> WorkflowRun | None:
        row = await self._one(f"{_WORKFLOW_RUNS} WHERE idempotency_key = {self.MARK}", (key,))
        return None if row is None else workflow_run_from(row)

    async def list_workflow_runs(
        self,
        workflow: str = "",
        *,
        unfinished: bool = False,
        limit: int = 100,
        before: tuple[datetime, str] | None = None,
    ) -> list[WorkflowRun]:
        sql, params = workflow_runs_query(workflow, unfinished, limit, self.MARK, before)
        return [workflow_run_from(r) for r in await self._fetchall(sql, params)]

    # --- webhooks ------------------------------------------------------------------------------

    async def list_webhooks(self) -> list[Webhook]:
        rows = await self._fetchall(f"{_WEBHOOKS} ORDER BY created_at, id")
        return [webhook_from(r) for r in rows]

    async def list_webhook_deliveries(
        self, webhook_id: str = "", *, pending: bool = False, limit: int = 100
    ) -> list[WebhookDelivery]:
        sql, params = deliveries_query(webhook_id, pending, limit, self.MARK)
        return [delivery_from(r) for r in await self._fetchall(sql, params)]
