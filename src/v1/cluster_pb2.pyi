import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetClusterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ControlPlane(_message.Message):
    __slots__ = ("id", "address", "hostname", "pid", "version", "started_at", "seen_seconds_ago", "leader", "workers")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    SEEN_SECONDS_AGO_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    id: str
    address: str
    hostname: str
    pid: int
    version: str
    started_at: _timestamp_pb2.Timestamp
    seen_seconds_ago: float
    leader: bool
    workers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., address: _Optional[str] = ..., hostname: _Optional[str] = ..., pid: _Optional[int] = ..., version: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., seen_seconds_ago: _Optional[float] = ..., leader: _Optional[bool] = ..., workers: _Optional[_Iterable[str]] = ...) -> None: ...

class ClusterStatus(_message.Message):
    __slots__ = ("store", "database", "leader_id", "leader_address", "leader_since", "epoch", "lease_seconds_left", "control_planes", "answered_by")
    STORE_FIELD_NUMBER: _ClassVar[int]
    DATABASE_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    LEADER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LEADER_SINCE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_LEFT_FIELD_NUMBER: _ClassVar[int]
    CONTROL_PLANES_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_BY_FIELD_NUMBER: _ClassVar[int]
    store: str
    database: str
    leader_id: str
    leader_address: str
    leader_since: _timestamp_pb2.Timestamp
    epoch: int
    lease_seconds_left: float
    control_planes: _containers.RepeatedCompositeFieldContainer[ControlPlane]
    answered_by: str
    def __init__(self, store: _Optional[str] = ..., database: _Optional[str] = ..., leader_id: _Optional[str] = ..., leader_address: _Optional[str] = ..., leader_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., epoch: _Optional[int] = ..., lease_seconds_left: _Optional[float] = ..., control_planes: _Optional[_Iterable[_Union[ControlPlane, _Mapping]]] = ..., answered_by: _Optional[str] = ...) -> None: ...
