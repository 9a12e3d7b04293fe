"""The durable event log's compact form for task and run changes, shared by every store.

Most logged events are a task or a run changing. Building a taskrun.v1.Event for each and
serializing it, whether or not anyone watches, cost about a third of the engine's time under
load. So such an event is logged as the row the store writes for that task or run in the same
transaction (already encoded by `rows.py`), marshalled, behind a marker byte; a replay, which is
rare, turns it back into the Event the wire carries. Other events (workers, output) keep the
serialized Event. Both forms sit side by side in one log: the marker byte 0xFF never starts a
serialized protobuf message (its wire type would be 7, which does not exist).
"""

from __future__ import annotations

import marshal
from collections.abc import Iterable
from typing import Final

from taskrun import convert
from taskrun.controlplane.store.rows import (
    RUN_COLUMNS,
    TASK_COLUMNS,
    Params,
    run_from,
    run_row,
    task_from,
    task_row,
)
from taskrun.core.models import Run, Task
from taskrun.core.store import ChangeSet, LoggedEvent
from taskrun.v1 import events_pb2 as epb

_MARK: Final = b"\xff"
# The layout of the marshalled tuple: (format, time, row), the row in the column order of
# rows.py at that format. A change of TASK_COLUMNS or RUN_COLUMNS needs the next format, and
# `decode` to keep reading the older ones (the log outlives an upgrade).
_FORMAT: Final = 1
_MARSHAL_VERSION: Final = 4  # fixed, so a newer Python writes what an older one reads

StoredEvent = tuple[int, int, str, str, bytes]  # (position, kind, task_id, worker_id, data)


def encode(time_us: int, row: Params) -> bytes:
    return _MARK + marshal.dumps((_FORMAT, time_us, row), _MARSHAL_VERSION)


def stored_events(
    changes: ChangeSet,
    task_rows: Iterable[tuple[Task, Params]],
    run_rows: Iterable[tuple[Run, Params]],
) -> list[StoredEvent]:
    """The log rows of `changes`, whose tasks and runs the store encoded as the rows given."""
    if not changes.events:
        return []
    rows: dict[int, Params] = {}
    for task, row in task_rows:
        rows[id(task)] = row
    for run, row in run_rows:
        rows[id(run)] = row
    return [(e.position, e.kind, e.task_id, e.worker_id, _data(e, rows)) for e in changes.events]


def with_data(event: LoggedEvent) -> LoggedEvent:
    """`event` with its data encoded (for a store that keeps LoggedEvents as they are)."""
    if event.subject is None:
        return event
    return LoggedEvent(event.position, event.kind, event.task_id, event.worker_id, _data(event, {}))


def _data(event: LoggedEvent, rows: dict[int, Params]) -> bytes:
    subject = event.subject
    if subject is None:
        return event.data
    row = rows.get(id(subject))
    if row is None:  # not among the change set's rows: encode it here
        row = task_row(subject) if isinstance(subject, Task) else run_row(subject)
    return encode(event.time, row)


def decode(logged: LoggedEvent) -> epb.Event:
    """The Event a logged one stands for, as it was when logged, with its position."""
    data = logged.data
    if not data.startswith(_MARK):
        return epb.Event.FromString(data)
    _format, time_us, row = marshal.loads(data[1:])
    if logged.kind == epb.EVENT_KIND_TASK_CHANGED:
        task = task_from(dict(zip(TASK_COLUMNS, row, strict=True)))
        event = epb.Event(kind=epb.EVENT_KIND_TASK_CHANGED, task=convert.task_to_pb(task))
    else:
        event = epb.Event(kind=epb.EVENT_KIND_RUN_CHANGED)
        convert.run_to_pb(run_from(dict(zip(RUN_COLUMNS, row, strict=True))), event.run)
    event.position = logged.position
    event.time.FromMicroseconds(time_us)
    return event
