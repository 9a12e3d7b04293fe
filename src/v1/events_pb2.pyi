import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from taskrun.v1 import common_pb2 as _common_pb2
from taskrun.v1 import workflows_pb2 as _workflows_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_KIND_WORKER_CONNECTED: _ClassVar[EventKind]
    EVENT_KIND_WORKER_DISCONNECTED: _ClassVar[EventKind]
    EVENT_KIND_WORKER_DRAINING: _ClassVar[EventKind]
    EVENT_KIND_TASK_CHANGED: _ClassVar[EventKind]
    EVENT_KIND_RUN_CHANGED: _ClassVar[EventKind]
    EVENT_KIND_OUTPUT: _ClassVar[EventKind]
    EVENT_KIND_SNAPSHOT_END: _ClassVar[EventKind]
    EVENT_KIND_INBOX_ITEM_CREATED: _ClassVar[EventKind]
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_KIND_WORKER_CONNECTED: EventKind
EVENT_KIND_WORKER_DISCONNECTED: EventKind
EVENT_KIND_WORKER_DRAINING: EventKind
EVENT_KIND_TASK_CHANGED: EventKind
EVENT_KIND_RUN_CHANGED: EventKind
EVENT_KIND_OUTPUT: EventKind
EVENT_KIND_SNAPSHOT_END: EventKind
EVENT_KIND_INBOX_ITEM_CREATED: EventKind

class WatchEventsRequest(_message.Message):
    __slots__ = ("task_id", "worker_id", "kinds", "include_output", "snapshot", "after_position")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    AFTER_POSITION_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    worker_id: str
    kinds: _containers.RepeatedScalarFieldContainer[EventKind]
    include_output: bool
    snapshot: bool
    after_position: int
    def __init__(self, task_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., kinds: _Optional[_Iterable[_Union[EventKind, str]]] = ..., include_output: _Optional[bool] = ..., snapshot: _Optional[bool] = ..., after_position: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("time", "kind", "task", "run", "worker", "chunk", "snapshot", "inbox_item", "position")
    TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    INBOX_ITEM_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    kind: EventKind
    task: _common_pb2.Task
    run: _common_pb2.Run
    worker: _common_pb2.Worker
    chunk: _common_pb2.OutputChunk
    snapshot: bool
    inbox_item: _workflows_pb2.InboxItem
    position: int
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., kind: _Optional[_Union[EventKind, str]] = ..., task: _Optional[_Union[_common_pb2.Task, _Mapping]] = ..., run: _Optional[_Union[_common_pb2.Run, _Mapping]] = ..., worker: _Optional[_Union[_common_pb2.Worker, _Mapping]] = ..., chunk: _Optional[_Union[_common_pb2.OutputChunk, _Mapping]] = ..., snapshot: _Optional[bool] = ..., inbox_item: _Optional[_Union[_workflows_pb2.InboxItem, _Mapping]] = ..., position: _Optional[int] = ...) -> None: ...
