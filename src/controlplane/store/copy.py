"""Copy everything one store holds into another, empty one (`taskrun store copy`), e.g. SQLite
to PostgreSQL: tasks with their runs and output, workers, schedules, tokens, audit events,
conversations with their turns, every version of every workflow and their runs, webhooks with
their deliveries, and the durable event log (same positions and contents, so a watcher resumes
after a position it saw). Only through the `Store` protocol, so any pair of stores works.

Run it while no control plane uses either store: what the source gains during the copy may be
missed. Audit events keep their order and contents; the destination numbers them again from 1
(their ids are the destination's own, as for any appended audit event).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Final

import structlog

from taskrun.core.access import AuditEvent, AuditQuery
from taskrun.core.ids import RunId
from taskrun.core.models import OutputChunk
from taskrun.core.store import ChangeSet, ConversationQuery, Store, TaskQuery

__all__ = ["CopyCounts", "DestinationNotEmpty", "copy_store"]

log = structlog.get_logger(__name__)

DEFAULT_BATCH: Final = 500
EVERYTHING: Final = 2**62  # a limit no store reaches (lists without pages: read them whole)


class DestinationNotEmpty(ValueError):
    """The destination store already holds something: a copy would mix two histories."""


@dataclass(slots=True)
class CopyCounts:
    """How many of each the copy wrote."""

    tasks: int = 0
    runs: int = 0
    output_chunks: int = 0
    workers: int = 0
    schedules: int = 0
    bootstrap_tokens: int = 0
    api_tokens: int = 0
    audit_events: int = 0
    conversations: int = 0
    turns: int = 0
    workflows: int = 0
    workflow_runs: int = 0
    webhooks: int = 0
    webhook_deliveries: int = 0
    events: int = 0

    def summary(self) -> str:
        return ", ".join(
            f"{getattr(self, f.name)} {f.name.replace('_', ' ')}" for f in fields(self)
        )


async def _holds(store: Store) -> str:
    """What `store` already holds (the first kind found), or ""."""
    if (await store.list_tasks(TaskQuery(limit=1))).tasks:
        return "tasks"
    checks = (
        ("workers", store.list_workers()),
        ("schedules", store.list_schedules()),
        ("bootstrap tokens", store.list_bootstrap_tokens()),
        ("API tokens", store.list_api_tokens()),
        ("audit events", store.list_audit_events(AuditQuery(limit=1))),
        ("conversations", store.list_conversations(ConversationQuery(limit=1))),
        ("workflows", store.list_workflows()),
        ("webhooks", store.list_webhooks()),
    )
    found = ""
    for name, pending in checks:
        if await pending and not found:  # await every one: no coroutine left un-awaited
            found = name
    if not found and (await store.event_positions())[1]:
        found = "events"
    return found


def _batches(items: Sequence[object], size: int) -> list[slice]:
    return [slice(i, i + size) for i in range(0, len(items), size)]


async def copy_store(
    source: Store,
    destination: Store,
    *,
    batch: int = DEFAULT_BATCH,
    progress: Callable[[CopyCounts], None] | None = None,
) -> CopyCounts:
    """Copy everything in `source` into `destination` (both open); return what was copied.

    DestinationNotEmpty if the destination holds anything already. Writes go in change sets of
    at most `batch` tasks (with their runs) or `batch` other items, so a failure stops the copy
    at a change set boundary; start again into an empty destination.
    """
    if batch < 1:
        raise ValueError(f"batch must be positive, got {batch}")
    held = await _holds(destination)
    if held:
        raise DestinationNotEmpty(
            f"the destination store already holds {held}: copy into an empty one"
        )
    counts = CopyCounts()

    def report() -> None:
        if progress is not None:
            progress(counts)

    workers = await source.list_workers()
    for part in _batches(workers, batch):
        await destination.apply(ChangeSet(workers=workers[part]))
    counts.workers = len(workers)
    schedules = await source.list_schedules()
    for part in _batches(schedules, batch):
        await destination.apply(ChangeSet(schedules=schedules[part]))
    counts.schedules = len(schedules)
    bootstrap = await source.list_bootstrap_tokens()
    for part in _batches(bootstrap, batch):
        await destination.apply(ChangeSet(bootstrap_tokens=bootstrap[part]))
    counts.bootstrap_tokens = len(bootstrap)
    api_tokens = await source.list_api_tokens()
    for part in _batches(api_tokens, batch):
        await destination.apply(ChangeSet(api_tokens=api_tokens[part]))
    counts.api_tokens = len(api_tokens)
    for latest in await source.list_workflows():  # every version, oldest first
        versions = [await source.get_workflow(latest.name, v) for v in range(1, latest.version)]
        kept = [w for w in versions if w is not None] + [latest]
        await destination.apply(ChangeSet(workflows=kept))
        counts.workflows += len(kept)
    for hook in await source.list_webhooks():
        await destination.add_webhook(hook)
        counts.webhooks += 1
        deliveries = await source.list_webhook_deliveries(hook.id, limit=EVERYTHING)
        counts.webhook_deliveries += len(await destination.add_webhook_deliveries(deliveries))
    report()

    before = None
    while True:  # tasks newest first, each page with its runs, then their output
        page = await source.list_tasks(TaskQuery(limit=batch, before=before))
        runs = [run for task in page.tasks for run in await source.list_runs(task.id)]
        await destination.apply(ChangeSet(tasks=page.tasks, runs=runs))
        counts.tasks += len(page.tasks)
        counts.runs += len(runs)
        counts.output_chunks += await _copy_output(
            source, destination, [r.id for r in runs], batch * 20
        )
        report()
        if page.next_before is None:
            break
        before = page.next_before

    # after the tasks: a turn names its task
    before_conversation = None
    while True:
        conversations = await source.list_conversations(
            ConversationQuery(limit=batch, before=before_conversation)
        )
        if not conversations:
            break
        turns = [t for c in conversations for t in await source.list_turns(c.id)]
        await destination.apply(ChangeSet(conversations=conversations, turns=turns))
        counts.conversations += len(conversations)
        counts.turns += len(turns)
        before_conversation = conversations[-1].id
    runs_of_workflows = await source.list_workflow_runs(limit=EVERYTHING)
    for part in _batches(runs_of_workflows, batch):
        await destination.apply(ChangeSet(workflow_runs=runs_of_workflows[part]))
    counts.workflow_runs = len(runs_of_workflows)
    report()

    events: list[AuditEvent] = []  # read newest first, written oldest first
    before_id = 0
    while True:
        got = await source.list_audit_events(AuditQuery(limit=batch * 10, before_id=before_id))
        events.extend(got)
        if len(got) < batch * 10:
            break
        before_id = got[-1].id
    events.reverse()
    for part in _batches(events, batch * 10):
        await destination.apply(ChangeSet(audit_events=events[part]))
    counts.audit_events = len(events)
    report()

    position = 0  # the event log, oldest first, as stored (either form)
    while True:
        logged = await source.read_events(position, limit=batch * 10)
        if not logged:
            break
        await destination.apply(ChangeSet(events=logged))
        counts.events += len(logged)
        position = logged[-1].position
        report()
    log.info("store copied", **{f.name: getattr(counts, f.name) for f in fields(counts)})
    return counts


async def _copy_output(source: Store, destination: Store, runs: list[RunId], limit: int) -> int:
    """Copy the output of `runs`, `limit` chunks per change set; return how many."""
    copied = 0
    floors: dict[RunId, int] = {}
    while runs:
        chunks: list[OutputChunk] = await source.read_output(runs, after=floors, limit=limit)
        if not chunks:
            break
        await destination.apply(ChangeSet(chunks=chunks))
        copied += len(chunks)
        for chunk in chunks:
            floors[chunk.run_id] = chunk.seq
        if len(chunks) < limit:
            break
        # runs before the last one returned are complete: ask only for the rest
        runs = runs[runs.index(chunks[-1].run_id) :]
    return copied
