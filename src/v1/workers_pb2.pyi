import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from taskrun.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RevokeWorkerRequest(_message.Message):
    __slots__ = ("worker_id", "reason")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    reason: str
    def __init__(self, worker_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DrainWorkerRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ("statuses", "page_size", "page_token")
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedScalarFieldContainer[_common_pb2.WorkerStatus]
    page_size: int
    page_token: str
    def __init__(self, statuses: _Optional[_Iterable[_Union[_common_pb2.WorkerStatus, str]]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers", "next_page_token")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[_common_pb2.Worker]
    next_page_token: str
    def __init__(self, workers: _Optional[_Iterable[_Union[_common_pb2.Worker, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetWorkerRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class WorkerMessage(_message.Message):
    __slots__ = ("hello", "heartbeat", "statuses", "chunks", "cancel_acks", "draining", "message_seq", "agents")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CANCEL_ACKS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_SEQ_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    hello: WorkerHello
    heartbeat: Heartbeat
    statuses: _containers.RepeatedCompositeFieldContainer[RunStatusUpdate]
    chunks: _containers.RepeatedCompositeFieldContainer[_common_pb2.OutputChunk]
    cancel_acks: _containers.RepeatedCompositeFieldContainer[CancelAck]
    draining: bool
    message_seq: int
    agents: AgentsUpdate
    def __init__(self, hello: _Optional[_Union[WorkerHello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., statuses: _Optional[_Iterable[_Union[RunStatusUpdate, _Mapping]]] = ..., chunks: _Optional[_Iterable[_Union[_common_pb2.OutputChunk, _Mapping]]] = ..., cancel_acks: _Optional[_Iterable[_Union[CancelAck, _Mapping]]] = ..., draining: _Optional[bool] = ..., message_seq: _Optional[int] = ..., agents: _Optional[_Union[AgentsUpdate, _Mapping]] = ...) -> None: ...

class AgentsUpdate(_message.Message):
    __slots__ = ("agents",)
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[_common_pb2.AgentSpec]
    def __init__(self, agents: _Optional[_Iterable[_Union[_common_pb2.AgentSpec, _Mapping]]] = ...) -> None: ...

class WorkerHello(_message.Message):
    __slots__ = ("worker_id", "hostname", "version", "agents", "labels", "max_concurrent_runs", "held_runs", "draining")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_RUNS_FIELD_NUMBER: _ClassVar[int]
    HELD_RUNS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    hostname: str
    version: str
    agents: _containers.RepeatedCompositeFieldContainer[_common_pb2.AgentSpec]
    labels: _containers.ScalarMap[str, str]
    max_concurrent_runs: int
    held_runs: _containers.RepeatedCompositeFieldContainer[HeldRun]
    draining: bool
    def __init__(self, worker_id: _Optional[str] = ..., hostname: _Optional[str] = ..., version: _Optional[str] = ..., agents: _Optional[_Iterable[_Union[_common_pb2.AgentSpec, _Mapping]]] = ..., labels: _Optional[_Mapping[str, str]] = ..., max_concurrent_runs: _Optional[int] = ..., held_runs: _Optional[_Iterable[_Union[HeldRun, _Mapping]]] = ..., draining: _Optional[bool] = ...) -> None: ...

class HeldRun(_message.Message):
    __slots__ = ("run_id", "attempt", "status", "last_seq")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    attempt: int
    status: _common_pb2.RunStatus
    last_seq: int
    def __init__(self, run_id: _Optional[str] = ..., attempt: _Optional[int] = ..., status: _Optional[_Union[_common_pb2.RunStatus, str]] = ..., last_seq: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("time", "active_runs", "seq")
    TIME_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_RUNS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    active_runs: int
    seq: int
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., active_runs: _Optional[int] = ..., seq: _Optional[int] = ...) -> None: ...

class RunStatusUpdate(_message.Message):
    __slots__ = ("run_id", "attempt", "status", "error", "result_json", "usage", "backend_used", "session_id", "time", "last_seq", "session_snapshot", "session_cost_usd", "summary", "summarized_through", "fault")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_USED_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    SESSION_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    SESSION_COST_USD_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    SUMMARIZED_THROUGH_FIELD_NUMBER: _ClassVar[int]
    FAULT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    attempt: int
    status: _common_pb2.RunStatus
    error: str
    result_json: str
    usage: _common_pb2.Usage
    backend_used: _common_pb2.ModelBackend
    session_id: str
    time: _timestamp_pb2.Timestamp
    last_seq: int
    session_snapshot: bytes
    session_cost_usd: float
    summary: str
    summarized_through: int
    fault: _common_pb2.RunFault
    def __init__(self, run_id: _Optional[str] = ..., attempt: _Optional[int] = ..., status: _Optional[_Union[_common_pb2.RunStatus, str]] = ..., error: _Optional[str] = ..., result_json: _Optional[str] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., backend_used: _Optional[_Union[_common_pb2.ModelBackend, _Mapping]] = ..., session_id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_seq: _Optional[int] = ..., session_snapshot: _Optional[bytes] = ..., session_cost_usd: _Optional[float] = ..., summary: _Optional[str] = ..., summarized_through: _Optional[int] = ..., fault: _Optional[_Union[_common_pb2.RunFault, str]] = ...) -> None: ...

class CancelAck(_message.Message):
    __slots__ = ("run_id", "attempt")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    attempt: int
    def __init__(self, run_id: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("params", "assignments", "cancels", "drain", "forget_run_ids", "ack_seq", "lease_seq")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    CANCELS_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    FORGET_RUN_IDS_FIELD_NUMBER: _ClassVar[int]
    ACK_SEQ_FIELD_NUMBER: _ClassVar[int]
    LEASE_SEQ_FIELD_NUMBER: _ClassVar[int]
    params: SessionParams
    assignments: _containers.RepeatedCompositeFieldContainer[RunAssignment]
    cancels: _containers.RepeatedCompositeFieldContainer[CancelRun]
    drain: bool
    forget_run_ids: _containers.RepeatedScalarFieldContainer[str]
    ack_seq: int
    lease_seq: int
    def __init__(self, params: _Optional[_Union[SessionParams, _Mapping]] = ..., assignments: _Optional[_Iterable[_Union[RunAssignment, _Mapping]]] = ..., cancels: _Optional[_Iterable[_Union[CancelRun, _Mapping]]] = ..., drain: _Optional[bool] = ..., forget_run_ids: _Optional[_Iterable[str]] = ..., ack_seq: _Optional[int] = ..., lease_seq: _Optional[int] = ...) -> None: ...

class SessionParams(_message.Message):
    __slots__ = ("session_id", "heartbeat_interval_ms", "lease_margin_ms", "max_chunks_per_message", "max_chunk_bytes", "max_message_bytes", "lease_duration_ms", "idle_heartbeat_interval_ms")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    LEASE_MARGIN_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNKS_PER_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LEASE_DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    IDLE_HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    heartbeat_interval_ms: int
    lease_margin_ms: int
    max_chunks_per_message: int
    max_chunk_bytes: int
    max_message_bytes: int
    lease_duration_ms: int
    idle_heartbeat_interval_ms: int
    def __init__(self, session_id: _Optional[str] = ..., heartbeat_interval_ms: _Optional[int] = ..., lease_margin_ms: _Optional[int] = ..., max_chunks_per_message: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., lease_duration_ms: _Optional[int] = ..., idle_heartbeat_interval_ms: _Optional[int] = ...) -> None: ...

class RunAssignment(_message.Message):
    __slots__ = ("run_id", "task_id", "attempt", "agent", "input_json", "timeout_seconds", "labels", "required_provider", "required_model", "resume_session_id", "prompt", "fencing_token", "conversation", "output_schema_json", "output_retries", "model_settings", "max_cost_usd", "mcp_url", "mcp_token")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    INPUT_JSON_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_MODEL_FIELD_NUMBER: _ClassVar[int]
    RESUME_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SCHEMA_JSON_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_RETRIES_FIELD_NUMBER: _ClassVar[int]
    MODEL_SETTINGS_FIELD_NUMBER: _ClassVar[int]
    MAX_COST_USD_FIELD_NUMBER: _ClassVar[int]
    MCP_URL_FIELD_NUMBER: _ClassVar[int]
    MCP_TOKEN_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    task_id: str
    attempt: int
    agent: str
    input_json: str
    timeout_seconds: float
    labels: _containers.ScalarMap[str, str]
    required_provider: str
    required_model: str
    resume_session_id: str
    prompt: str
    fencing_token: int
    conversation: TurnContext
    output_schema_json: str
    output_retries: int
    model_settings: _common_pb2.ModelSettings
    max_cost_usd: float
    mcp_url: str
    mcp_token: str
    def __init__(self, run_id: _Optional[str] = ..., task_id: _Optional[str] = ..., attempt: _Optional[int] = ..., agent: _Optional[str] = ..., input_json: _Optional[str] = ..., timeout_seconds: _Optional[float] = ..., labels: _Optional[_Mapping[str, str]] = ..., required_provider: _Optional[str] = ..., required_model: _Optional[str] = ..., resume_session_id: _Optional[str] = ..., prompt: _Optional[str] = ..., fencing_token: _Optional[int] = ..., conversation: _Optional[_Union[TurnContext, _Mapping]] = ..., output_schema_json: _Optional[str] = ..., output_retries: _Optional[int] = ..., model_settings: _Optional[_Union[_common_pb2.ModelSettings, _Mapping]] = ..., max_cost_usd: _Optional[float] = ..., mcp_url: _Optional[str] = ..., mcp_token: _Optional[str] = ...) -> None: ...

class TurnContext(_message.Message):
    __slots__ = ("conversation_id", "turn", "history", "session_id", "session_snapshot", "session_cost_usd", "summarize_through", "session_turn")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    SESSION_COST_USD_FIELD_NUMBER: _ClassVar[int]
    SUMMARIZE_THROUGH_FIELD_NUMBER: _ClassVar[int]
    SESSION_TURN_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    turn: int
    history: _containers.RepeatedCompositeFieldContainer[TranscriptMessage]
    session_id: str
    session_snapshot: bytes
    session_cost_usd: float
    summarize_through: int
    session_turn: int
    def __init__(self, conversation_id: _Optional[str] = ..., turn: _Optional[int] = ..., history: _Optional[_Iterable[_Union[TranscriptMessage, _Mapping]]] = ..., session_id: _Optional[str] = ..., session_snapshot: _Optional[bytes] = ..., session_cost_usd: _Optional[float] = ..., summarize_through: _Optional[int] = ..., session_turn: _Optional[int] = ...) -> None: ...

class TranscriptMessage(_message.Message):
    __slots__ = ("role", "text", "turn")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    role: str
    text: str
    turn: int
    def __init__(self, role: _Optional[str] = ..., text: _Optional[str] = ..., turn: _Optional[int] = ...) -> None: ...

class CancelRun(_message.Message):
    __slots__ = ("run_id", "attempt", "reason")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    attempt: int
    reason: str
    def __init__(self, run_id: _Optional[str] = ..., attempt: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...
