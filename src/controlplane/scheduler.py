"""The scheduler: turns schedules into tasks, inside the control plane.

One timer is armed for the earliest next fire time of all schedules (a heap), so idle schedules
cost nothing. When it goes off, every due schedule fires once: its task is created through
`Engine.create_tasks` with the idempotency key `schedule:<name>:<occurrence>`, and only then is
the occurrence recorded on the schedule. A crash in between leaves the occurrence due; after the
restart it fires again and finds its task by the key, so no occurrence ever creates two tasks.

Misfires (fire times that passed while the control plane was not running, or longer than
`misfire_grace` ago) never cause a burst: only the latest missed occurrence may run, and only under
MisfirePolicy.RUN_ONCE. Overlap (the schedule's previous task is unfinished) follows the
schedule's OverlapPolicy. Pause, resume, update and delete take effect for the next occurrence at
once. All changes are serialised by one lock, and each is durable before it is visible.

Why one module: one job (turn schedules into tasks or workflow runs); the rules of schedules
themselves live in core/schedule.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

import structlog

from taskrun.controlplane.engine import Engine
from taskrun.controlplane.workflows.executor import WorkflowExecutor
from taskrun.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from taskrun.core.ids import TaskId
from taskrun.core.models import Task, TaskSpec, utcnow
from taskrun.core.schedule import (
    MisfirePolicy,
    OverlapPolicy,
    Rule,
    Schedule,
    compile_schedule,
    copy_schedule,
    format_utc,
    occurrence_key,
    validate_schedule,
    validate_schedule_name,
)
from taskrun.core.store import ChangeSet
from taskrun.core.text import quoted

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]

# Fields a user may change with `update` (model attribute names).
USER_FIELDS = frozenset(
    {"agent", "input", "labels", "policy", "cron", "rrule", "timezone", "misfire", "overlap"}
)
DEFAULT_MISFIRE_GRACE = 60.0
RETRY_DELAY = 1.0  # after a failed round (the store refused a write), try again this much later


@dataclass(slots=True)
class _Firing:
    """What one due schedule does in a round, decided before anything is written."""

    schedule: Schedule
    occurrence: datetime
    next_time: datetime | None
    late: bool
    superseded: bool  # earlier occurrences also passed and are not run
    outcome: str = ""
    spec: TaskSpec | None = None
    cancel: list[TaskId] = field(default_factory=list)
    start_workflow: bool = False  # start a run of the schedule's workflow
    cancel_runs: list[str] = field(default_factory=list)  # its unfinished earlier runs


class Scheduler:
    """Fires schedules at their occurrences and is how they are created, changed and read."""

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Clock = utcnow,
        misfire_grace: float = DEFAULT_MISFIRE_GRACE,
        timer: bool = True,
        max_sleep: float = 60.0,
    ) -> None:
        """`timer=False` leaves firing to explicit `run_due()` calls (tests with a fake clock).

        The timer never sleeps longer than `max_sleep`, so a jump of the wall clock delays a
        fire time by at most that much.
        """
        self.engine = engine
        self.store = engine.store
        self.clock = clock
        self.misfire_grace = timedelta(seconds=misfire_grace)
        self._use_timer = timer
        self._max_sleep = max_sleep
        self._schedules: dict[str, Schedule] = {}
        self._rules: dict[str, Rule] = {}
        self._active: dict[str, list[TaskId]] = {}  # tasks each created that may be unfinished
        self._heap: list[tuple[datetime, int, str]] = []  # (next fire time, entry, name)
        self._entries: dict[str, int] = {}  # name -> its current heap entry; others are stale
        self._seq = 0
        self._lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._tick: asyncio.Task[None] | None = None
        self._retry_at: datetime | None = None
        self._started = False
        self._closed = False
        self.workflows: WorkflowExecutor | None = None  # set by the app

    # --- lifecycle ---------------------------------------------------------------------------

    async def load(self) -> None:
        """Read the schedules (after the engine has loaded its tasks); `start` arms the timer.

        Occurrences that passed while the control plane was down are due at once and go
        through the misfire policy on the first round.
        """
        now = self.clock()
        for schedule in await self.store.list_schedules():
            self._schedules[schedule.name] = schedule
            try:
                self._rules[schedule.name] = compile_schedule(schedule)
            except InvalidArgument as exc:  # e.g. a zone missing from this machine's tz data
                log.error(
                    "schedule cannot be read; it will not fire", name=schedule.name, error=str(exc)
                )
                continue
            self._push(schedule)
        for task in self.engine.tasks.values():
            if task.schedule in self._schedules:
                self._active.setdefault(task.schedule, []).append(task.id)
        log.info(
            "schedules loaded",
            schedules=len(self._schedules),
            due_now=sum(1 for t, _, _ in self._heap if t <= now),
        )

    def start(self) -> None:
        """Start firing (a loaded scheduler already serves reads and changes)."""
        self._started = True
        self._arm()

    async def stop(self) -> None:
        """Stop firing; wait for a round or a change in progress to finish."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._tick is not None:
            with contextlib.suppress(Exception):
                await self._tick
        async with self._lock:
            pass

    # --- reads -------------------------------------------------------------------------------

    def get(self, name: str, field: str = "name") -> Schedule:
        """A copy of the schedule; NotFound naming `field` when there is none."""
        return copy_schedule(self._get(name, field))

    def list_schedules(self) -> list[Schedule]:
        """Copies of every schedule, ordered by name."""
        return [copy_schedule(self._schedules[n]) for n in sorted(self._schedules)]

    def rule(self, name: str, field: str = "name") -> Rule:
        schedule = self._get(name, field)
        rule = self._rules.get(schedule.name)
        if rule is None:
            raise FailedPrecondition(
                f"schedule {quoted(name)} cannot be read on this server", field=field
            )
        return rule

    def _get(self, name: str, field: str) -> Schedule:
        validate_schedule_name(name, field)
        schedule = self._schedules.get(name)
        if schedule is None:
            raise NotFound(f"no schedule {quoted(name)}", field=field)
        return schedule

    # --- changes -----------------------------------------------------------------------------

    async def create(self, submitted: Schedule, prefix: str = "") -> Schedule:
        """Validate and store a new schedule; it fires from its first occurrence after now."""
        async with self._lock:
            now = self.clock()
            schedule = validate_schedule(submitted, now, prefix)
            if schedule.workflow:
                await self._check_workflow(schedule.workflow, f"{prefix}workflow")
            else:
                self._check_agent(schedule.agent, f"{prefix}agent")
                self._check_input(schedule, f"{prefix}input_json")
            if schedule.name in self._schedules:
                raise AlreadyExists(
                    f"schedule {quoted(schedule.name)} exists", field=f"{prefix}name"
                )
            rule = compile_schedule(schedule)
            schedule = replace(
                schedule,
                created_at=now,
                updated_at=now,
                last_fire_time=None,
                last_task_id=None,
                last_outcome="",
                next_fire_time=None if schedule.paused else rule.next_after(now),
            )
            await self.store.submit(ChangeSet(schedules=[copy_schedule(schedule)]))
            self._schedules[schedule.name] = schedule
            self._rules[schedule.name] = rule
            self._push(schedule)
            self._arm()
            log.info(
                "schedule created",
                name=schedule.name,
                agent=schedule.agent,
                rule=schedule.cron or schedule.rrule,
                timezone=schedule.timezone,
                next_fire_time=_when(schedule.next_fire_time),
            )
            return copy_schedule(schedule)

    async def update(
        self, submitted: Schedule, fields: Collection[str] = USER_FIELDS, prefix: str = ""
    ) -> Schedule:
        """Change the named user fields (model attribute names) of `submitted.name`'s schedule.

        The next occurrence is computed again from now; the firing history is kept.
        """
        unknown = set(fields) - USER_FIELDS
        if unknown:
            raise InvalidArgument(
                f"cannot update {', '.join(sorted(unknown))}", field="update_mask"
            )
        async with self._lock:
            now = self.clock()
            current = self._get(submitted.name, f"{prefix}name")
            changes = {f: getattr(submitted, f) for f in fields or USER_FIELDS}
            if "cron" in changes and "rrule" not in changes and changes["cron"]:
                changes["rrule"] = ""
            if "rrule" in changes and "cron" not in changes and changes["rrule"]:
                changes["cron"] = ""
            merged = replace(copy_schedule(current), **changes)
            schedule = validate_schedule(merged, now, prefix)
            if schedule.workflow:
                pass  # its workflow exists (workflows are never deleted)
            elif schedule.agent != current.agent:
                self._check_agent(schedule.agent, f"{prefix}agent")
            if not schedule.workflow and (
                schedule.agent != current.agent or schedule.input != current.input
            ):
                self._check_input(schedule, f"{prefix}input_json")
            rule = compile_schedule(schedule)
            schedule.updated_at = now
            schedule.next_fire_time = None if schedule.paused else rule.next_after(now)
            await self._replace(schedule, rule)
            log.info("schedule updated", name=schedule.name, fields=sorted(changes))
            return copy_schedule(schedule)

    async def pause(self, name: str) -> Schedule:
        async with self._lock:
            schedule = copy_schedule(self._get(name, "name"))
            if not schedule.paused:
                schedule.paused = True
                schedule.next_fire_time = None
                schedule.updated_at = self.clock()
                await self._replace(schedule, self._rules.get(name))
                log.info("schedule paused", name=name)
            return copy_schedule(schedule)

    async def resume(self, name: str) -> Schedule:
        """Fire again from the next occurrence after now (the paused ones are not caught up)."""
        async with self._lock:
            schedule = copy_schedule(self._get(name, "name"))
            if schedule.paused:
                rule = self.rule(name)
                now = self.clock()
                schedule.paused = False
                schedule.next_fire_time = rule.next_after(now)
                schedule.updated_at = now
                await self._replace(schedule, rule)
                log.info(
                    "schedule resumed", name=name, next_fire_time=_when(schedule.next_fire_time)
                )
            return copy_schedule(schedule)

    async def delete(self, name: str) -> None:
        """Forget the schedule; tasks it created are left alone."""
        async with self._lock:
            self._get(name, "name")
            await self.store.submit(ChangeSet(deleted_schedules=[name]))
            del self._schedules[name]
            self._rules.pop(name, None)
            self._active.pop(name, None)
            self._entries.pop(name, None)
            self._arm()
            log.info("schedule deleted", name=name)

    async def trigger(self, name: str) -> tuple[Schedule, Task]:
        """Create one task now, outside the rhythm; the overlap policy does not apply."""
        async with self._lock:
            current = self._get(name, "name")
            if current.workflow:
                raise FailedPrecondition(
                    f"schedule {quoted(name)} starts workflow {quoted(current.workflow)}: start "
                    f"a run now with `taskrun workflow run {current.workflow}`",
                    field="name",
                )
            now = self.clock()
            self._check_input(current, "input_json")
            ((task, _),) = await self.engine.create_tasks([self._spec(current, None)])
            schedule = copy_schedule(current)
            schedule.last_fire_time = now
            schedule.last_task_id = task.id
            schedule.last_outcome = f"triggered: created task {task.id}"
            await self._replace(schedule, self._rules.get(name))
            self._active.setdefault(name, []).append(task.id)
            log.info("schedule triggered", name=name, task_id=task.id)
            return copy_schedule(schedule), task

    async def _replace(self, schedule: Schedule, rule: Rule | None) -> None:
        """Store `schedule` (a copy), then make it the live one and re-arm."""
        await self.store.submit(ChangeSet(schedules=[copy_schedule(schedule)]))
        self._schedules[schedule.name] = schedule
        if rule is not None:
            self._rules[schedule.name] = rule
        self._push(schedule)
        self._arm()

    async def _check_workflow(self, name: str, field: str) -> None:
        if self.workflows is None:
            raise FailedPrecondition("this control plane runs no workflows", field=field)
        try:
            await self.workflows.get_workflow(name)
        except NotFound as exc:
            raise InvalidArgument(exc.message, field=field) from None

    def _check_agent(self, agent: str, field: str) -> None:
        for worker in self.engine.workers.values():
            if any(a.name == agent for a in worker.agents):
                return
        known = ", ".join(repr(name) for name in self.engine.catalog.names()) or "none yet"
        raise InvalidArgument(
            f"no worker has announced an agent {quoted(agent)} (known agents: {known}); start a "
            "worker that offers it first (see `taskrun workers list`)",
            field=field,
        )

    def _check_input(self, schedule: Schedule, field: str) -> None:
        """The input must match the agent's announced input schema, as for `task create`."""
        self.engine.catalog.check_input_text(schedule.agent, schedule.input, field)

    # --- firing ------------------------------------------------------------------------------

    async def run_due(self) -> int:
        """Fire every schedule whose next fire time has come; return how many came due."""
        async with self._lock:
            now = self.clock()
            due = self._pop_due(now)
            if not due:
                return 0
            try:
                await self._fire(due, now)
            except BaseException:
                for schedule in due:  # still due: the next round tries again
                    if self._schedules.get(schedule.name) is schedule:
                        self._push(schedule)
                self._retry_at = now + timedelta(seconds=RETRY_DELAY)
                raise
            self._retry_at = None
            return len(due)

    def _pop_due(self, now: datetime) -> list[Schedule]:
        due: list[Schedule] = []
        while self._heap and self._heap[0][0] <= now:
            when, entry, name = heapq.heappop(self._heap)
            if self._entries.get(name) != entry:
                continue  # replaced by a later change
            del self._entries[name]
            schedule = self._schedules[name]
            if not schedule.paused and schedule.next_fire_time == when and name in self._rules:
                due.append(schedule)
        return due

    async def _fire(self, due: list[Schedule], now: datetime) -> None:
        firings = [self._plan(schedule, now) for schedule in due]
        for firing in firings:
            reason = (
                f"replaced by the occurrence at {format_utc(firing.occurrence)} of schedule "
                f"{firing.schedule.name} (overlap policy cancel_previous)"
            )
            for task_id in firing.cancel:
                with contextlib.suppress(NotFound, FailedPrecondition):  # it ended meanwhile
                    await self.engine.cancel_task(task_id, reason)
            for run_id in firing.cancel_runs:
                assert self.workflows is not None
                with contextlib.suppress(NotFound, FailedPrecondition):  # it ended meanwhile
                    await self.workflows.cancel_run(run_id, reason)
        specs = [f.spec for f in firings if f.spec is not None]
        results = iter(await self.engine.create_tasks(specs) if specs else [])
        changed: list[Schedule] = []
        for firing in firings:
            schedule = firing.schedule
            if firing.spec is not None:
                task, created = next(results)
                schedule.last_task_id = task.id
                if created:
                    self._active.setdefault(schedule.name, []).append(task.id)
                firing.outcome = self._created_outcome(firing, task.id, created)
            if firing.start_workflow:
                firing.outcome = await self._start_workflow(firing)
            if firing.next_time is None:
                firing.outcome += "; the rule has no further occurrence"
            schedule.last_fire_time = firing.occurrence
            schedule.last_outcome = firing.outcome
            schedule.next_fire_time = firing.next_time
            changed.append(copy_schedule(schedule))
            self._push(schedule)
            log.info(
                "schedule fired",
                name=schedule.name,
                occurrence=format_utc(firing.occurrence),
                outcome=firing.outcome,
                next_fire_time=_when(firing.next_time),
            )
        await self.store.submit(ChangeSet(schedules=changed))

    def _plan(self, schedule: Schedule, now: datetime) -> _Firing:
        """Decide what a due schedule does now; nothing is written yet."""
        rule = self._rules[schedule.name]
        assert schedule.next_fire_time is not None
        occurrence = rule.latest_due(schedule.next_fire_time, now) or schedule.next_fire_time
        next_time = rule.next_after(now)
        firing = _Firing(
            schedule,
            occurrence,
            next_time,
            late=now - occurrence > self.misfire_grace,
            superseded=occurrence != schedule.next_fire_time,
        )
        if firing.late and schedule.misfire is MisfirePolicy.SKIP:
            firing.outcome = (
                f"missed: the control plane was not running at {format_utc(occurrence)} "
                "(misfire policy skip)"
            )
            return firing
        key = occurrence_key(schedule.name, occurrence)
        if schedule.workflow:
            return self._plan_workflow(firing, key)
        unfinished = [  # this occurrence's own task (made before a crash) does not overlap it
            t for t in self._unfinished(schedule.name) if self._key_of(t) != key
        ]
        if unfinished and schedule.overlap is OverlapPolicy.SKIP:
            firing.outcome = f"skipped: previous task still running ({unfinished[-1]})"
            return firing
        try:  # the agent may have announced a new schema since the schedule was made
            self._check_input(schedule, "input_json")
        except InvalidArgument as exc:
            firing.outcome = f"skipped: {exc.message}"
            return firing
        if unfinished and schedule.overlap is OverlapPolicy.CANCEL_PREVIOUS:
            firing.cancel = unfinished
        firing.spec = self._spec(schedule, occurrence)
        return firing

    def _plan_workflow(self, firing: _Firing, key: str) -> _Firing:
        """A workflow schedule's occurrence: overlap is about its unfinished earlier runs."""
        schedule = firing.schedule
        running = (
            [r for r, k in self.workflows.unfinished_of_schedule(schedule.name) if k != key]
            if self.workflows is not None
            else []
        )
        if running and schedule.overlap is OverlapPolicy.SKIP:
            firing.outcome = f"skipped: previous workflow run still running ({running[-1]})"
            return firing
        if running and schedule.overlap is OverlapPolicy.CANCEL_PREVIOUS:
            firing.cancel_runs = running
        firing.start_workflow = True
        return firing

    async def _start_workflow(self, firing: _Firing) -> str:
        schedule = firing.schedule
        if self.workflows is None:
            return "skipped: this control plane runs no workflows"
        key = occurrence_key(schedule.name, firing.occurrence)
        try:
            run, created = await self.workflows.start_run(
                schedule.workflow, json.loads(schedule.input), key=key, schedule=schedule.name
            )
        except (InvalidArgument, NotFound, FailedPrecondition) as exc:
            return f"skipped: {exc}"
        parts = [
            f"started workflow run {run.id}"
            if created
            else f"workflow run {run.id} already existed for this occurrence"
        ]
        if firing.cancel_runs:
            parts.append(f"cancelled previous {', '.join(firing.cancel_runs)}")
        if firing.late:
            parts.append("ran late (misfire policy run_once)")
        if firing.superseded:
            parts.append("earlier missed occurrences were not run")
        return "; ".join(parts)

    @staticmethod
    def _created_outcome(firing: _Firing, task_id: TaskId, created: bool) -> str:
        parts = [
            f"created task {task_id}"
            if created
            else f"task {task_id} already existed for this occurrence"
        ]
        if firing.cancel:
            parts.append(f"cancelled previous {', '.join(firing.cancel)}")
        if firing.late:
            parts.append(
                "ran late: the control plane was not running at the fire time "
                "(misfire policy run_once)"
            )
        if firing.superseded:
            parts.append("earlier missed occurrences were not run")
        return "; ".join(parts)

    def _unfinished(self, name: str) -> list[TaskId]:
        ids = self._active.get(name)
        if not ids:
            return []
        alive = [t for t in ids if t in self.engine.tasks]
        if alive:
            self._active[name] = alive
        else:
            del self._active[name]
        return alive

    def _key_of(self, task_id: TaskId) -> str:
        task = self.engine.tasks.get(task_id)
        return task.policy.idempotency_key if task is not None else ""

    @staticmethod
    def _spec(schedule: Schedule, occurrence: datetime | None) -> TaskSpec:
        policy = replace(
            schedule.policy.copy(),
            idempotency_key=occurrence_key(schedule.name, occurrence) if occurrence else "",
        )
        return TaskSpec(
            agent=schedule.agent,
            input=schedule.input,
            labels=dict(schedule.labels),
            policy=policy,
            schedule=schedule.name,
        )

    # --- the timer ---------------------------------------------------------------------------

    def _push(self, schedule: Schedule) -> None:
        """(Re)place the schedule's heap entry at its next fire time, if it has one."""
        self._entries.pop(schedule.name, None)
        if schedule.paused or schedule.next_fire_time is None:
            return
        self._seq += 1
        self._entries[schedule.name] = self._seq
        heapq.heappush(self._heap, (schedule.next_fire_time, self._seq, schedule.name))
        if len(self._heap) > 2 * len(self._entries) + 64:  # drop stale entries now and then
            self._heap = [e for e in self._heap if self._entries.get(e[2]) == e[1]]
            heapq.heapify(self._heap)

    def _earliest(self) -> datetime | None:
        while self._heap and self._entries.get(self._heap[0][2]) != self._heap[0][1]:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def _arm(self) -> None:
        """Set the one timer for the earliest fire time (a running round re-arms when done)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not (self._use_timer and self._started) or self._closed or self._tick is not None:
            return
        earliest = self._earliest()
        if earliest is None:
            return
        if self._retry_at is not None:
            earliest = max(earliest, self._retry_at)
        delay = (earliest - self.clock()).total_seconds() + 0.001
        delay = min(max(delay, 0.0), self._max_sleep)
        self._timer = asyncio.get_running_loop().call_later(delay, self._wake)

    def _wake(self) -> None:
        self._timer = None
        if not self._closed:
            self._tick = asyncio.create_task(self._round())

    async def _round(self) -> None:
        try:
            await self.run_due()
        except Unavailable as exc:  # the store cannot write: expected until it recovers
            log.warning("scheduler round deferred", reason=str(exc), retry_in_s=RETRY_DELAY)
        except Exception:
            log.exception("scheduler round failed; retrying", retry_in_s=RETRY_DELAY)
        finally:
            self._tick = None
            self._arm()


def _when(value: datetime | None) -> str | None:
    return format_utc(value) if value is not None else None
