"""The durable event log's compact form, shared by every store.

Most logged events are a task or a run changing, or output. Building a taskrun.v1.Event for each
and serializing it, whether or not anyone watches, cost about a third of the engine's time under
load. So a task or run change is logged as the row the store writes for it in the same
transaction (already encoded by `rows.py`), and output as the chunk's identity and time (its text
is in the output table), marshalled behind a marker byte; a replay, which is rare, turns them
back into the Event the wire carries. Worker changes keep the serialized Event. Both forms sit
side by side in one log: the marker byte 0xFF never starts a serialized protobuf message (its
wire type would be 7, which does not exist).
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
    dt_or_none,
    run_from,
    run_row,
    task_from,
    task_row,
    us_or_none,
)
from taskrun.core.ids import RunId
from taskrun.core.models import OutputChunk, OutputKind, Run, Task
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


def encode_output(time_us: int, chunk: OutputChunk) -> bytes:
    """An output event: the chunk without its text, which the output table holds (a replay
    reads it there)."""
    row = (
        chunk.run_id,
        chunk.attempt,
        chunk.seq,
        int(chunk.kind),
        us_or_none(chunk.time),
        chunk.task_id,
    )
    return encode(time_us, row)


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
    elif logged.kind == epb.EVENT_KIND_OUTPUT:
        run_id, attempt, seq, kind, at, task_id = row
        chunk = OutputChunk(
            RunId(run_id), attempt, seq, "", OutputKind(kind), dt_or_none(at), task_id
        )
        event = epb.Event(kind=epb.EVENT_KIND_OUTPUT)
        convert.chunk_to_pb(chunk, event.chunk)
    else:
        event = epb.Event(kind=epb.EVENT_KIND_RUN_CHANGED)
        convert.run_to_pb(run_from(dict(zip(RUN_COLUMNS, row, strict=True))), event.run)
    event.position = logged.position
    event.time.FromMicroseconds(time_us)
    return event
