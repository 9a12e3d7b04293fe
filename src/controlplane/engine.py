"""The control plane's state machine: tasks, runs, worker sessions and the pending queue.

Invariant: nothing is visible before it is durable, and a failed commit leaves no trace.

Every mutation happens synchronously on the event loop against the in-memory view of unfinished
tasks and runs, and produces a ChangeSet that the store commits (grouped with others). Only after
the commit do replies, assignments, acknowledgements, follower updates and events go out (the
commit's *effect*). Change sets commit in the order they were made, so the store never goes
backwards.

The view runs ahead of the store by the change sets in flight. When one fails, the view can no
longer be trusted, so the engine does not try to undo it: it stops accepting writes (callers get
UNAVAILABLE, health says NOT_SERVING), ends every worker session, and reloads the view from the
store once the store can write again: the same path as a restart. Workers keep their runs within
their lease, reconnect, reclaim them and resend what was never acknowledged.

Workers hold a lease on their runs, renewed by their session's heartbeats. The next attempt of a
run whose worker went away is created only once that lease has run out plus a margin; the worker
stops the runs itself when it cannot renew (see worker.lease), so two attempts never overlap.

Why one module: every method here reads and writes the same view under the invariant
above, and keeping them together keeps that invariant checkable in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Final

import structlog

from taskrun.controlplane import subtasks
from taskrun.controlplane.budgets import Budgets, Cap, day_of, day_start
from taskrun.controlplane.catalog import AgentCatalog
from taskrun.controlplane.config import ServerConfig
from taskrun.controlplane.dispatcher import PendingQueue, PendingRun, WorkerIndex
from taskrun.controlplane.events import Captured, EventHub
from taskrun.controlplane.followers import Followed, FollowHub
from taskrun.controlplane.health import WorkerHealth
from taskrun.controlplane.ratelimit import LogLimiter
from taskrun.controlplane.runview import CurrentRuns
from taskrun.controlplane.session import WorkerSession
from taskrun.convert import (
    backend_from_pb,
    fault_from_pb,
    run_options_to_pb,
    ts_to_datetime,
    turn_context_to_pb,
    usage_from_pb,
)
from taskrun.core.access import new_run_credential
from taskrun.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    StoreUnavailable,
    Unavailable,
)
from taskrun.core.ids import (
    ConversationId,
    RunId,
    TaskId,
    WorkerId,
    new_conversation_id,
    new_run_id,
    new_task_id,
)
from taskrun.core.models import (
    COMPACT_AT,
    KEEP_RECENT_TURNS,
    AgentSpec,
    Conversation,
    OutputChunk,
    OutputKind,
    Run,
    Task,
    TaskPolicy,
    TaskSpec,
    TranscriptMessage,
    Turn,
    TurnContext,
    Usage,
    Worker,
    asked_model,
    estimated_tokens,
    transcript,
    utcnow,
)
from taskrun.core.status import (
    Fault,
    RunStatus,
    TaskStatus,
    WorkerStatus,
    run_can_move,
    task_can_move,
)
from taskrun.core.store import FENCED, ChangeSet, LateUsage, Store
from taskrun.core.text import clip
from taskrun.core.validation import (
    MAX_REPORTED_NAME,
    bounded_backend,
    clip_error,
    kept_session_id,
    kept_snapshot,
    result_over_limit,
)
from taskrun.v1 import common_pb2 as pb
from taskrun.v1 import workers_pb2 as wpb

log = structlog.get_logger(__name__)

Effect = Callable[[], None]


class Engine:
    def __init__(self, store: Store, config: ServerConfig) -> None:
        self.store = store
        self.config = config
        self.queue = PendingQueue()
        self.index = WorkerIndex()  # connected workers by agent and load, for the queue
        self._moved: set[WorkerSession] = set()  # sessions whose load changed since the plan
        self.hub = FollowHub()
        self.events = EventHub(runs_of=self.worker_runs)  # WatchEvents and metrics
        self.catalog = AgentCatalog()
        self.sessions: dict[WorkerId, WorkerSession] = {}
        self.workers: dict[WorkerId, Worker] = {}
        self.tasks: dict[TaskId, Task] = {}  # unfinished tasks
        self.runs = CurrentRuns()  # current runs of unfinished tasks, also by worker
        # Conversations with an unfinished turn (at most one each), that turn by its task, what
        # its assignment carries, and the tool calls its runs reported so far (compact).
        self.conversations: dict[ConversationId, Conversation] = {}
        self.turns: dict[TaskId, Turn] = {}
        self.contexts: dict[TaskId, TurnContext] = {}
        self._tools: dict[TaskId, list[dict[str, object]]] = {}
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # with their users; _serialized
        # Runs cancelled while a worker held them: the worker's last report on each still says
        # what it spent, which the store then adds to the run, its task, turn and conversation.
        self._stopping: dict[RunId, _Stopping] = {}
        self._late_usage = 0  # bumped when such a report is committed for a conversation
        # roots with an unfinished task in their tree, and the budget they share (subtasks.py)
        self.trees: dict[TaskId, subtasks.Tree] = {}
        # tasks a change set ended beside the ones its caller publishes (sub-tasks the tree's
        # budget stopped), and what tells their workers to stop: published and delivered with
        # that change set's effect, once it is durable
        self._also_publish: list[Task] = []
        self._also_deliver: list[Effect] = []
        self._credentials: dict[RunId, str] = {}  # live runs' credentials, never stored
        # the highest output seq of each current run that is stored or on its way there: a
        # worker sends again what was not acknowledged yet (after a reconnect, to a new leader),
        # and what is already stored must not reach the event log or followers a second time
        self._heads: dict[RunId, int] = {}
        # where runs that allow sub-tasks reach the MCP server ("" while no HTTP API is served)
        self.mcp_url = config.mcp_url
        self.rejected_reports = 0
        # While set, the store cannot write (or the view was lost): writes are refused with this
        # reason and the engine is recovering. Empty when healthy.
        self.store_error = ""
        self.on_health: Callable[[bool], None] | None = None  # told when writes fail / resume
        # With several control planes: whether this one's leadership lease still holds. Once it
        # ran out, no worker's lease is renewed here (another control plane may lead already).
        self.leads: Callable[[], bool] | None = None
        self.recoveries = 0  # how often the view was reloaded after a failed write
        self._recovery: asyncio.Task[None] | None = None
        self._tail: asyncio.Future[None] | None = None  # the newest commit
        self._rejections = LogLimiter(log, limit=10, window=10.0)  # per worker
        # keys whose task is not committed yet, with that commit: a second request waits for it
        self._idempotency: dict[str, tuple[Task, Awaitable[None]]] = {}
        self._orphans: dict[RunId, asyncio.TimerHandle] = {}
        self._timers: set[asyncio.TimerHandle] = set()
        self._dispatch_scheduled = False
        self.health = WorkerHealth(config.breaker())
        self.budgets = Budgets(config.label_budgets, config.schedule_budgets, day_of(utcnow()))
        self._parked: dict[RunId, PendingRun] = {}  # held back by a spent daily budget
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Set by stop(): from then on no worker session starts and no timer is set. Calls still
        # come in until the listener closes; a run whose worker is away stays with its lease,
        # for the next control plane to settle, however long this one takes to stop.
        self.stopped = False

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Load unfinished work from the store (at start, and to recover from a failed write).

        Runs held by workers wait one lease (plus the margin) to be reclaimed: a worker renewed
        its lease at the latest when the previous view ended, so by then it has stopped them.
        """
        workers = await self.store.list_workers()
        _, newest_event = await self.store.event_positions()
        tasks = {t.id: t for t in await self.store.list_unfinished_tasks()}
        runs = await self.store.list_unfinished_runs()
        conversations: dict[ConversationId, Conversation] = {}
        turns: dict[TaskId, Turn] = {}
        earlier_turns: dict[TaskId, list[Turn]] = {}
        for unfinished in tasks.values():
            if unfinished.conversation_id is None:
                continue
            conversation = await self.store.get_conversation(unfinished.conversation_id)
            if conversation is None:
                continue
            earlier = await self.store.list_turns(conversation.id)
            turn = next((t for t in earlier if t.index == unfinished.turn), None)
            if turn is None:
                continue
            conversations[conversation.id] = conversation
            turns[unfinished.id] = turn
            earlier_turns[unfinished.id] = earlier
        cfg = self.config
        budgets = Budgets(cfg.label_budgets, cfg.schedule_budgets, day_of(utcnow()))
        if budgets.configured:
            since = day_start(budgets.day)
            budgets.load(
                (s.labels, s.schedule, s.run.usage.cost_usd, s.run.finished_at or since)
                for s in await self.store.list_spending(since)
            )
        heads = await self.store.output_heads([r.id for r in runs])
        trees: dict[TaskId, subtasks.Tree] = {}
        in_trees = (t for t in tasks.values() if t.root_task_id or t.policy.allow_subtasks)
        for root_id in {t.tree_root for t in in_trees}:
            tree = await self._load_tree(root_id, tasks)
            if tree is not None:
                trees[root_id] = tree
        # No await from here on: the new view replaces the old one at once.
        self.budgets, self._parked = budgets, {}
        self.events.restart(newest_event)  # positions of failed commits are given again
        self.conversations, self.turns, self._tools = conversations, turns, {}
        self.trees, self._also_publish, self._credentials = trees, [], {}
        self._also_deliver, self._heads = [], heads
        self._stopping = {}  # their timers are cancelled below: the reload starts afresh
        for handle in [*self._orphans.values(), *self._timers]:
            handle.cancel()
        self._orphans.clear()
        self._timers.clear()
        self.queue = PendingQueue()
        self.index, self._moved = WorkerIndex(), set()
        self._idempotency.clear()
        self.runs = CurrentRuns()
        self.workers = {}
        for worker in workers:
            if worker.status in (WorkerStatus.ONLINE, WorkerStatus.DRAINING):
                worker.status = WorkerStatus.OFFLINE
            self.workers[worker.id] = worker
            self.catalog.learn(worker.agents)
        self.tasks = tasks
        self.contexts = {  # after the catalog learned the agents' context windows
            task_id: self._context(
                conversations[turn.conversation_id], turn, earlier_turns[task_id]
            )
            for task_id, turn in turns.items()
        }
        deadline = time.monotonic() + self.config.lease_duration + self.config.lease_margin
        for run in runs:
            task = tasks.get(run.task_id)
            if task is None or task.current_run_id != run.id:
                continue
            self.runs[run.id] = run
            if run.status is RunStatus.PENDING:
                self._enqueue(task, run, dispatch=False)
            else:
                self._orphan(run, deadline)
        if self.workers:
            await self.store.apply(ChangeSet(workers=[replace(w) for w in self.workers.values()]))
        if budgets.configured:
            self._later(budgets.seconds_to_next_day(utcnow()) + 0.5, self._midnight)
        log.info(
            "engine started",
            unfinished_tasks=len(self.tasks),
            pending_runs=len(self.queue),
            awaiting_workers=len(self._orphans),
        )

    async def _load_tree(
        self, root_id: TaskId, unfinished: dict[TaskId, Task]
    ) -> subtasks.Tree | None:
        """The tree of `root_id` from the store (None for a task that allows no sub-tasks and
        has none)."""
        root = unfinished.get(root_id) or await self.store.get_task(root_id)
        if root is None:
            return None
        below = await self.store.list_task_tree(root_id)
        if not below and not root.policy.allow_subtasks:
            return None
        return subtasks.build(root, below)

    async def stop(self) -> None:
        self.stopped = True
        if self._recovery is not None:
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recovery
        for session in list(self.sessions.values()):
            session.kick(SHUTTING_DOWN)
        for handle in [*self._orphans.values(), *self._timers]:
            handle.cancel()
        await self.flush()

    async def flush(self) -> None:
        """Wait until every change made so far is committed."""
        await self._idle.wait()

    # --- committing --------------------------------------------------------------------------

    def _commit(self, changes: ChangeSet, effect: Effect | None = None) -> asyncio.Future[None]:
        """Hand `changes` to the store now (keeping order); run `effect` once they are durable.

        The store captures the objects' state at this call, so the engine can keep mutating
        them. The returned future fails with Unavailable when the commit fails. Awaiting it from
        a handler should go through `asyncio.shield`, so that a cancelled caller never skips the
        effect.
        """
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._also_publish or self._also_deliver:
            effect = functools.partial(
                self._publish_all, effect, self._also_publish, self._also_deliver
            )
            self._also_publish, self._also_deliver = [], []
        if self.store_error:
            done.set_exception(Unavailable(self.store_error))
            return done
        captured = self.events.capture(changes, self.runs)  # logged with it, emitted after
        followed = self.hub.snapshot(changes.tasks)  # followers get the tasks as committed
        try:
            stored = asyncio.ensure_future(self.store.submit(changes))
        except Exception as exc:  # the store refused to even queue it
            self._lose_view(exc)
            done.set_exception(Unavailable(self.store_error))
            return done
        self._inflight += 1
        self._idle.clear()
        self._tail = done
        stored.add_done_callback(
            functools.partial(self._committed, effect, captured, followed, done)
        )
        return done

    def _committed(
        self,
        effect: Effect | None,
        captured: Captured | None,
        followed: Followed | None,
        done: asyncio.Future[None],
        future: asyncio.Future[None],
    ) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()
        error: BaseException | None = (
            StoreUnavailable("the commit was cancelled") if future.cancelled() else None
        )
        error = error or future.exception()
        if error is not None:
            self._lose_view(error)
            if not done.done():
                done.set_exception(Unavailable(self.store_error))
                done.exception()  # retrieved: fire-and-forget commits fail quietly
            return
        if effect is not None:
            with self.hub.publishing(followed):
                effect()
        self.events.emit(captured)  # after the commit and its effect
        if not done.done():
            done.set_result(None)

    def _publish_all(
        self, effect: Effect | None, tasks: list[Task], delivers: list[Effect]
    ) -> None:
        if effect is not None:
            effect()
        for deliver in delivers:
            deliver()
        for task in tasks:
            self.hub.publish(task.id, task)

    def commit(self, changes: ChangeSet) -> Awaitable[None]:
        """Commit changes that hold no engine state (tokens, audit) in order with the rest."""
        return self._commit(changes)

    def _check_writable(self) -> None:
        if self.store_error:
            raise Unavailable(self.store_error)

    # --- recovery ----------------------------------------------------------------------------

    def _lose_view(self, error: BaseException) -> None:
        """A commit failed (or a change could not be built): the view may hold what the store
        does not. Refuse writes, end the worker sessions, and reload once the store writes."""
        if self.store_error:
            return
        if isinstance(error, StoreUnavailable | Unavailable):
            reason = str(error)
        else:
            reason = "the control plane lost track of a change and is reloading its state"
        if FENCED in reason:
            reason = "the store cannot write"
        self.store_error = reason
        if self.stopped:  # the store is closing: the next control plane reloads from it
            log.warning("store write failed while stopping; nothing reloaded", error=str(error))
            return
        log.error(
            "store write failed; refusing writes until the store recovers",
            error=str(error),
            sessions=len(self.sessions),
        )
        if self.on_health is not None:
            self.on_health(False)
        sessions, self.sessions = list(self.sessions.values()), {}
        for session in sessions:
            session.closed = True
            session.kick(f"{reason}; reconnect shortly (the control plane is recovering)")
        for handle in [*self._orphans.values(), *self._timers]:
            handle.cancel()
        self._orphans.clear()
        self._timers.clear()
        self._recovery = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        """Until the store writes again: then reload the view from it and accept writes."""
        delay, last = 0.05, ""
        while True:
            await self._idle.wait()  # every commit in flight has settled
            try:
                await self.store.resume()
                await self.start()
                break
            except Exception as exc:
                if str(exc) != last:
                    log.warning("store still cannot write; retrying", error=str(exc))
                    last = str(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        self.recoveries += 1
        self.store_error = ""
        self._recovery = None
        if self.on_health is not None:
            self.on_health(True)
        log.info("store writable again; state reloaded from it", recoveries=self.recoveries)
        self.request_dispatch()

    @property
    def backlog(self) -> int:
        return self._inflight

    # --- tasks -------------------------------------------------------------------------------

    async def create_tasks(
        self, specs: Sequence[TaskSpec], subscribe: Callable[[Task], None] | None = None
    ) -> list[tuple[Task, bool]]:
        """Create tasks (already validated). Returns (task, created) per spec, in order, once
        every one of them is durable.

        A spec whose idempotency key names an existing task returns that task, created=False;
        the caller checks that the request is the same. A key whose task is still being
        committed waits for that commit (and fails with it). `subscribe` is called with each new
        task before its commit is queued, so a follower misses nothing: the task as committed is
        published once durable.
        """
        self._check_writable()
        existing: dict[str, Task] = {}
        for spec in specs:
            key = spec.policy.idempotency_key
            if key and key not in existing and key not in self._idempotency:
                found = await self.store.get_task_by_idempotency_key(key)
                if found is not None:
                    existing[key] = found
        for spec in specs:
            parent = self.tasks.get(spec.parent_task_id) if spec.parent_task_id else None
            if parent is not None and parent.tree_root not in self.trees:
                tree = await self._load_tree(parent.tree_root, self.tasks)
                if tree is not None:
                    self.trees.setdefault(tree.root, tree)
        self._check_writable()
        fresh = [
            s
            for s in specs
            if not (s.policy.idempotency_key and s.policy.idempotency_key in existing)
            and s.policy.idempotency_key not in self._idempotency
        ]
        placements = dict(
            zip(
                map(id, fresh),
                subtasks.place(fresh, self.tasks, self.trees, self.config.max_subtask_depth),
                strict=True,
            )
        )
        now = utcnow()
        changes = ChangeSet()
        results: list[tuple[Task, bool]] = []
        created: list[tuple[Task, Run]] = []
        waits: list[Awaitable[None]] = []
        for spec in specs:
            key = spec.policy.idempotency_key
            if key:
                if key in self._idempotency:
                    prior, committing = self._idempotency[key]
                    waits.append(committing)
                    results.append((prior, False))
                    continue
                if key in existing:
                    results.append((existing[key], False))
                    continue
            task_id = new_task_id()
            run = Run(
                id=new_run_id(),
                task_id=task_id,
                attempt=1,
                status=RunStatus.PENDING,
                created_at=now,
            )
            task = Task(
                id=task_id,
                agent=spec.agent,
                input=spec.input,
                labels=spec.labels,
                policy=spec.policy,
                status=TaskStatus.PENDING,
                created_at=now,
                updated_at=now,
                attempts=1,
                current_run_id=run.id,
                schedule=spec.schedule,
            )
            placed = placements.get(id(spec))
            if placed is not None:
                task.parent_task_id, task.root_task_id = placed.parent, placed.root
                task.depth = placed.depth
            changes.tasks.append(task)
            changes.runs.append(run)
            created.append((task, run))
            results.append((task, True))
        if changes:
            for task, run in created:
                self.tasks[task.id] = task
                self.runs[run.id] = run
                self._enqueue(task, run, dispatch=False)
                subtasks.joined(self.trees, task)
            # Assign what fits right away, in the same commit as the creation.
            outgoing = self._plan(changes)
            # The reply shows each task as this commit stores it: by the time it is durable, the
            # view may hold a later state whose own commit is still on its way.
            as_committed = {task.id: task.snapshot() for task, _ in created}
            results = [(as_committed.get(t.id, t), new) for t, new in results]

            if subscribe is not None:
                for task, _ in created:
                    subscribe(task)

            def effect() -> None:
                self._send(outgoing)  # the worker first: it is on the way to the result
                for task, _ in created:
                    if task.policy.idempotency_key:
                        self._idempotency.pop(task.policy.idempotency_key, None)
                    self._publish(task)  # as committed: assigned, or waiting

            committing = self._commit(changes, effect)
            for task, _ in created:
                if task.policy.idempotency_key:
                    self._idempotency[task.policy.idempotency_key] = (task, committing)
            waits.insert(0, committing)
        for commit in waits:
            await asyncio.shield(commit)
        return results

    async def cancel_task(self, task_id: TaskId, reason: str) -> Task:
        """Cancel the task and every unfinished task below it (its sub-tasks, theirs...), in one
        change set."""
        self._check_writable()
        task = self.tasks.get(task_id)
        if task is None:
            stored = await self.store.get_task(task_id)
            if stored is None:
                raise NotFound(f"no task {task_id!r}", field="task_id")
            raise FailedPrecondition(
                f"task {task_id} is already {stored.status.name.lower()}", field="task_id"
            )
        parents: dict[TaskId, TaskId | None] = {}
        if task.tree_root in self.trees:  # finished tasks of the tree link the unfinished ones
            below = await self.store.list_task_tree(task.tree_root)
            parents = {t.id: t.parent_task_id for t in below}
        self._check_writable()
        task = self.tasks.get(task_id)
        if task is None:
            raise FailedPrecondition(f"task {task_id} ended meanwhile", field="task_id")
        parents.update({t.id: t.parent_task_id for t in self.tasks.values()})
        tree = [self.tasks[i] for i in subtasks.below(task_id, parents) if i in self.tasks]
        message = f"cancelled: {reason}" if reason else "cancelled by an operator"
        changes, now = ChangeSet(), utcnow()
        delivers: list[Effect] = [self._cancel_one(task, message, now, changes)]
        above = f"cancelled with task {task_id}" + (f": {reason}" if reason else "")
        # (a cancelled sub-task's cost may spend the budget and fail pending ones on the way)
        delivers.extend(
            self._cancel_one(t, above, now, changes) for t in tree if t.id in self.tasks
        )
        cancelled = [task, *tree]

        def effect() -> None:
            for deliver in delivers:
                deliver()
            for t in cancelled:
                self.hub.publish(t.id, t)

        await asyncio.shield(self._commit(changes, effect))
        log.info(
            "task cancelled",
            task_id=task.id,
            run_id=task.current_run_id,
            worker_id=task.worker_id,
            attempt=task.attempts,
            subtasks_cancelled=len(tree),
        )
        return task

    def _cancel_one(self, task: Task, message: str, now: datetime, changes: ChangeSet) -> Effect:
        """Cancel one unfinished task into `changes`; returns what tells its worker, once
        committed (the run keeps its slot until the worker confirms it stopped)."""
        run = self.runs.pop(task.current_run_id, None) if task.current_run_id else None
        session: WorkerSession | None = None
        if run is not None:
            self._heads.pop(run.id, None)
            self.queue.remove(run.id)
            self._parked.pop(run.id, None)
            self._forget_orphan(run.id)
            self._credentials.pop(run.id, None)
            was_held = run.status.active
            run.status, run.finished_at, run.error = RunStatus.CANCELLED, now, message
            changes.runs.append(run)
            if was_held and run.worker_id:
                self._await_last_report(task, run)
            session = self.sessions.get(run.worker_id) if run.worker_id and was_held else None
        task.cancel_requested = True
        self._finish_task(task, TaskStatus.CANCELLED, now, error=message)
        changes.tasks.append(task)
        self._close_turn(task, run, changes)
        self._left_tree(task, changes)

        def deliver() -> None:
            if session is not None and run is not None:
                session.send_cancel(run.id, run.attempt, message)

        return deliver

    # --- conversations -----------------------------------------------------------------------

    async def create_conversation(
        self,
        agent: str,
        message: str,
        *,
        title: str = "",
        labels: dict[str, str] | None = None,
        options: str = "{}",
        policy: TaskPolicy | None = None,
    ) -> tuple[Conversation, Turn, Task]:
        """A new conversation and its first turn (validated by the caller). Durable on return."""
        self._check_writable()
        now = utcnow()
        conversation = Conversation(
            id=new_conversation_id(),
            agent=agent,
            title=title or _title(message),
            labels=dict(labels or {}),
            input=options,
            policy=policy or TaskPolicy(),
            created_at=now,
            updated_at=now,
        )
        changes = ChangeSet()
        turn, task = self._new_turn(conversation, message, [], changes)
        await self._commit_turn(changes)
        log.info(
            "conversation created",
            conversation_id=conversation.id,
            agent=agent,
            task_id=task.id,
            run_id=task.current_run_id,
        )
        return conversation, turn, task

    async def send_message(
        self, conversation_id: ConversationId, message: str
    ) -> tuple[Conversation, Turn, Task]:
        """The next turn of a conversation, on any worker that offers its agent. Refused while
        the previous turn is unfinished. Durable on return."""
        self._check_writable()
        self._check_idle(conversation_id)
        async with self._serialized(conversation_id):  # one new turn at a time
            self._check_idle(conversation_id)
            while True:  # a cancelled turn's spending committed meanwhile: read it too
                seen = self._late_usage
                conversation, earlier = await self._load_conversation(conversation_id)
                if seen == self._late_usage:
                    break
            self._check_turn_input(
                conversation.agent, conversation.input, message, "conversation_id"
            )
            self._check_writable()
            self._check_idle(conversation_id)
            changes = ChangeSet()
            turn, task = self._new_turn(conversation, message, earlier, changes)
            await self._commit_turn(changes)
        log.info(
            "message sent",
            conversation_id=conversation_id,
            turn=turn.index,
            task_id=task.id,
            run_id=task.current_run_id,
        )
        return conversation, turn, task

    async def continue_task(self, task_id: TaskId, prompt: str) -> Task:
        """The next message of the conversation `task_id` is a turn of; a task outside any
        conversation becomes the first turn of a new one. Returns the new turn's task: the given
        task never changes state (terminal is terminal)."""
        self._check_writable()
        stored = await self.store.get_task(task_id)
        if stored is None:
            raise NotFound(f"no task {task_id!r}", field="task_id")
        if stored.conversation_id is not None:
            return (await self.send_message(stored.conversation_id, prompt))[2]
        if task_id in self.tasks or not stored.status.terminal:
            status = self.tasks[task_id].status if task_id in self.tasks else stored.status
            raise FailedPrecondition(
                f"task {task_id} is {status.name.lower()}; send the next message once it ended",
                field="task_id",
            )
        options = _options(stored.input)
        self._check_turn_input(stored.agent, json.dumps(options), prompt, "task_id")
        async with self._serialized(task_id):  # one conversation around a task, not two
            while True:  # a cancelled run's spending committed meanwhile: read it too
                seen = self._late_usage
                await self._settled()
                again = await self.store.get_task(task_id)
                runs = await self.store.list_runs(task_id)
                if seen == self._late_usage:
                    break
            self._check_writable()
            if again is not None and again.conversation_id is None:
                stored = await self._adopt(again, runs)
            elif again is not None:
                stored = again
        assert stored.conversation_id is not None
        return (await self.send_message(stored.conversation_id, prompt))[2]

    async def _adopt(self, task: Task, runs: list[Run]) -> Task:
        """Make a finished task outside any conversation the first turn of a new one."""
        message = str(_options(task.input, keep_prompt=True).get("prompt", ""))
        options = _options(task.input)
        now = utcnow()
        last = runs[-1] if runs else None
        conversation = Conversation(
            id=new_conversation_id(),
            agent=task.agent,
            title=_title(message or task.agent),
            labels=dict(task.labels),
            input=json.dumps(options),
            policy=replace(task.policy, idempotency_key=""),
            created_at=task.created_at,
            updated_at=now,
            turns=1,
            usage=replace(task.usage),
            # the session stays on the worker that ran it: resumed there, else the transcript
            session_id=last.session_id if last else "",
            session_cost_usd=last.usage.cost_usd if last else 0.0,
            session_turn=1,
        )
        turn = Turn(
            conversation_id=conversation.id,
            index=1,
            task_id=task.id,
            message=message or task.input,
            created_at=task.created_at,
            status=task.status,
            answer=_answer(task.result),
            error=task.error,
            usage=replace(task.usage),
            finished_at=task.finished_at,
        )
        task.conversation_id, task.turn = conversation.id, 1  # a link; its state is unchanged
        await asyncio.shield(
            self._commit(ChangeSet(tasks=[task], conversations=[conversation], turns=[turn]))
        )
        log.info(
            "conversation created around a task", conversation_id=conversation.id, task_id=task.id
        )
        return task

    async def delete_conversation(self, conversation_id: ConversationId) -> None:
        """Delete a conversation and its transcript (its tasks stay). Durable on return."""
        self._check_writable()
        self._check_idle(conversation_id)
        async with self._serialized(conversation_id):
            await self._load_conversation(conversation_id)
            self._check_writable()
            self._check_idle(conversation_id)
            await asyncio.shield(self._commit(ChangeSet(deleted_conversations=[conversation_id])))
        log.info("conversation deleted", conversation_id=conversation_id)

    @contextlib.asynccontextmanager
    async def _serialized(self, key: str) -> AsyncIterator[None]:
        """Changes to one conversation (or around one task) one at a time: each reads the store
        and commits before the next starts."""
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    async def _settled(self) -> None:
        """Until every commit made so far is durable, so that the store shows it (a turn that
        just ended, say). Unavailable when one of them failed."""
        tail = self._tail
        if tail is not None and not tail.done():
            await asyncio.shield(tail)
        elif tail is not None and not tail.cancelled() and tail.exception() is not None:
            self._check_writable()

    async def _load_conversation(
        self, conversation_id: ConversationId
    ) -> tuple[Conversation, list[Turn]]:
        """The conversation and its turns as committed (after every commit in flight)."""
        await self._settled()
        conversation = await self.store.get_conversation(conversation_id)
        if conversation is None:
            raise NotFound(f"no conversation {conversation_id!r}", field="conversation_id")
        return conversation, await self.store.list_turns(conversation_id)

    def _check_turn_input(self, agent: str, options: str, message: str, field: str) -> None:
        """A turn's input is the conversation's options plus "prompt": the agent must take it."""
        try:
            self.catalog.check_input(agent, {**_options(options), "prompt": message})
        except InvalidArgument as exc:
            raise FailedPrecondition(
                f'agent {agent!r} cannot take a conversation\'s next message as its "prompt" '
                f"({exc})",
                field=field,
            ) from None

    def _check_idle(self, conversation_id: ConversationId) -> None:
        if conversation_id not in self.conversations:  # only those with an unfinished turn
            return
        for turn in self.turns.values():
            if turn.conversation_id == conversation_id:
                raise FailedPrecondition(
                    f"turn {turn.index} of conversation {conversation_id} (task {turn.task_id}) "
                    "is unfinished; wait for its answer or cancel that task",
                    field="conversation_id",
                )

    def _new_turn(
        self, conversation: Conversation, message: str, earlier: list[Turn], changes: ChangeSet
    ) -> tuple[Turn, Task]:
        """Build the next turn (a task and its first run) into `changes` and the view."""
        now = utcnow()
        conversation.turns += 1
        conversation.updated_at = now
        options = json.loads(conversation.input or "{}")
        run = Run(
            id=new_run_id(),
            task_id=new_task_id(),
            attempt=1,
            status=RunStatus.PENDING,
            created_at=now,
        )
        task = Task(
            id=run.task_id,
            agent=conversation.agent,
            input=json.dumps({**options, "prompt": message}),
            labels=dict(conversation.labels),
            policy=conversation.policy.copy(),
            status=TaskStatus.PENDING,
            created_at=now,
            updated_at=now,
            attempts=1,
            current_run_id=run.id,
            conversation_id=conversation.id,
            turn=conversation.turns,
        )
        turn = Turn(
            conversation_id=conversation.id,
            index=conversation.turns,
            task_id=task.id,
            message=message,
            created_at=now,
        )
        self.tasks[task.id] = task
        self.runs[run.id] = run
        self.conversations[conversation.id] = conversation
        self.turns[task.id] = turn
        self.contexts[task.id] = self._context(conversation, turn, earlier)
        self._enqueue(task, run, dispatch=False)
        changes.tasks.append(task)
        changes.runs.append(run)
        changes.conversations.append(replace(conversation))
        changes.turns.append(replace(turn))
        return turn, task

    async def _commit_turn(self, changes: ChangeSet) -> None:
        outgoing = self._plan(changes)  # assigned in the same commit when a worker is free
        await asyncio.shield(self._commit(changes, functools.partial(self._send, outgoing)))

    def _context(self, conversation: Conversation, turn: Turn, earlier: list[Turn]) -> TurnContext:
        before = [t for t in earlier if t.index < turn.index]
        history = transcript(before, conversation.summary, conversation.summarized_through)
        return TurnContext(
            conversation_id=conversation.id,
            turn=turn.index,
            history=history,
            session_id=conversation.session_id,
            session_snapshot=conversation.session_snapshot,
            session_cost_usd=conversation.session_cost_usd,
            session_turn=conversation.session_turn,
            summarize_through=self._summarize_through(conversation, turn, history),
        )

    def _summarize_through(
        self, conversation: Conversation, turn: Turn, history: tuple[TranscriptMessage, ...]
    ) -> int:
        """The turns to compact before this one runs: 0 unless the transcript would take more
        than COMPACT_AT of the smallest context window the agent announced (ModelBackend)."""
        spec = self.catalog.get(conversation.agent)
        windows = [b.context_window for b in spec.backends if b.context_window] if spec else []
        if not windows or estimated_tokens(history, turn.message) <= min(windows) * COMPACT_AT:
            return 0
        through = turn.index - 1 - KEEP_RECENT_TURNS
        return through if through > conversation.summarized_through else 0

    def _close_turn(self, task: Task, run: Run | None, changes: ChangeSet) -> None:
        """`task` (a turn) reached its terminal state: record the turn's outcome and exact usage,
        and add it to the conversation's totals, in the same commit."""
        turn = self.turns.pop(task.id, None)
        self.contexts.pop(task.id, None)
        tools = self._tools.pop(task.id, [])
        if turn is None:
            return
        conversation = self.conversations.pop(turn.conversation_id, None)
        turn.status, turn.error, turn.finished_at = task.status, task.error, task.finished_at
        turn.answer = _answer(task.result) if task.status is TaskStatus.COMPLETED else ""
        turn.tools = _compact_tools(tools)
        turn.usage = replace(task.usage)
        changes.turns.append(replace(turn))
        if conversation is not None:
            conversation.usage.add(turn.usage)
            conversation.updated_at = task.updated_at
            changes.conversations.append(replace(conversation, usage=replace(conversation.usage)))
        log.info(
            "turn ended",
            conversation_id=turn.conversation_id,
            turn=turn.index,
            task_id=task.id,
            run_id=run.id if run else None,
            worker_id=run.worker_id if run else None,
            status=task.status.name,
            cost_usd=turn.usage.cost_usd,
        )

    def _finish_task(
        self, task: Task, status: TaskStatus, now: datetime, *, error: str = "", result: str = ""
    ) -> None:
        assert task_can_move(task.status, status), (task.status, status)
        task.status = status
        task.updated_at = task.finished_at = now
        task.error = error
        task.result = result
        self.tasks.pop(task.id, None)

    def _enqueue(self, task: Task, run: Run, *, dispatch: bool = True, avoid: str = "") -> None:
        policy = task.policy
        self.queue.add(
            PendingRun(
                run_id=run.id,
                task_id=task.id,
                agent=task.agent,
                priority=policy.priority,
                required_labels=tuple(sorted(policy.required_labels.items())),
                provider=policy.required_provider,
                model=asked_model(policy.required_model, task.input),
                avoid=avoid,
            )
        )
        if policy.queue_timeout:
            self._later(policy.queue_timeout, self._queue_expired, run.id, policy.queue_timeout)
        if dispatch:
            self.request_dispatch()

    def _later(self, delay: float, callback: Callable[..., None], *args: object) -> None:
        """A timer the engine cancels when it stops (and none once it has stopped)."""
        if self.stopped:
            return
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timers.discard(handle)
            callback(*args)

        handle = loop.call_later(delay, fire)
        self._timers.add(handle)

    def _queue_expired(self, run_id: RunId, timeout: float) -> None:
        if self.store_error:
            return
        run = self.runs.get(run_id)
        queued = run_id in self.queue or run_id in self._parked
        if run is None or run.status is not RunStatus.PENDING or not queued:
            return
        self.queue.remove(run_id)
        self._parked.pop(run_id, None)
        reason = f"no worker took it within {timeout:g}s (queue timeout)"
        changes = ChangeSet()
        task = self._end_run(run, RunStatus.FAILED, changes, error=reason, retry=False)
        log.info(
            "task failed in the queue",
            task_id=run.task_id,
            run_id=run_id,
            worker_id=None,
            attempt=run.attempt,
            reason=reason,
        )
        self._commit(changes, functools.partial(self._publish, task))

    def _run_overdue(self, run_id: RunId, attempt: int, timeout: float) -> None:
        """The worker should have stopped this run at its timeout; stop it from here."""
        if self.store_error:
            return
        run = self.runs.get(run_id)
        if run is None or run.attempt != attempt or not run.status.active:
            return
        reason = (
            f"timed out after {timeout:g}s; the worker did not report the end within "
            f"{self.config.timeout_backstop:g}s more, so the control plane stopped it"
        )
        session = self.sessions.get(run.worker_id) if run.worker_id else None
        changes = ChangeSet()
        task = self._end_run(run, RunStatus.FAILED, changes, error=reason)
        log.warning(
            "run overdue",
            task_id=run.task_id,
            run_id=run_id,
            worker_id=run.worker_id,
            attempt=attempt,
        )

        def effect() -> None:
            if session is not None and not session.closed:
                # keeps its slot until the worker confirms it stopped
                session.send_cancel(run_id, attempt, reason)
            self._publish(task)

        self._commit(changes, effect)

    def _publish(self, task: Task | None) -> None:
        if task is not None:
            self.hub.publish(task.id, task)

    def _retry_delay(self, attempt: int) -> float:
        """Exponential backoff with jitter for the attempt after `attempt`."""
        cfg = self.config
        ceiling = min(cfg.retry_backoff_max, cfg.retry_backoff_base * 2.0 ** (attempt - 1))
        return ceiling * random.uniform(0.5, 1.0)

    def _retry_or_fail(self, task: Task, run: Run, changes: ChangeSet, reason: str) -> None:
        """After `run` ended without success: start another attempt if the policy allows."""
        now = utcnow()
        if task.attempts >= task.policy.max_attempts:
            self._finish_task(
                task,
                TaskStatus.FAILED,
                now,
                error=f"{reason} (attempt {run.attempt} of {task.policy.max_attempts})",
            )
            return
        task.attempts += 1
        retry = Run(
            id=new_run_id(),
            task_id=task.id,
            attempt=task.attempts,
            status=RunStatus.PENDING,
            created_at=now,
        )
        task.status = TaskStatus.PENDING
        task.current_run_id = retry.id
        task.worker_id = None
        task.updated_at = now
        task.error = reason
        self.runs[retry.id] = retry
        changes.runs.append(retry)
        # A lost run already waited out its worker's lease: retry it at once. Failures back off.
        delay = 0.0 if run.status is RunStatus.LOST else self._retry_delay(run.attempt)
        log.info(
            "run will be retried",
            task_id=task.id,
            run_id=run.id,
            worker_id=run.worker_id,
            attempt=run.attempt,
            next_run_id=retry.id,
            delay_s=round(delay, 3),
            reason=reason,
        )

        avoid = run.worker_id or ""  # another worker first, when one fits

        def enqueue() -> None:
            current = self.runs.get(retry.id) is retry and retry.status is RunStatus.PENDING
            if current and not self.store_error:
                self._enqueue(task, retry, avoid=avoid)

        if delay:
            self._later(delay, enqueue)
        else:
            self._enqueue(task, retry, dispatch=False, avoid=avoid)  # the caller's commit plans it

    # --- dispatch ----------------------------------------------------------------------------

    def request_dispatch(self) -> None:
        if not self._dispatch_scheduled:
            self._dispatch_scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_scheduled = False
        if self.store_error:
            return
        changes = ChangeSet()
        outgoing = self._plan(changes)
        if outgoing:
            self._commit(changes, functools.partial(self._send, outgoing))

    def _plan(self, changes: ChangeSet) -> list[tuple[WorkerSession, Task, wpb.RunAssignment]]:
        """Assign pending runs to free slots, recording the changes; send after the commit."""
        sessions = self.sessions
        clock = time.monotonic()
        for moved in self._moved:
            if sessions.get(moved.worker_id) is moved:  # not replaced or gone since
                quarantined = self.health.quarantined(moved.worker_id, clock)
                self.index.put(moved.candidate(quarantined=quarantined))
        self._moved.clear()
        if not self.queue or not sessions:
            return []
        plan = self.queue.plan(self.index, self.config.dispatch_spread)
        now = utcnow()
        if self.budgets.roll(now):
            self._release_parked()
        outgoing: list[tuple[WorkerSession, Task, wpb.RunAssignment]] = []
        for entry, worker_id in plan:
            run = self.runs.get(entry.run_id)
            task = self.tasks.get(entry.task_id)
            if run is None or task is None or run.status is not RunStatus.PENDING:
                self._moved.add(sessions[worker_id])  # the slot the plan counted stays free
                continue
            cap = self.budgets.blocking(task)
            if cap is not None:  # waits for the next day; its slot goes to the next run
                self._moved.add(sessions[worker_id])
                self._parked[run.id] = entry
                log.info(
                    "run held back by a daily budget",
                    task_id=task.id,
                    run_id=run.id,
                    worker_id=None,
                    reason=cap.reason(),
                )
                self.request_dispatch()
                continue
            session = sessions[worker_id]
            run.status, run.worker_id, run.assigned_at = RunStatus.ASSIGNED, worker_id, now
            self.runs.assigned(run)
            task.status, task.worker_id, task.updated_at = TaskStatus.RUNNING, worker_id, now
            session.runs.add(run.id)
            changes.runs.append(run)
            changes.tasks.append(task)
            outgoing.append((session, task, self._assignment(task, run)))
            if task.policy.timeout:
                self._later(
                    task.policy.timeout + self.config.timeout_backstop,
                    self._run_overdue,
                    run.id,
                    run.attempt,
                    task.policy.timeout,
                )
        return outgoing

    def _send(self, outgoing: list[tuple[WorkerSession, Task, wpb.RunAssignment]]) -> None:
        for session, task, assignment in outgoing:
            if not session.closed:
                session.send_assignment(assignment)
            self.hub.publish(task.id, task)

    def _assignment(self, task: Task, run: Run) -> wpb.RunAssignment:
        policy = task.policy
        assignment = wpb.RunAssignment(
            run_id=run.id,
            task_id=task.id,
            attempt=run.attempt,
            agent=task.agent,
            input_json=task.input,
            timeout_seconds=policy.timeout or 0.0,
            labels=task.labels or None,  # see convert: an empty map costs 2 µs
            required_provider=policy.required_provider,
            required_model=policy.required_model,
            fencing_token=run.attempt,
        )
        if policy.allow_subtasks and self.mcp_url:
            # Only the hash is stored, with the run. The text stays in memory while the run is
            # live, so that a copy sent again (a worker that may have read the first) carries
            # the same credential; after a restart a copy gets a new one.
            token = self._credentials.get(run.id)
            if token is None:
                issued = new_run_credential(run.id)
                run.credential_hash, token = issued.secret_hash, issued.token
                self._credentials[run.id] = token
            assignment.mcp_url, assignment.mcp_token = self.mcp_url, token
        run_options_to_pb(policy, assignment)
        context = self.contexts.get(task.id)
        if context is not None:
            assignment.resume_session_id = context.session_id
            turn_context_to_pb(context, assignment.conversation)
            history = assignment.conversation.history
            dropped = 0
            while history and assignment.ByteSize() > self.config.max_message_bytes:
                del history[0]  # the oldest first; compaction keeps this rare
                dropped += 1
            if dropped:
                kept = list(history)
                del history[:]
                note = f"({dropped} earlier messages left out: the transcript was too long)"
                history.add(role="user", text=note)
                history.extend(kept)
                log.warning(
                    "transcript cut to fit the assignment",
                    task_id=task.id,
                    run_id=run.id,
                    dropped_messages=dropped,
                )
        return assignment

    # --- worker sessions ---------------------------------------------------------------------

    def attach(self, worker: Worker, hello: wpb.WorkerHello) -> WorkerSession:
        """A worker said hello: register its session and reconcile the runs it holds.

        The session's lease starts now: the worker counts it from when it sent the hello.
        """
        if self.stopped:
            raise Unavailable(SHUTTING_DOWN)
        self._check_writable()
        old = self.sessions.pop(worker.id, None)
        if old is not None:
            old.closed = True
            old.kick("replaced by a newer session of the same worker")
        known = self.workers.get(worker.id)
        now = utcnow()
        if known is not None and known.enrolled_labels:
            # labels bound at enrollment win over what the worker announces
            worker.labels = {**worker.labels, **known.enrolled_labels}
            worker.enrolled_labels, worker.enrolled_at = known.enrolled_labels, known.enrolled_at
        worker.first_seen_at = known.first_seen_at if known and known.first_seen_at else now
        worker.connected_at = worker.last_heartbeat_at = now
        worker.status = WorkerStatus.DRAINING if hello.draining else WorkerStatus.ONLINE
        session = WorkerSession(
            worker,
            uuid.uuid4().hex,
            self.config.lease_duration,
            self.config.max_message_bytes,  # the server may send more (sizing.SEND_HEADROOM)
        )
        session.draining = hello.draining
        session.on_load_change = self._moved.add
        self._moved.add(session)
        self.sessions[worker.id] = session
        self.workers[worker.id] = worker
        self.catalog.learn(worker.agents)

        changes = ChangeSet(workers=[replace(worker)])
        lost: list[Task | None] = []
        held = {h.run_id: h for h in hello.held_runs}
        for run in self.runs.assigned_to(worker.id):  # not a scan of every run
            if not run.status.active:
                continue
            claim = held.pop(run.id, None)
            if claim is not None and claim.attempt == run.attempt:
                session.runs.add(run.id)
                self._forget_orphan(run.id)
            elif claim is None and run.status is RunStatus.ASSIGNED and run.task_id in self.tasks:
                # Sent, but maybe never read (the worker moved to a new channel, or the stream
                # broke first): send it again. A worker that has it already ignores the copy.
                session.runs.add(run.id)
                self._forget_orphan(run.id)
                session.send_assignment(self._assignment(self.tasks[run.task_id], run))
                if run.credential_hash:
                    changes.runs.append(run)  # a new credential's hash, after a restart
            else:
                self._forget_orphan(run.id)
                lost.append(
                    self._end_run(run, RunStatus.LOST, changes, error="the worker no longer has it")
                )
        for run_id, claim in held.items():
            # The worker still runs something the server has ended (cancelled while it was
            # away, or superseded): tell it to stop, and count the slot until it confirms.
            session.runs.add(RunId(run_id))
            session.send_cancel(run_id, claim.attempt, "run is no longer current")
        log.info(
            "worker connected",
            worker_id=worker.id,
            hostname=worker.hostname,
            agents=[a.name for a in worker.agents],
            capacity=worker.max_concurrent_runs,
            reclaimed=len(session.runs),
        )

        def effect() -> None:
            for task in lost:
                self._publish(task)
            self.request_dispatch()

        self._commit(changes, effect)
        return session

    def detach(self, session: WorkerSession) -> None:
        """The session's stream ended. Its runs wait for the worker to come back until its lease
        runs out (plus the margin); by then the worker has stopped them itself."""
        session.closed = True
        if self.sessions.get(session.worker_id) is not session:
            return  # replaced by a newer session (or dropped in recovery)
        del self.sessions[session.worker_id]
        self.index.remove(session.worker_id)
        worker = session.worker
        worker.status = WorkerStatus.OFFLINE
        deadline = session.lease_expires + self.config.lease_margin
        for run_id in session.runs:
            run = self.runs.get(run_id)
            if run is not None and run.status.active:
                self._orphan(run, deadline)
        self._commit(ChangeSet(workers=[replace(worker)]))
        log.info(
            "worker disconnected",
            worker_id=worker.id,
            reason=session.kick_reason or "stream ended",
            runs_waiting=len(session.runs),
        )

    def drain_worker(self, worker_id: WorkerId) -> Worker:
        """Tell a connected worker to drain: no new runs; it finishes, reports and exits."""
        self._check_writable()
        worker = self.workers.get(worker_id)
        if worker is None:
            raise NotFound(f"no worker {worker_id!r}", field="worker_id")
        session = self.sessions.get(worker_id)
        if session is None:
            raise FailedPrecondition(
                f"worker {worker_id} is {worker.status.name.lower()}, not connected",
                field="worker_id",
            )
        self.set_draining(session)
        session.send_drain()
        return worker

    async def revoke_worker(self, worker_id: WorkerId, reason: str) -> Worker:
        """Cut a worker's identity off for good: close its stream, lose its runs at once (no
        grace window; retried elsewhere per policy) and refuse it from now on. Durable on return.
        """
        self._check_writable()
        worker = self.workers.get(worker_id)
        if worker is None:
            raise NotFound(f"no worker {worker_id!r}", field="worker_id")
        if worker.status is WorkerStatus.REVOKED:
            raise FailedPrecondition(
                f"worker {worker_id} was already revoked: {worker.revoked_reason}",
                field="worker_id",
            )
        reason = reason or "revoked by an operator"
        session = self.sessions.pop(worker_id, None)
        self.index.remove(worker_id)
        if session is not None:
            worker = session.worker
            session.closed = True
            session.kick(f"worker {worker_id} was revoked: {reason}", denied=True)
        worker.status = WorkerStatus.REVOKED
        worker.revoked_at, worker.revoked_reason = utcnow(), reason
        self.workers[worker_id] = worker
        changes = ChangeSet(workers=[replace(worker)])
        lost: list[Task | None] = []
        for run in [r for r in self.runs.values() if r.worker_id == worker_id]:
            if run.status.active:
                self._forget_orphan(run.id)
                lost.append(
                    self._end_run(run, RunStatus.LOST, changes, error=f"worker revoked: {reason}")
                )

        def effect() -> None:
            for task in lost:
                self._publish(task)
            self.request_dispatch()

        await asyncio.shield(self._commit(changes, effect))
        log.warning("worker revoked", worker_id=worker_id, reason=reason, runs_ended=len(lost))
        return worker

    async def record_enrollment(
        self, worker_id: WorkerId, labels: dict[str, str], hostname: str
    ) -> Worker:
        """A worker identity was issued: remember it (offline until it connects) and its labels."""
        self._check_writable()
        self.check_not_revoked(worker_id)
        worker = self.workers.get(worker_id)
        if worker is None:
            worker = Worker(id=worker_id, hostname=hostname, status=WorkerStatus.OFFLINE)
            self.workers[worker_id] = worker
        worker.enrolled_labels, worker.enrolled_at = dict(labels), utcnow()
        worker.labels = {**worker.labels, **labels}
        await asyncio.shield(self._commit(ChangeSet(workers=[replace(worker)])))
        return worker

    def check_not_revoked(self, worker_id: WorkerId) -> None:
        """Raise PermissionDenied when `worker_id` was revoked (checked before every attach)."""
        worker = self.workers.get(worker_id)
        if worker is not None and worker.status is WorkerStatus.REVOKED:
            raise PermissionDenied(f"worker {worker_id} was revoked: {worker.revoked_reason}")

    def set_draining(self, session: WorkerSession) -> None:
        if session.draining or self.store_error:
            return
        session.draining = True
        self._moved.add(session)
        session.worker.status = WorkerStatus.DRAINING
        self._commit(ChangeSet(workers=[replace(session.worker)]))
        log.info("worker draining", worker_id=session.worker_id, runs=len(session.runs))

    def _orphan(self, run: Run, deadline: float) -> None:
        """`run`'s worker is away: end the run (LOST, retried per policy) at `deadline`
        (time.monotonic()) unless the worker reclaims it first."""
        self._forget_orphan(run.id)
        if self.stopped:
            return
        loop = asyncio.get_running_loop()
        self._orphans[run.id] = loop.call_later(
            max(0.0, deadline - time.monotonic()), self._orphan_expired, run.id, run.attempt
        )

    def _forget_orphan(self, run_id: RunId) -> None:
        handle = self._orphans.pop(run_id, None)
        if handle is not None:
            handle.cancel()

    def _orphan_expired(self, run_id: RunId, attempt: int) -> None:
        self._orphans.pop(run_id, None)
        if self.store_error:
            return
        run = self.runs.get(run_id)
        if run is None or run.attempt != attempt or not run.status.active:
            return
        if run.worker_id in self.sessions and run.id in self.sessions[run.worker_id].runs:
            return
        changes = ChangeSet()
        task = self._end_run(
            run,
            RunStatus.LOST,
            changes,
            error=f"the lease of worker {run.worker_id} ran out "
            f"({self.config.lease_duration:g}s without renewal)",
        )

        def effect() -> None:
            self._publish(task)
            self.request_dispatch()

        self._commit(changes, effect)

    # --- reports from workers ----------------------------------------------------------------

    def _current(self, session: WorkerSession, run_id: str, attempt: int) -> Run | None:
        run = self.runs.get(RunId(run_id))
        if (
            run is None
            or run.attempt != attempt
            or run.worker_id != session.worker_id
            or run.status.terminal
        ):
            return None
        return run

    def _reject(
        self, session: WorkerSession, what: str, run_id: str, attempt: int, reason: str = ""
    ) -> None:
        self.rejected_reports += 1
        known = self.runs.get(RunId(run_id))
        self._rejections.warning(
            session.worker_id,
            "report rejected",
            what=what,
            task_id=known.task_id if known else None,
            worker_id=session.worker_id,
            run_id=clip(run_id, 64),
            attempt=attempt,
            reason=reason
            or "run is not current on this worker (finished, other attempt or other worker)",
        )

    def handle_reports(self, session: WorkerSession, msg: wpb.WorkerMessage) -> None:
        """Apply a batch of status updates, output and acks from one worker.

        Each item is checked on its own first: one the server cannot understand (an unknown
        enum value, a time out of range) is refused alone and the rest goes on. The batch is
        acknowledged once what it changed is durable; a heartbeat renews the lease at once.
        """
        session.last_seen = time.monotonic()
        if self.leads is not None and not self.leads():
            self._lose_view(StoreUnavailable("this control plane's leadership lease ran out"))
            return
        if msg.HasField("heartbeat"):
            session.renew_lease(msg.heartbeat.seq)
        if self.store_error or session.closed:
            return  # nothing is acknowledged: the worker sends it again after recovery
        session.worker.last_heartbeat_at = utcnow()  # in memory; ListWorkers reads it there
        if msg.draining and not session.draining:
            self.set_draining(session)
        if not (msg.chunks or msg.statuses or msg.cancel_acks):
            self._ack_in_order(session, msg.message_seq)
            return
        received = utcnow()
        chunks = self._new_chunks(
            c for c in (self._parse_chunk(session, pc, received) for pc in msg.chunks) if c
        )
        statuses = [u for u in (self._parse_status(session, u) for u in msg.statuses) if u]
        for c in chunks:
            if c.kind is OutputKind.EVENT and c.task_id in self.turns:
                self._note_tool(c)
        changes = ChangeSet(chunks=chunks)
        published: list[tuple[TaskId, OutputChunk | Task]] = [
            (run_task, c) for c in chunks if (run_task := c.task_id) is not None
        ]
        try:
            freed = False
            for ack in msg.cancel_acks:
                if ack.run_id in session.runs and RunId(ack.run_id) not in self.runs:
                    session.runs.discard(RunId(ack.run_id))
                    freed = True
            for update, status in statuses:
                freed |= self._status(session, update, status, changes, published)
            # Slots freed by finished runs are refilled in the same commit.
            outgoing = self._plan(changes) if freed else []
        except Exception as exc:  # a bug: the view may now be ahead of the store
            log.exception("applying a worker's reports failed", worker_id=session.worker_id)
            self._lose_view(exc)
            return
        seq = msg.message_seq
        if not changes:
            self._ack_in_order(session, seq)
            return
        hub = self.hub

        def effect() -> None:
            # Followers first: whoever waits on a result is woken before the worker's ack and
            # its next assignments are written.
            for task_id, item in published:
                hub.publish(task_id, item)
            if seq:
                session.send_ack(seq)
            self._send(outgoing)

        self._commit(changes, effect)

    def _new_chunks(self, parsed: Iterable[OutputChunk]) -> list[OutputChunk]:
        """The chunks not stored yet: a worker numbers a run's chunks in order and sends them in
        that order, so one at or below the run's head is a copy sent again."""
        heads = self._heads
        out = []
        for chunk in parsed:
            if chunk.seq > heads.get(chunk.run_id, 0):
                heads[chunk.run_id] = chunk.seq
                out.append(chunk)
        return out

    def _note_tool(self, chunk: OutputChunk) -> None:
        """Keep a turn's tool calls and results, compactly, for its transcript."""
        try:
            event = json.loads(chunk.data)
        except ValueError:
            return
        if not isinstance(event, dict) or chunk.task_id is None:
            return
        kind = event.get("type")
        if kind == "tool_use":
            entry: dict[str, object] = {
                "tool": event.get("name", ""),
                "input": _clip(event.get("input")),
            }
        elif kind == "tool_result":
            entry = {"result": _clip(event.get("content")), "error": bool(event.get("is_error"))}
        else:
            return
        self._tools.setdefault(chunk.task_id, []).append(entry)

    def _ack_in_order(self, session: WorkerSession, seq: int) -> None:
        """Acknowledge a message that changed nothing, but only after everything before it is
        durable: an acknowledgement covers every earlier message too."""
        if not seq:
            return
        tail = self._tail
        if tail is None or (tail.done() and not tail.cancelled() and tail.exception() is None):
            session.send_ack(seq)
            return

        def after(future: asyncio.Future[None]) -> None:
            if not future.cancelled() and future.exception() is None:
                session.send_ack(seq)

        tail.add_done_callback(after)

    def _parse_chunk(
        self, session: WorkerSession, pc: pb.OutputChunk, received: datetime
    ) -> OutputChunk | None:
        run = self._current(session, pc.run_id, pc.attempt)
        if run is None:
            self._reject(session, "output", pc.run_id, pc.attempt)
            return None
        if len(pc.data) > self.config.max_chunk_bytes or pc.seq < 1:
            self._reject(session, "output", pc.run_id, pc.attempt, "oversized or unnumbered")
            return None
        try:
            kind = OutputKind(pc.kind) if pc.kind else OutputKind.TEXT
        except ValueError:
            self._reject(session, "output", pc.run_id, pc.attempt, f"unknown kind {pc.kind}")
            return None
        try:
            at = ts_to_datetime(pc.time) if pc.HasField("time") else received
        except (ValueError, OverflowError, OSError):
            self._reject(session, "output", pc.run_id, pc.attempt, "time is out of range")
            return None
        return OutputChunk(
            run_id=run.id,
            attempt=run.attempt,
            seq=pc.seq,
            data=pc.data,
            kind=kind,
            time=at,
            task_id=run.task_id,
        )

    def _parse_status(
        self, session: WorkerSession, update: wpb.RunStatusUpdate
    ) -> tuple[wpb.RunStatusUpdate, RunStatus] | None:
        status = _RUN_STATUSES.get(update.status)
        if status is None:
            reason = f"unknown run status {update.status}"
            self._reject(session, "status", update.run_id, update.attempt, reason)
            return None
        usage = update.usage
        if update.HasField("usage") and not (math.isfinite(usage.cost_usd) and usage.cost_usd >= 0):
            reason = "usage.cost_usd must be a finite number >= 0"
            self._reject(session, "status", update.run_id, update.attempt, reason)
            return None
        return update, status

    def _status(
        self,
        session: WorkerSession,
        update: wpb.RunStatusUpdate,
        status: RunStatus,
        changes: ChangeSet,
        published: list[tuple[TaskId, OutputChunk | Task]],
    ) -> bool:
        """Apply one (parsed) status update. Returns whether a slot on the worker was freed."""
        run = self._current(session, update.run_id, update.attempt)
        if run is None:
            run_id = RunId(update.run_id)
            if status.terminal:
                self._late_report(session, update, changes)
            # A terminal report for a run the server already ended still frees the slot.
            if status.terminal and run_id in session.runs and run_id not in self.runs:
                session.runs.discard(run_id)
                return True
            self._reject(session, "status", update.run_id, update.attempt)
            return False
        if status is run.status:
            return False
        if not run_can_move(run.status, status):
            self._reject(session, f"status {status.name}", update.run_id, update.attempt)
            return False
        now = utcnow()
        if status is RunStatus.RUNNING:
            run.status, run.started_at = status, now
            run.session_id = kept_session_id(update.session_id) or run.session_id
            changes.runs.append(run)
            return False
        error, result = clip_error(update.error), update.result_json
        fault = fault_from_pb(update.fault) if status is RunStatus.FAILED else Fault.UNKNOWN
        if status is not RunStatus.COMPLETED:
            # Only an answer is kept: a failed run's "result" would be read back with each of
            # up to 100 attempts in one GetTask.
            result = ""
        elif over := result_over_limit(result):  # a worker that does not bound results itself
            result, status, error, fault = "", RunStatus.FAILED, over, Fault.TASK
        run.result = result
        if update.HasField("usage"):
            run.usage = usage_from_pb(update.usage)
        if update.HasField("backend_used"):
            run.backend_used = bounded_backend(backend_from_pb(update.backend_used))
        run.session_id = kept_session_id(update.session_id) or run.session_id
        if status is RunStatus.FAILED:
            run.fault = fault
        self._adopt_session(run, update)
        self._note_health(session, run, status, error, changes)
        task = self._end_run(run, status, changes, error=error)
        session.runs.discard(run.id)
        if task is not None:
            published.append((task.id, task))
        return True

    def _await_last_report(self, task: Task, run: Run) -> None:
        """`run` was cancelled while its worker ran it: the worker's report of the run's end
        still counts what the run spent (model calls already made are paid for)."""
        turn = self.turns.get(task.id)
        self._stopping[run.id] = _Stopping(
            run.id,
            task.id,
            task.agent,
            task.labels,
            task.schedule,
            run.worker_id or "",
            run.attempt,
            turn.conversation_id if turn else None,
            turn.index if turn else 0,
            task.root_task_id,
        )
        grace = 2 * (self.config.lease_duration + self.config.lease_margin) + STOPPING_GRACE
        self._later(grace, self._forget_stopping, run.id)

    def _forget_stopping(self, run_id: RunId) -> None:
        self._stopping.pop(run_id, None)

    def _late_report(
        self, session: WorkerSession, update: wpb.RunStatusUpdate, changes: ChangeSet
    ) -> None:
        stopping = self._stopping.get(RunId(update.run_id))
        if (
            stopping is None
            or stopping.worker_id != session.worker_id
            or stopping.attempt != update.attempt
        ):
            return
        del self._stopping[stopping.run_id]
        usage = usage_from_pb(update.usage) if update.HasField("usage") else Usage()
        if usage.empty:
            return
        model = update.backend_used.model_name[:MAX_REPORTED_NAME]
        changes.late_usage.append(
            LateUsage(
                stopping.run_id,
                stopping.task_id,
                usage,
                conversation_id=stopping.conversation_id,
                turn=stopping.turn,
                agent=stopping.agent,
                model=model,
                worker_id=stopping.worker_id,
            )
        )
        self.budgets.spend(stopping.labels, stopping.schedule, usage.cost_usd, utcnow())
        tree = self.trees.get(stopping.tree_root) if stopping.tree_root else None
        if tree is not None and not tree.closing:
            tree.spent_usd += usage.cost_usd
            if reason := tree.spent():
                self._close_tree(tree, reason, changes)
        # A conversation with a turn in flight is written whole from the view: it must carry
        # this too. Otherwise the rows are only in the store, and whoever is about to rewrite
        # one from a read made before this commit reads again (send_message, continue_task).
        conversation = self.conversations.get(stopping.conversation_id or ConversationId(""))
        if conversation is not None:
            conversation.usage.add(usage)
        self._late_usage += 1
        log.info(
            "cancelled run's spending recorded",
            task_id=stopping.task_id,
            run_id=stopping.run_id,
            worker_id=stopping.worker_id,
            cost_usd=usage.cost_usd,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
        )

    def _adopt_session(self, run: Run, update: wpb.RunStatusUpdate) -> None:
        """A turn's run ended with its agent's session state: the next turn continues from it,
        whichever worker runs it. The snapshot and its running cost total travel together."""
        turn = self.turns.get(run.task_id)
        conversation = self.conversations.get(turn.conversation_id) if turn else None
        if conversation is None:
            return
        if update.summary and update.summarized_through > conversation.summarized_through:
            conversation.summary = update.summary
            conversation.summarized_through = update.summarized_through
        session_id, snapshot = (
            kept_session_id(update.session_id),
            kept_snapshot(update.session_snapshot),
        )
        if not (session_id or update.session_snapshot):
            return
        # Replaced even by nothing: an older snapshot no longer is the session (too big to move,
        # or a new session); the next worker then resumes its own copy or uses the transcript.
        conversation.session_id = session_id or conversation.session_id
        conversation.session_snapshot = snapshot
        conversation.session_cost_usd = update.session_cost_usd
        conversation.session_turn = turn.index if turn else 0

    def _end_run(
        self,
        run: Run,
        status: RunStatus,
        changes: ChangeSet,
        *,
        error: str = "",
        retry: bool = True,
    ) -> Task | None:
        """Record a run's end and decide what happens to its task; returns the task's state."""
        now = utcnow()
        run.status, run.finished_at = status, now
        run.started_at = run.started_at or (now if status is RunStatus.COMPLETED else None)
        run.error = error
        self.runs.pop(run.id, None)
        self._credentials.pop(run.id, None)
        self._heads.pop(run.id, None)
        changes.runs.append(run)
        task = self.tasks.get(run.task_id)
        if task is None:
            return None
        task.usage.add(run.usage)
        self.budgets.spend(task.labels, task.schedule, run.usage.cost_usd, now)
        log_ = log.bind(
            task_id=task.id, run_id=run.id, worker_id=run.worker_id, attempt=run.attempt
        )
        if status is RunStatus.COMPLETED:
            self._finish_task(task, TaskStatus.COMPLETED, now, result=run.result)
            log_.debug("task completed")
        elif status is RunStatus.FAILED and not (retry and task.policy.retry_on_failure):
            self._finish_task(task, TaskStatus.FAILED, now, error=error or "run failed")
            log_.info("task failed", error=error)
        else:
            reason = {
                RunStatus.FAILED: f"run failed: {error}",
                RunStatus.LOST: f"run lost: {error}" if error else "run lost",
                RunStatus.CANCELLED: f"worker stopped the run: {error or 'no reason given'}",
            }[status]
            log_.warning("run ended without success", status=status.name, error=error)
            self._retry_or_fail(task, run, changes, reason)
        changes.tasks.append(task)
        if task.status.terminal:
            self._close_turn(task, run, changes)
            self._left_tree(task, changes)
        return task

    # --- worker health, agents, budgets ------------------------------------------------------

    def _note_health(
        self,
        session: WorkerSession,
        run: Run,
        status: RunStatus,
        error: str,
        changes: ChangeSet,
    ) -> None:
        """Feed the worker's circuit breaker with how its run ended (see controlplane.health); a
        quarantine's start and end go out as worker events (the TUI shows them). A failure the
        worker says was the task's (bad input, a schema never met, a cost limit) says nothing
        about the worker: it neither counts nor ends a streak."""
        if status is RunStatus.COMPLETED:
            self.health.succeeded(session.worker_id)
        elif status is RunStatus.FAILED and run.fault is not Fault.TASK:
            began = run.assigned_at or run.created_at
            elapsed = (utcnow() - began).total_seconds()
            tripped = self.health.failed(
                session.worker_id, elapsed, error, time.monotonic(), utcnow()
            )
            if tripped is not None:
                log.warning(
                    "worker quarantined",
                    worker_id=session.worker_id,
                    seconds=round(tripped.seconds, 1),
                    reason=tripped.reason,
                )
                self._later(tripped.seconds + 0.05, self._quarantine_over, session.worker_id)
                self._moved.add(session)  # no new runs while it lasts
                changes.workers.append(replace(self.show_health(session.worker)))
                return
        self.show_health(session.worker)

    def _quarantine_over(self, worker_id: WorkerId) -> None:
        worker = self.workers.get(worker_id)
        if worker is None or self.store_error:
            return
        if (session := self.sessions.get(worker_id)) is not None:
            self._moved.add(session)
        self.show_health(worker)
        self._commit(ChangeSet(workers=[replace(worker)]), self.request_dispatch)

    def show_health(self, worker: Worker) -> Worker:
        """The worker with its breaker state as of now, for readers."""
        view = self.health.view(worker.id, time.monotonic())
        worker.consecutive_failures, worker.quarantined_until, worker.quarantine_reason = view
        return worker

    def update_agents(self, session: WorkerSession, agents: tuple[AgentSpec, ...]) -> None:
        """The worker announced a change in what it can run (checked already)."""
        if session.closed or self.store_error or agents == session.worker.agents:
            return
        session.set_agents(agents)
        self.catalog.learn(agents)
        log.info(
            "worker agents changed",
            worker_id=session.worker_id,
            available=[a.name for a in agents if a.available],
            unavailable={a.name: a.unavailable_reason for a in agents if not a.available},
        )
        self._commit(ChangeSet(workers=[replace(session.worker)]), self.request_dispatch)

    def _midnight(self) -> None:
        """A new UTC day: budgets start from zero (the timer is set again by the next start when
        the store failed meanwhile)."""
        if self.store_error:
            return
        self.budgets.roll(utcnow())
        self._release_parked()
        self._later(self.budgets.seconds_to_next_day(utcnow()) + 0.5, self._midnight)

    def _release_parked(self) -> None:
        """The runs held back by a budget go back to the queue (a new day, a new cap)."""
        parked, self._parked = self._parked, {}
        for entry in parked.values():
            run, task = self.runs.get(entry.run_id), self.tasks.get(entry.task_id)
            if run is not None and task is not None and run.status is RunStatus.PENDING:
                self.queue.add(entry)
        if parked:
            self.request_dispatch()

    def budget_caps(self) -> list[Cap]:
        """The daily caps with today's spending (a new day starts here too)."""
        if self.budgets.roll(utcnow()):
            self._release_parked()
        return self.budgets.caps()

    def parked_reason(self, task: Task) -> str:
        """Why a pending task's run is held back by a budget ("" when it is not)."""
        if self.budgets.roll(utcnow()):
            self._release_parked()
        cap = self.budgets.blocking(task)
        return cap.reason() if cap is not None else ""

    # --- task trees (subtasks.py) ------------------------------------------------------------

    def _left_tree(self, task: Task, changes: ChangeSet) -> None:
        """`task` of a tree ended: once the sub-tasks spent the budget, the rest of the tree's
        sub-tasks end in the same change set: a pending one fails instead of being run, one
        that runs is cancelled (its worker is told once the change set is durable). The root
        goes on."""
        tree, reason = subtasks.left(self.trees, task)
        if tree is not None and reason:
            self._close_tree(tree, reason, changes)

    def _close_tree(self, tree: subtasks.Tree, reason: str, changes: ChangeSet) -> None:
        """The sub-tasks of `tree` spent its budget: end the ones not ended yet (see above)."""
        tree.closing = True
        now = utcnow()
        for below in [t for t in self.tasks.values() if t.root_task_id == tree.root]:
            if below.id not in self.tasks:  # ended on the way (a retry's failure, say)
                continue
            run = self.runs.get(below.current_run_id) if below.current_run_id else None
            if run is not None and run.status is RunStatus.PENDING:
                self.queue.remove(run.id)
                log.info("sub-task refused by its tree's budget", task_id=below.id, run_id=run.id)
                self._end_run(run, RunStatus.FAILED, changes, error=reason, retry=False)
            else:
                log.info(
                    "sub-task stopped by its tree's budget",
                    task_id=below.id,
                    run_id=run.id if run else None,
                    worker_id=run.worker_id if run else None,
                )
                self._also_deliver.append(self._cancel_one(below, reason, now, changes))
            self._also_publish.append(below)
        tree.closing = False

    def run_grant(self, token: str) -> tuple[Run, Task] | None:
        return subtasks.credential_holder(token, self.runs, self.tasks)

    # --- reads -------------------------------------------------------------------------------

    def worker_runs(self, worker_id: WorkerId) -> list[RunId]:
        session = self.sessions.get(worker_id)
        return sorted(session.runs) if session else []


_RUN_STATUSES: Final = {int(s): s for s in RunStatus}  # a lookup per report, not an Enum call

SHUTTING_DOWN = "the control plane is shutting down; reconnect shortly"

# How long past two leases a cancelled run's last report is awaited: a worker stops a cancelled
# run at once, but its report may wait for the worker's next session.
STOPPING_GRACE = 60.0


@dataclass(frozen=True, slots=True)
class _Stopping:
    run_id: RunId
    task_id: TaskId
    agent: str
    labels: dict[str, str]
    schedule: str
    worker_id: str
    attempt: int
    conversation_id: ConversationId | None
    turn: int
    tree_root: TaskId | None  # a sub-task's root: what it spent counts in the tree's budget


MAX_TOOLS_JSON = 4000  # characters of a turn's compact tool log
MAX_TOOL_FIELD = 300


def _options(text: str, *, keep_prompt: bool = False) -> dict[str, object]:
    """A task input (a JSON object) as a conversation's options: without "prompt"."""
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    if not keep_prompt:
        value.pop("prompt", None)
    return value


def _title(message: str) -> str:
    line = " ".join(message.split())
    return line if len(line) <= 60 else line[:59] + "…"


def _answer(result: str) -> str:
    """The text of an answer: the result's "text" when it has one, else the result itself."""
    try:
        value = json.loads(result) if result else None
    except ValueError:
        return result
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        return str(value["text"])
    return result


def _clip(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= MAX_TOOL_FIELD else text[: MAX_TOOL_FIELD - 1] + "…"


def _compact_tools(tools: list[dict[str, object]]) -> str:
    if not tools:
        return ""
    text = json.dumps(tools, separators=(",", ":"))
    while len(text) > MAX_TOOLS_JSON and len(tools) > 1:
        tools = tools[1:]  # the newest calls matter most for what comes next
        text = json.dumps([{"omitted": "earlier tool calls"}, *tools], separators=(",", ":"))
    return text[:MAX_TOOLS_JSON]
