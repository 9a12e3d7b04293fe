"""Drives workflow runs from outside the engine, the way the scheduler drives schedules.

- A step's task is created through `Engine.create_tasks` with the idempotency key
  `wf:<run_id>:<step>:<attempt>`, and only then is the step recorded as RUNNING with its task. A
  crash in between leaves the step PENDING with its needs met; after the restart the executor
  creates it again and the key finds the same task, so no step runs twice.
- Task outcomes come from the engine's follow hub (which publishes only committed changes; one
  subscription per running step's task), plus a reconciliation scan of every RUNNING step at
  start (and after the store recovers). The event hub is left alone: a permanent subscriber
  there would make every commit copy its tasks.
- Waits and approval timeouts are absolute times stored in the step (`due_at`); one timer per
  due step is armed at load. When it fires, the step's end is committed once; a restart after
  that commit finds the step finished, a restart before it finds it still due.
- Every change of a run is committed with `engine.commit(ChangeSet(workflow_runs=[…]))`, in
  order with the engine's own changes, and is visible (to readers, the inbox and events) only
  once durable. Changes to one run are serialised by that run's lock.
- When a commit fails, the engine refuses writes and reloads; the executor then reloads its own
  view from the store too, once the engine accepts writes again.

Why one module: it is one state machine over workflow runs (start, advance, answer, cancel,
recover), and every method reads and writes the same committed view of them; definitions and
their checks live in core/workflow.py, the gRPC edge in service.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import jsonschema
import structlog

from taskrun.controlplane.engine import Engine
from taskrun.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TaskRunError,
    Unavailable,
)
from taskrun.core.ids import TaskId
from taskrun.core.models import Task, TaskSpec, utcnow
from taskrun.core.status import TaskStatus
from taskrun.core.store import ChangeSet
from taskrun.core.text import quoted
from taskrun.core.validation import clip_error, result_over_limit, validate_input
from taskrun.core.workflow import (
    InboxItem,
    Step,
    StepStatus,
    Workflow,
    WorkflowRun,
    WorkflowRunStatus,
    check_output,
    context_of,
    copy_run,
    evaluate,
    new_run,
    parse_definition,
    ready_steps,
    render,
    result_json,
    step_policy,
    task_key,
    truthy,
    wait_due,
)

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]
MAX_SLEEP = 60.0  # a timer re-checks at least this often (wall-clock jumps)

# Called with (run id, step name) after a step's task was created and before it is recorded;
# tests use it to stop the control plane exactly there.
AfterTaskCreated = Callable[[str, str], None]


def new_workflow_run_id() -> str:
    return f"wfr_{uuid.uuid4().hex[:20]}"


def new_inbox_item_id() -> str:
    return f"inb_{uuid.uuid4().hex[:20]}"


class WorkflowExecutor:
    def __init__(self, engine: Engine, *, clock: Clock = utcnow) -> None:
        self.engine = engine
        self.store = engine.store
        self.clock = clock
        self.runs: dict[str, WorkflowRun] = {}  # unfinished runs, as being changed
        # What readers see: each unfinished run as last committed (the live ones run ahead of
        # the store by the commit in flight, and nothing is visible before it is durable).
        self._visible: dict[str, WorkflowRun] = {}
        self.after_task_created: AfterTaskCreated | None = None
        self.on_inbox_item: Callable[[InboxItem], None] | None = None  # after it is durable
        self._workflows: dict[tuple[str, int], Workflow] = {}
        self._following: set[str] = set()  # task ids being watched
        self._locks: dict[str, asyncio.Lock] = {}
        self._timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._definitions = asyncio.Lock()
        self._starts = asyncio.Lock()
        self._closed = False
        self._stale = False  # a save failed: the live view is ahead of the store until reloaded

    # --- lifecycle ---------------------------------------------------------------------------

    async def load(self) -> None:
        """Read the unfinished runs (after the engine loaded its tasks) and reconcile them."""
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        self.runs = {r.id: r for r in await self.store.list_workflow_runs(unfinished=True)}
        self._visible = {r.id: copy_run(r) for r in self.runs.values()}
        for run in self.runs.values():
            await self._workflow(run.workflow, run.version)
        log.info("workflow runs loaded", unfinished=len(self.runs))

    def start(self) -> None:
        self.start_reconciling()

    async def stop(self) -> None:
        self._closed = True
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(BaseException):
                await task

    def _spawn(self, coro: Any) -> None:
        if self._closed:
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _follow(self, run_id: str, step: str, task_id: TaskId) -> None:
        """Watch a step's task through the engine's follow hub (which publishes only committed
        changes) until it ends. Subscribes at once, so no change after this call is missed."""
        if task_id in self._following or self._closed:
            return
        self._following.add(task_id)
        sub = self.engine.hub.subscribe(task_id, outcome_only=True)  # its output wakes nothing

        async def watch() -> None:
            try:
                pending = task_id not in self.engine.tasks  # ended before we subscribed
                while True:
                    if pending and not await self._task_changed(run_id, step, task_id):
                        return
                    items, lagged = await sub.wait()
                    pending = lagged or any(
                        isinstance(i, Task) and i.status.terminal for i in items
                    )
            finally:
                self.engine.hub.unsubscribe(sub)
                self._following.discard(task_id)

        self._spawn(watch())

    # --- definitions -------------------------------------------------------------------------

    async def _workflow(self, name: str, version: int) -> Workflow:
        found = self._workflows.get((name, version))
        if found is None:
            found = await self.store.get_workflow(name, version)
            if found is None:
                raise NotFound(f"no workflow {quoted(name)} version {version}", field="workflow")
            self._workflows[(name, version)] = found
        return found

    async def put_workflow(self, text: str) -> tuple[Workflow, bool]:
        """Validate and store a definition as the next version (unchanged: the same version,
        False)."""
        document = parse_definition(text)
        async with self._definitions:
            newest = await self.store.get_workflow(document["name"])
            if newest is not None and newest.definition == document:
                return newest, False
            workflow = Workflow(
                name=document["name"],
                version=(newest.version + 1) if newest else 1,
                definition=document,
                created_at=self.clock(),
                description=document.get("description", ""),
            )
            await self.engine.commit(ChangeSet(workflows=[workflow]))
            self._workflows[(workflow.name, workflow.version)] = workflow
        log.info("workflow stored", workflow=workflow.name, version=workflow.version)
        return workflow, True

    async def get_workflow(self, name: str, version: int = 0) -> Workflow:
        workflow = await self.store.get_workflow(name, version)
        if workflow is None:
            known = ", ".join(w.name for w in await self.store.list_workflows()) or "none"
            what = f"{quoted(name)} version {version}" if version else quoted(name)
            raise NotFound(f"no workflow {what} (workflows: {known})", field="name")
        return workflow

    # --- runs --------------------------------------------------------------------------------

    async def start_run(
        self, name: str, input: Any, *, version: int = 0, key: str = "", schedule: str = ""
    ) -> tuple[WorkflowRun, bool]:
        """Start a run (or return the one holding `key`, False).

        Starts are serialised, so two requests with one key never both reach the store (a
        refused duplicate would fence it and make the whole control plane reload)."""
        self._check_writable()
        async with self._starts:
            return await self._start_run(name, input, version, key, schedule)

    async def _start_run(
        self, name: str, input: Any, version: int, key: str, schedule: str
    ) -> tuple[WorkflowRun, bool]:
        if key:
            existing = await self.store.get_workflow_run_by_key(key)
            if existing is not None:
                if existing.workflow != name:
                    raise FailedPrecondition(
                        f"idempotency key {quoted(key)} belongs to a run of "
                        f"{quoted(existing.workflow)}",
                        field="idempotency_key",
                    )
                return existing, False
        workflow = await self.get_workflow(name, version)
        if not isinstance(input, dict):
            raise InvalidArgument("must be a JSON object", field="input_json")
        schema = workflow.definition.get("input_schema")
        if schema is not None:
            problem = check_output(schema, input)
            if problem:
                raise InvalidArgument(problem.replace("result", "input", 1), field="input_json")
        run = new_run(new_workflow_run_id(), workflow, input, self.clock(), key, schedule)
        self._workflows[(workflow.name, workflow.version)] = workflow
        committed = copy_run(run)
        await self.engine.commit(ChangeSet(workflow_runs=[committed]))
        self.runs[run.id] = run
        self._visible[run.id] = committed
        log.info("workflow run started", workflow_run_id=run.id, workflow=name, version=run.version)
        self._spawn(self._reconcile(run.id))
        return copy_run(run), True

    async def get_run(self, run_id: str) -> WorkflowRun:
        visible = self._visible.get(run_id)
        if visible is not None:
            return copy_run(visible)
        stored = await self.store.get_workflow_run(run_id)
        if stored is None:
            raise NotFound(f"no workflow run {quoted(run_id)}", field="id")
        return stored

    async def list_runs(
        self, workflow: str = "", limit: int = 100, before: tuple[datetime, str] | None = None
    ) -> list[WorkflowRun]:
        return await self.store.list_workflow_runs(workflow, limit=limit, before=before)

    def unfinished_of_schedule(self, schedule: str) -> list[tuple[str, str]]:
        """(run id, idempotency key) of the unfinished runs a schedule started, oldest first."""
        runs = [r for r in self._visible.values() if r.schedule == schedule]
        return [(r.id, r.idempotency_key) for r in sorted(runs, key=lambda r: r.created_at)]

    def inbox(self) -> list[InboxItem]:
        items = [
            item
            for run in self._visible.values()
            for step in run.steps.values()
            if (item := _inbox_item(run, step)) is not None
        ]
        return sorted(items, key=lambda i: (i.created_at, i.id))

    async def cancel_run(self, run_id: str, reason: str = "") -> WorkflowRun:
        self._check_writable()
        async with self._lock(run_id):
            self._check_writable()
            run = self.runs.get(run_id)
            if run is None:
                stored = await self.get_run(run_id)
                raise FailedPrecondition(
                    f"workflow run {run_id} is already {stored.status.name.lower()}", field="id"
                )
            message = f"cancelled: {reason}" if reason else "cancelled by an operator"
            for step in run.steps.values():
                if step.status is StepStatus.RUNNING and step.task_id:
                    with contextlib.suppress(FailedPrecondition, NotFound):
                        await self.engine.cancel_task(TaskId(step.task_id), reason or message)
            now = self.clock()
            for step in run.steps.values():
                if not step.status.finished:
                    step.status, step.finished_at = StepStatus.CANCELLED, now
                    step.error = message if step.started_at else ""
            self._finish(run, WorkflowRunStatus.CANCELLED, message)
            await self._save(run)
        log.info("workflow run cancelled", workflow_run_id=run_id)
        return copy_run(run)

    async def answer(
        self, item_id: str, *, approve: bool, choice: str = "", comment: str = "", by: str = ""
    ) -> WorkflowRun:
        """Answer an inbox item: approve (with one of its choices, when it has some) or reject."""
        found = next((i for i in self.inbox() if i.id == item_id), None)
        if found is None:
            raise NotFound(f"no open inbox item {quoted(item_id)}", field="id")
        self._check_writable()
        async with self._lock(found.run_id):
            self._check_writable()
            run = self.runs.get(found.run_id)
            step = run.steps[found.step] if run is not None else None
            if run is None or step is None or step.status is not StepStatus.WAITING:
                why = "its workflow run ended"
                if step is not None and step.branch:
                    why = f"it was decided meanwhile ({step.branch})"
                raise FailedPrecondition(f"inbox item {item_id} is closed: {why}", field="id")
            if approve:
                if step.choices and not choice:
                    raise InvalidArgument(
                        f"choose one of: {', '.join(step.choices)}", field="choice"
                    )
                if choice and choice not in step.choices:
                    valid = ", ".join(step.choices) or "none (this approval has no choices)"
                    raise InvalidArgument(
                        f"{quoted(choice)} is not a choice (valid: {valid})", field="choice"
                    )
            elif choice:
                raise InvalidArgument("a rejection takes no choice", field="choice")
            decision = "approved" if approve else "rejected"
            step.comment, step.answered_by = comment, by
            await self._decide(run, step, decision, choice)
            await self._advance(run)
        log.info(
            "inbox item answered",
            inbox_item_id=item_id,
            workflow_run_id=run.id,
            step=step.name,
            decision=decision,
        )
        return copy_run(run)

    # --- advancing ---------------------------------------------------------------------------

    @property
    def recovering(self) -> bool:
        """A save failed and the runs are not reloaded from the store yet (writes refused)."""
        return self._stale

    def _check_writable(self) -> None:
        if self._stale or self.engine.store_error:
            raise Unavailable(
                self.engine.store_error
                or "the control plane is reloading its workflow runs after a failed write"
            )

    def _lock(self, run_id: str) -> asyncio.Lock:
        return self._locks.setdefault(run_id, asyncio.Lock())

    async def _save(self, run: WorkflowRun) -> None:
        run.updated_at = self.clock()
        committed = copy_run(run)
        try:
            await self.engine.commit(ChangeSet(workflow_runs=[committed]))
        except Unavailable:
            if not self._stale:
                self._stale = True
                self._spawn(self._reload_after_recovery())
            raise
        self._visible[run.id] = committed
        if run.status.finished:
            self.runs.pop(run.id, None)
            self._visible.pop(run.id, None)
            # every path checks the run is still unfinished after taking its lock, so a
            # waiter on this lock, or a new one, finds it gone and does nothing
            self._locks.pop(run.id, None)
            for step in run.steps.values():
                handle = self._timers.pop((run.id, step.name), None)
                if handle is not None:
                    handle.cancel()

    async def _reload_after_recovery(self) -> None:
        """The executor's view may be ahead of the store: reload it once the engine writes."""
        # the engine offers no event for its recovery (its on_health belongs to the app)
        while True:
            while self.engine.store_error:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            try:
                await self.load()
                break
            except Exception as exc:
                log.warning("workflow runs not reloaded yet; retrying", error=str(exc))
                await asyncio.sleep(0.5)
        self._stale = False
        log.info("workflow runs reloaded from the store", unfinished=len(self.runs))
        self.start_reconciling()

    def start_reconciling(self) -> None:
        for run_id in list(self.runs):
            self._spawn(self._reconcile(run_id))

    async def _reconcile(self, run_id: str) -> None:
        """Bring one run up to date: outcomes of its tasks, due timers, steps ready to start."""
        try:
            async with self._lock(run_id):
                run = self.runs.get(run_id)
                if run is None or self._stale:
                    return  # stale: the reload reconciles every run again
                for step in list(run.steps.values()):
                    if step.status is StepStatus.RUNNING and step.task_id:
                        self._follow(run.id, step.name, TaskId(step.task_id))
                        task = self.engine.tasks.get(TaskId(step.task_id))
                        if task is None:
                            task = await self.store.get_task(TaskId(step.task_id))
                        if task is not None and task.status.terminal:
                            await self._task_finished(run, step, task)
                    elif step.status is StepStatus.WAITING:
                        self._arm(run, step)
                        item = _inbox_item(run, step)
                        if item is not None and self.on_inbox_item is not None:
                            self.on_inbox_item(item)  # again: a crash may have cut the first
                    if run.status.finished:
                        return
                await self._advance(run)
        except Unavailable as exc:
            log.warning("workflow run not advanced; retried after recovery", error=str(exc))
        except Exception:
            log.exception("workflow run could not be advanced", workflow_run_id=run_id)

    async def _task_changed(self, run_id: str, step_name: str, task_id: TaskId) -> bool:
        """Record the outcome of a step's task if it ended; whether it is still to be watched."""
        try:
            async with self._lock(run_id):
                run = self.runs.get(run_id)
                if run is None or self._stale:
                    return False  # stale: the reload reconciles (and follows) it again
                step = run.steps[step_name]
                if step.status is not StepStatus.RUNNING or step.task_id != task_id:
                    return False
                task = await self.store.get_task(task_id)
                if task is None or not task.status.terminal:
                    return True
                await self._task_finished(run, step, task)
                if not run.status.finished:
                    await self._advance(run)
                return False
        except Unavailable as exc:
            log.warning("workflow step outcome not recorded yet", error=str(exc))
            return False  # the reload after recovery reconciles it
        except Exception:
            log.exception("workflow step outcome could not be recorded", workflow_run_id=run_id)
            return False

    async def _task_finished(self, run: WorkflowRun, step: Step, task: Task) -> None:
        workflow = await self._workflow(run.workflow, run.version)
        spec = workflow.steps[step.name]
        now = self.clock()
        step.finished_at = now
        if task.status is TaskStatus.COMPLETED:
            result = _parse_result(task.result)
            problem = ""
            if "json_field" in spec:
                try:
                    result = result_json(result, spec["json_field"])
                except ValueError as exc:
                    problem = str(exc)
            if not problem and "output_schema" in spec:
                problem = check_output(spec["output_schema"], result)
                problem = f"output schema: {problem}" if problem else ""
            step.result = result
            if problem:
                step.status, step.error = StepStatus.FAILED, problem
            else:
                step.status = StepStatus.COMPLETED
        else:
            step.status = StepStatus.FAILED
            what = "was cancelled" if task.status is TaskStatus.CANCELLED else "failed"
            step.error = f"task {task.id} {what}: {task.error}" if task.error else f"task {what}"
        if step.status is StepStatus.FAILED:
            self._fail(run, step)
        await self._save(run)
        log.info(
            "workflow step finished",
            workflow_run_id=run.id,
            step=step.name,
            task_id=task.id,
            status=step.status.name.lower(),
        )

    def _fail(self, run: WorkflowRun, step: Step) -> None:
        now = self.clock()
        for other in run.steps.values():
            if not other.status.finished and other.status is not StepStatus.RUNNING:
                other.status, other.finished_at = StepStatus.CANCELLED, now
        self._finish(run, WorkflowRunStatus.FAILED, f"step {quoted(step.name)}: {step.error}")
        for other in run.steps.values():
            if other.status is StepStatus.RUNNING and other.task_id:
                self._spawn(self._cancel_quietly(other.task_id, f"workflow run {run.id} failed"))
                other.status, other.finished_at = StepStatus.CANCELLED, now

    async def _cancel_quietly(self, task_id: str, reason: str) -> None:
        with contextlib.suppress(TaskRunError):
            await self.engine.cancel_task(TaskId(task_id), reason)

    def _finish(self, run: WorkflowRun, status: WorkflowRunStatus, error: str = "") -> None:
        run.status, run.error = status, error
        run.finished_at = self.clock()

    async def _advance(self, run: WorkflowRun) -> None:
        """Start every ready step; skip those on branches not taken; finish the run when every
        step is finished. Loops until nothing changes (a condition decides at once)."""
        workflow = await self._workflow(run.workflow, run.version)
        while not run.status.finished:
            start, skip = ready_steps(workflow, run)
            if not start and not skip:
                break
            now = self.clock()
            for name in skip:
                step = run.steps[name]
                step.status, step.finished_at = StepStatus.SKIPPED, now
            for name in start:
                await self._start_step(workflow, run, run.steps[name])
                if run.status.finished:
                    break
            await self._save(run)
        if not run.status.finished and all(s.status.finished for s in run.steps.values()):
            self._finish(run, WorkflowRunStatus.COMPLETED)
            await self._save(run)
            log.info("workflow run completed", workflow_run_id=run.id)

    async def _start_step(self, workflow: Workflow, run: WorkflowRun, step: Step) -> None:
        spec = workflow.steps[step.name]
        now = self.clock()
        step.started_at = step.started_at or now
        context = context_of(run)
        try:
            if step.kind == "task":
                await self._start_task(run, step, spec, context)
            elif step.kind == "condition":
                value = evaluate(spec["expression"], context)
                # kept with the run and sent with it, like a task's result: bounded alike
                if over := result_over_limit(json.dumps(value), "value"):
                    raise ValueError(over)
                step.result = value
                step.branch = "then" if truthy(value) else "else"
                step.status, step.finished_at = StepStatus.COMPLETED, now
            elif step.kind == "wait":
                step.due_at = wait_due(spec, now)
                step.status = StepStatus.WAITING
                self._after_save(run, step)
            elif step.kind == "approval":
                question = render(spec["question"], context)
                text = question if isinstance(question, str) else json.dumps(question)
                step.question = clip_error(text)  # for a person: its start and its length
                step.choices = list(spec.get("choices", []))
                step.inbox_item_id = new_inbox_item_id()
                if "timeout" in spec:
                    step.due_at = wait_due({"duration": spec["timeout"]}, now)
                step.status = StepStatus.WAITING
                self._after_save(run, step)
        except (jsonschema.ValidationError, TaskRunError, ValueError, TypeError) as exc:
            step.status, step.finished_at = StepStatus.FAILED, now
            step.error = str(exc)
            self._fail(run, step)
        log.info(
            "workflow step started",
            workflow_run_id=run.id,
            step=step.name,
            kind=step.kind,
            status=step.status.name.lower(),
            task_id=step.task_id or None,
        )

    def _after_save(self, run: WorkflowRun, step: Step) -> None:
        """Arm the step's timer and announce its inbox item once the run is saved."""

        async def later() -> None:
            async with self._lock(run.id):  # held by whoever is saving the run
                committed = self._visible.get(run.id)
                saved = committed.steps[step.name] if committed is not None else None
                if saved is None or saved.status is not StepStatus.WAITING:
                    return  # the save failed (the reload re-arms), or it ended meanwhile
                live = self.runs.get(run.id)
                if live is not None:
                    self._arm(live, live.steps[step.name])
                item = _inbox_item(committed, saved) if committed is not None else None
                if item is not None and self.on_inbox_item is not None:
                    self.on_inbox_item(item)

        self._spawn(later())

    async def _start_task(
        self, run: WorkflowRun, step: Step, spec: dict[str, Any], context: dict[str, Any]
    ) -> None:
        rendered = render(spec.get("input", {}), context)
        text = json.dumps(rendered)
        validate_input(text, f"steps.{step.name}.input")
        policy = step_policy(
            spec, self.engine.config.default_max_attempts, f"steps.{step.name}.policy"
        )
        step.attempt = step.attempt or 1
        policy.idempotency_key = task_key(run.id, step.name, step.attempt)
        labels = {"workflow": run.workflow, "workflow_run": run.id, "step": step.name}
        labels.update(spec.get("labels", {}))
        task_spec = TaskSpec(agent=spec["agent"], input=text, labels=labels, policy=policy)
        [(task, created)] = await self.engine.create_tasks([task_spec])
        if self.after_task_created is not None:
            self.after_task_created(run.id, step.name)
        step.task_id = task.id
        step.status = StepStatus.RUNNING
        log.info(
            "workflow step task",
            workflow_run_id=run.id,
            step=step.name,
            task_id=task.id,
            created=created,
        )
        # once the step is saved (the caller holds the run's lock until then)
        self._follow(run.id, step.name, task.id)

    # --- timers ------------------------------------------------------------------------------

    def _arm(self, run: WorkflowRun, step: Step) -> None:
        if step.due_at is None or self._closed:
            return
        key = (run.id, step.name)
        old = self._timers.pop(key, None)
        if old is not None:
            old.cancel()
        delay = min(max(0.0, (step.due_at - self.clock()).total_seconds()), MAX_SLEEP)
        self._timers[key] = asyncio.get_running_loop().call_later(
            delay, lambda: self._spawn(self._due(run.id, step.name))
        )

    async def _due(self, run_id: str, step_name: str) -> None:
        try:
            async with self._lock(run_id):
                self._timers.pop((run_id, step_name), None)
                run = self.runs.get(run_id)
                if run is None or self._stale:
                    return  # stale: the reload re-arms it
                step = run.steps[step_name]
                if step.status is not StepStatus.WAITING or step.due_at is None:
                    return
                if step.due_at > self.clock():
                    self._arm(run, step)  # woke early (the sleep is capped)
                    return
                if step.kind == "wait":
                    step.status, step.finished_at = StepStatus.COMPLETED, self.clock()
                    step.result = {"fired_at": step.finished_at.isoformat()}
                    await self._save(run)
                else:
                    await self._decide(run, step, "timeout", "")
                log.info("workflow timer fired", workflow_run_id=run_id, step=step_name)
                await self._advance(run)
        except Unavailable as exc:
            log.warning("workflow timer not recorded; retried after recovery", error=str(exc))
        except Exception:
            log.exception("workflow timer failed", workflow_run_id=run_id, step=step_name)

    async def _decide(self, run: WorkflowRun, step: Step, decision: str, choice: str) -> None:
        """Record an approval's outcome; an outcome without a branch to take fails the run
        (a rejection, a timeout), except an approval, which goes on."""
        workflow = await self._workflow(run.workflow, run.version)
        spec = workflow.steps[step.name]
        branches = spec.get("branches", {})
        now = self.clock()
        step.result = {"decision": decision, "choice": choice, "comment": step.comment}
        step.finished_at = now
        branch = choice if choice in branches else decision
        step.branch = branch
        handle = self._timers.pop((run.id, step.name), None)
        if handle is not None:
            handle.cancel()
        if decision in ("rejected", "timeout") and branch not in branches:
            step.status = StepStatus.FAILED
            step.error = (
                f"rejected{' by ' + step.answered_by if step.answered_by else ''}"
                f"{': ' + step.comment if step.comment else ''}"
                if decision == "rejected"
                else "no answer before the timeout"
            )
            self._fail(run, step)
        else:
            step.status = StepStatus.COMPLETED
        await self._save(run)


def _inbox_item(run: WorkflowRun, step: Step) -> InboxItem | None:
    if step.kind != "approval" or step.status is not StepStatus.WAITING:
        return None
    return InboxItem(
        id=step.inbox_item_id,
        run_id=run.id,
        workflow=run.workflow,
        step=step.name,
        question=step.question,
        choices=tuple(step.choices),
        created_at=step.started_at or run.created_at,
        due_at=step.due_at,
    )


def _parse_result(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
