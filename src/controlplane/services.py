"""gRPC handlers: authenticate, validate, convert at the edge, and call the engine."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc
import structlog

from taskrun import convert
from taskrun.controlplane import subtasks, usage
from taskrun.controlplane.auth import Authenticator, Caller
from taskrun.controlplane.engine import Engine
from taskrun.controlplane.followers import Subscription
from taskrun.controlplane.guard import status_code
from taskrun.controlplane.pages import page_token, token_field
from taskrun.controlplane.sizing import OUTPUT_BATCH, fitting, output_updates
from taskrun.controlplane.submit import SubmitStream
from taskrun.controlplane.waiting import check_known_agent, check_offered, waiting_reason
from taskrun.core import errors
from taskrun.core.access import Scope
from taskrun.core.ids import RunId, TaskId
from taskrun.core.models import (
    OutputChunk,
    OutputKind,
    Run,
    Task,
    asked_model,
    utcnow,
)
from taskrun.core.status import TaskStatus
from taskrun.core.store import TaskQuery
from taskrun.core.text import quoted
from taskrun.core.validation import (
    MAX_BATCH,
    MAX_INPUT_BYTES,
    validate_agent_name,
    validate_labels,
    validate_task_spec,
)
from taskrun.v1 import common_pb2 as pb
from taskrun.v1 import tasks_pb2, tasks_pb2_grpc

log = structlog.get_logger(__name__)


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50
# GetTask's tree: the oldest, as many as fit one message; `task list --parent` pages the rest
MAX_SUBTASKS_SHOWN = 1000


def domain_errors(handler: F) -> F:
    """Turn a domain error raised by a unary handler into its gRPC status."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except errors.TaskRunError as exc:
            await context.abort(status_code(exc), str(exc))

    return wrapper  # type: ignore[return-value]


def _task_id(value: str, field: str = "task_id") -> TaskId:
    if not value:
        raise errors.InvalidArgument("must not be empty", field=field)
    if len(value) > 64:
        raise errors.InvalidArgument("is too long to be a task id", field=field)
    return TaskId(value)


class TaskService(tasks_pb2_grpc.TaskServiceServicer):
    def __init__(self, engine: Engine, auth: Authenticator) -> None:
        self.engine = engine
        self.auth = auth

    def _task_pb(
        self,
        task: Task,
        runs: list[Run] | None = None,
        reasons: dict[tuple[object, ...], str] | None = None,
    ) -> pb.Task:
        """The task as sent to callers, with why it waits when it is pending. `reasons` caches
        the reason per requirement across one page (it looks at every known worker)."""
        message = convert.task_to_pb(task, runs)
        engine = self.engine
        if task.status is TaskStatus.PENDING:
            p = task.policy
            labels = tuple(sorted(p.required_labels.items()))
            model = asked_model(p.required_model, task.input)  # the input's model binds too
            key: tuple[object, ...] = (task.agent, labels, p.required_provider, model)
            reason = reasons.get(key) if reasons is not None else None
            if reason is None:
                clock = time.monotonic()
                reason = waiting_reason(
                    task, engine.workers.values(), lambda w: engine.health.view(w.id, clock)[1]
                )
                if reasons is not None:
                    reasons[key] = reason
            # a budget depends on the task's own labels and schedule: not cached
            message.waiting_reason = engine.parked_reason(task) or reason
        return message

    async def _create(
        self,
        requests: list[tasks_pb2.CreateTaskRequest],
        prefix: Callable[[int], str],
        caller: Caller,
        subscribe: Callable[[Task], None] | None = None,
    ) -> list[tuple[Task, bool]]:
        """Validate and create the requested tasks: (task, created) for each, in order."""
        default_attempts = self.engine.config.default_max_attempts
        specs = [
            validate_task_spec(convert.spec_from_pb(req, default_attempts), prefix(i))
            for i, req in enumerate(requests)
        ]
        catalog = self.engine.catalog
        known_agents = catalog.names()
        for i, spec in enumerate(specs):
            if caller.run is not None:  # a run's credential creates sub-tasks of its task
                spec.parent_task_id = caller.run.task_id
            if spec.policy.allow_subtasks and not self.engine.mcp_url:
                raise errors.FailedPrecondition(
                    "needs the HTTP API, whose MCP server sub-tasks are created through: start "
                    "the server with --http-listen",
                    field=f"{prefix(i)}policy.allow_subtasks",
                )
            if not requests[i].allow_unknown_agent:
                check_known_agent(spec.agent, known_agents, f"{prefix(i)}agent")
                policy = spec.policy
                model = asked_model(policy.required_model, spec.input)
                check_offered(
                    spec.agent,
                    policy.required_provider,
                    model,
                    self.engine.workers.values(),
                    prefix(i),
                    "policy.required_model" if policy.required_model else "input_json.model",
                )
            catalog.check_input_text(spec.agent, spec.input, f"{prefix(i)}input_json")
        results = await self.engine.create_tasks(specs, subscribe)
        for i, (spec, (task, created)) in enumerate(zip(specs, results, strict=True)):
            if not created and not task.same_request(spec):
                raise errors.AlreadyExists(
                    f"idempotency key {quoted(spec.policy.idempotency_key)} was used by task "
                    f"{task.id} "
                    "with a different request",
                    field=f"{prefix(i)}policy.idempotency_key",
                )
        return results

    def _created_pb(self, results: list[tuple[Task, bool]]) -> list[tasks_pb2.CreateTaskResponse]:
        reasons: dict[tuple[object, ...], str] = {}  # why tasks of one requirement wait
        return [
            tasks_pb2.CreateTaskResponse(task=self._task_pb(task, reasons=reasons), created=new)
            for task, new in results
        ]

    @domain_errors
    async def CreateTask(
        self, request: tasks_pb2.CreateTaskRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.CreateTaskResponse:
        caller = await self.auth.operator(context, Scope.SUBMIT, runs=True)
        (response,) = self._created_pb(await self._create([request], lambda _: "", caller))
        return response

    @domain_errors
    async def CreateTasks(
        self, request: tasks_pb2.CreateTasksRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.CreateTasksResponse:
        caller = await self.auth.operator(context, Scope.SUBMIT, runs=True)
        if not request.tasks:
            raise errors.InvalidArgument("must hold at least one task", field="tasks")
        if len(request.tasks) > MAX_BATCH:
            raise errors.InvalidArgument(
                f"holds {len(request.tasks)} tasks, at most {MAX_BATCH}", field="tasks"
            )
        results = await self._create(list(request.tasks), lambda i: f"tasks[{i}].", caller)
        return tasks_pb2.CreateTasksResponse(results=self._created_pb(results))

    async def CreateAndFollowTask(
        self, request: tasks_pb2.CreateAndFollowTaskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tasks_pb2.TaskUpdate]:
        """CreateTask, then FollowTask(follow=true) on the same stream."""
        caller = await self.auth.operator(context, Scope.SUBMIT)
        updates = self._create_and_follow(request, caller, context)
        try:
            async for update in updates:
                yield update
        except errors.TaskRunError as exc:
            await context.abort(status_code(exc), str(exc))
        finally:
            await updates.aclose()

    async def _create_and_follow(
        self,
        request: tasks_pb2.CreateAndFollowTaskRequest,
        caller: Caller,
        context: grpc.aio.ServicerContext,
    ) -> AsyncGenerator[tasks_pb2.TaskUpdate, None]:
        """Create the task (a refusal raises its domain error before anything is yielded),
        then follow it. The subscription is made before the task's commit is queued, so the
        stream needs no read of the store: the first update is the task as committed,
        published by the commit itself."""
        hub = self.engine.hub
        subs: list[Subscription] = []
        outcome_only = request.outcome_only
        follow = tasks_pb2.FollowTaskRequest(
            follow=True, include_events=request.include_events, outcome_only=outcome_only
        )
        try:
            ((task, created),) = await self._create(
                [request.task],
                lambda _: "task.",
                caller,
                lambda t: subs.append(hub.subscribe(t.id, outcome_only=outcome_only)),
            )
            task_id = task.id
            follow.task_id = task_id
            if created:
                updates = self._follow(task_id, follow, subs[0], caller, context, fresh=True)
            else:  # an idempotent replay: follow the existing task as FollowTask does
                subs.append(hub.subscribe(task_id, outcome_only=outcome_only))
                updates = self._follow(task_id, follow, subs[-1], caller, context)
            first = True
            async for update in updates:
                if first:
                    update.created, first = created, False
                yield update
        finally:
            for sub in subs:
                hub.unsubscribe(sub)

    async def SubmitTasks(
        self,
        requests: AsyncIterator[tasks_pb2.SubmitRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        """CreateAndFollowTask, many at once on one stream (see controlplane.submit). Requests
        are read with `context.read()`, which refuses a message that does not parse, and
        updates written with `context.write()`."""
        caller = await self.auth.operator(context, Scope.SUBMIT)
        stream = SubmitStream(self.engine.hub, self.auth, self._create_and_follow, caller, context)
        await stream.serve()

    @domain_errors
    async def GetTask(
        self, request: tasks_pb2.GetTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.Task:
        caller = await self.auth.operator(context, Scope.READ, runs=True)
        task_id = _task_id(request.task_id)
        if request.before_attempt < 0:
            raise errors.InvalidArgument(
                "must be an attempt's number, or 0 for up to the latest", field="before_attempt"
            )
        store = self.engine.store
        budget = self.engine.config.max_message_bytes
        task = await self._visible(caller, task_id)
        message = self._task_pb(task)
        runs = await store.list_runs(task_id)
        if request.before_attempt:
            runs = [r for r in runs if r.attempt < request.before_attempt]
        newest_first, _ = fitting((_run_pb(r) for r in reversed(runs)), budget - message.ByteSize())
        message.runs.extend(reversed(newest_first))
        message.earlier_runs = len(runs) - len(newest_first)
        if not request.before_attempt and (task.root_task_id or task.policy.allow_subtasks):
            tree = await store.list_task_tree(task.tree_root)
            parents = {t.id: t.parent_task_id for t in tree}
            wanted = set(subtasks.below(task.id, parents))
            below = [t for t in tree if t.id in wanted][:MAX_SUBTASKS_SHOWN]
            room = budget - message.ByteSize()
            shown, _ = fitting((self._task_pb(t) for t in below), room, at_least=0)
            message.subtasks.extend(shown)
        return message

    async def _visible(self, caller: Caller, task_id: TaskId) -> Task:
        """The task, if the caller may see it: anyone but a run's credential sees every task;
        that sees only the tasks below its own (NOT_FOUND for any other, as for none)."""
        task = await self.engine.store.get_task(task_id)
        if task is not None and caller.run is not None:
            ancestor: Task | None = task
            while ancestor is not None and ancestor.parent_task_id != caller.run.task_id:
                up = ancestor.parent_task_id
                ancestor = await self.engine.store.get_task(up) if up else None
            if ancestor is None:
                task = None
        if task is None:
            below = f" among the sub-tasks of task {caller.run.task_id}" if caller.run else ""
            raise errors.NotFound(f"no task {quoted(task_id)}{below}", field="task_id")
        return task

    @domain_errors
    async def GetUsage(
        self, request: tasks_pb2.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.UsageReport:
        await self.auth.operator(context, Scope.READ)
        now = utcnow()
        start = usage.since(request.days, now)
        offset = token_field(request.page_token, "GetUsage")
        if offset and not offset.isdigit():
            raise errors.InvalidArgument("is not a token returned by GetUsage", field="page_token")
        skip = int(offset or 0)
        totals = usage.totals(await self.engine.store.usage_sums(start))
        rows, cut = fitting(
            (_usage_row_pb(total) for total in totals[skip:]),
            self.engine.config.max_message_bytes,
        )
        report = tasks_pb2.UsageReport(rows=rows)
        if cut:
            report.next_page_token = page_token(str(skip + len(rows)))
        if skip:
            return report
        for cap in self.engine.budget_caps():
            report.budgets.add(
                kind=cap.kind,
                key=cap.key,
                limit_usd=cap.limit_usd,
                spent_usd=cap.spent_usd,
                reached=cap.reached,
            )
        return report

    @domain_errors
    async def ListTasks(
        self, request: tasks_pb2.ListTasksRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.ListTasksResponse:
        await self.auth.operator(context, Scope.READ)
        size = request.page_size or DEFAULT_PAGE_SIZE
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise errors.InvalidArgument(
                f"must be between 1 and {MAX_PAGE_SIZE}", field="page_size"
            )
        statuses: set[TaskStatus] = set()
        for value in request.statuses:
            try:
                statuses.add(TaskStatus(value))
            except ValueError:
                raise errors.InvalidArgument(f"unknown status {value}", field="statuses") from None
        if request.agent:
            validate_agent_name(request.agent)
        labels = validate_labels(dict(request.labels))
        query = TaskQuery(
            statuses=frozenset(statuses),
            agent=request.agent,
            labels=tuple(sorted(labels.items())),
            worker_id=request.worker_id,
            schedule=request.schedule,
            parent_task_id=_task_id(request.parent_task_id, "parent_task_id")
            if request.parent_task_id
            else "",
            limit=size,
            before=TaskId(token_field(request.page_token, "ListTasks")) or None,
        )
        page = await self.engine.store.list_tasks(query)
        reasons: dict[tuple[object, ...], str] = {}
        tasks, cut = fitting(
            (self._task_pb(t, reasons=reasons) for t in page.tasks),
            self.engine.config.max_message_bytes,
        )
        next_before = TaskId(tasks[-1].id) if cut else page.next_before  # large inputs: cut
        return tasks_pb2.ListTasksResponse(
            tasks=tasks,
            next_page_token=page_token(next_before) if next_before else "",
        )

    @domain_errors
    async def CancelTask(
        self, request: tasks_pb2.CancelTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.Task:
        principal = await self.auth.operator(context, Scope.SUBMIT, runs=True)
        task_id = _task_id(request.task_id)
        if len(request.reason) > 1024:
            raise errors.InvalidArgument("must be at most 1024 characters", field="reason")
        await self._visible(principal, task_id)
        task = await self.engine.cancel_task(task_id, request.reason)
        log.info("cancel requested", task_id=task_id, by=str(principal))
        return convert.task_to_pb(task)

    @domain_errors
    async def ContinueTask(
        self, request: tasks_pb2.ContinueTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.Task:
        principal = await self.auth.operator(context, Scope.SUBMIT)
        task_id = _task_id(request.task_id)
        if not request.prompt.strip():
            raise errors.InvalidArgument("must not be empty", field="prompt")
        if len(request.prompt.encode()) > MAX_INPUT_BYTES:
            raise errors.InvalidArgument(
                f"is over the limit of {MAX_INPUT_BYTES} bytes", field="prompt"
            )
        task = await self.engine.continue_task(task_id, request.prompt)
        log.info("task continued by operator", task_id=task_id, by=str(principal))
        return convert.task_to_pb(task)

    async def FollowTask(
        self, request: tasks_pb2.FollowTaskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tasks_pb2.TaskUpdate]:
        caller = await self.auth.operator(context, Scope.READ, runs=True)
        try:
            task_id = _task_id(request.task_id)
            if caller.run is not None:
                await self._visible(caller, task_id)
        except errors.TaskRunError as exc:
            await context.abort(status_code(exc), str(exc))
        engine = self.engine
        sub = (
            engine.hub.subscribe(task_id, outcome_only=request.outcome_only)
            if request.follow
            else None
        )
        try:
            async for update in self._follow(task_id, request, sub, caller, context):
                yield update
        finally:
            if sub is not None:
                engine.hub.unsubscribe(sub)

    async def _follow(
        self,
        task_id: TaskId,
        request: tasks_pb2.FollowTaskRequest,
        sub: Subscription | None,
        caller: Caller,
        context: grpc.aio.ServicerContext,
        *,
        fresh: bool = False,
    ) -> AsyncIterator[tasks_pb2.TaskUpdate]:
        """The task's stored output and state, then (with `sub`) what is published for it.

        `fresh`: the task was just created with `sub` subscribed before its commit, so there
        is nothing stored to read: its first update is the task its commit published.
        `request.outcome_only`: no output is read or sent, and (with `sub`, subscribed for the
        outcome only) nothing until the task has ended.
        """
        store = self.engine.store
        outcome_only = request.outcome_only
        seen: dict[RunId, int] = {}
        runs: list[RunId] = []
        if not fresh:
            # Read after subscribing, from the store (never the engine's view, which may hold
            # a change still being committed): whatever commits later reaches the subscription.
            task = await store.get_task(task_id)
            if task is not None and not outcome_only:
                runs = [r.id for r in await store.list_runs(task_id)]
            if task is None:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND, f"task_id: no task {quoted(task_id)}"
                )
                return

        def keep(chunk: OutputChunk) -> bool:
            if chunk.seq <= seen.get(chunk.run_id, 0):
                return False
            if chunk.kind is OutputKind.EVENT and not request.include_events:
                seen[chunk.run_id] = chunk.seq
                return False
            seen[chunk.run_id] = chunk.seq
            return True

        async def stored() -> list[OutputChunk]:
            out: list[OutputChunk] = []
            if outcome_only:
                return out
            while True:
                batch = await store.read_output(runs, after=dict(seen), limit=OUTPUT_BATCH * 10)
                out.extend(c for c in batch if keep(c))
                if len(batch) < OUTPUT_BATCH * 10:
                    return out

        budget = self.engine.config.max_message_bytes

        def messages(
            t: Task | None, chunks: list[OutputChunk], *, opening: bool, ending: bool
        ) -> Iterator[tasks_pb2.TaskUpdate]:
            """`chunks` in updates that each fit the message budget, the state `t` with the last
            of them (after all of the output) and, when `opening`, with the first too (a
            replay's first update holds the task, however much output follows); the state goes
            alone where it does not fit beside the output. `ending` marks the last update."""
            shown = self._task_pb(t) if t is not None else None
            size = shown.ByteSize() if shown is not None else None
            parts = output_updates(chunks, size, budget, opening=opening)
            for i, (group, with_state) in enumerate(parts):
                update = tasks_pb2.TaskUpdate(task=shown if with_state else None)
                for c in group:
                    convert.chunk_to_pb(c, update.chunks.add())
                update.last = ending and i == len(parts) - 1
                yield update

        if not fresh:
            assert task is not None
            ending = sub is None or task.status.terminal
            if ending or not outcome_only:
                for update in messages(task, await stored(), opening=True, ending=ending):
                    yield update
            if ending:
                return
        assert sub is not None
        while True:
            try:
                items, lagged = await self.auth.until_revoked(caller, context, sub.wait())
            except errors.Unavailable as exc:  # the control plane stops: follow again
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            chunks: list[OutputChunk] = []
            latest: Task | None = None
            for item in items:
                if isinstance(item, Task):
                    latest = item
                    if item.current_run_id and item.current_run_id not in runs:
                        runs.append(item.current_run_id)
                elif item.run_id in runs or item.task_id == task_id:
                    if item.run_id not in runs:
                        runs.append(item.run_id)
                    if keep(item):
                        chunks.append(item)
            if lagged:
                latest = await store.get_task(task_id) or latest
                if not outcome_only:
                    runs = [r.id for r in await store.list_runs(task_id)]
                chunks = await stored()
            ending = latest is not None and latest.status.terminal
            if outcome_only and not ending:
                continue  # (a lagged follower read a task that has not ended yet)
            for update in messages(latest, chunks, opening=False, ending=ending):
                yield update
            if ending:
                return


def _run_pb(run: Run) -> pb.Run:
    message = pb.Run()
    convert.run_to_pb(run, message)
    return message


def _usage_row_pb(total: usage.UsageTotal) -> tasks_pb2.UsageRow:
    row = tasks_pb2.UsageRow(
        day=total.day,
        agent=total.agent,
        model=total.model,
        worker_id=total.worker_id,
        runs=total.runs,
    )
    convert.usage_to_pb(total.usage, row.usage)
    return row
