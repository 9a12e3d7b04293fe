from taskrun.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetUsageRequest(_message.Message):
    __slots__ = ("days", "page_token")
    DAYS_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    days: int
    page_token: str
    def __init__(self, days: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class UsageRow(_message.Message):
    __slots__ = ("day", "agent", "model", "worker_id", "runs", "usage")
    DAY_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    day: str
    agent: str
    model: str
    worker_id: str
    runs: int
    usage: _common_pb2.Usage
    def __init__(self, day: _Optional[str] = ..., agent: _Optional[str] = ..., model: _Optional[str] = ..., worker_id: _Optional[str] = ..., runs: _Optional[int] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ...) -> None: ...

class BudgetStatus(_message.Message):
    __slots__ = ("kind", "key", "limit_usd", "spent_usd", "reached")
    KIND_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    LIMIT_USD_FIELD_NUMBER: _ClassVar[int]
    SPENT_USD_FIELD_NUMBER: _ClassVar[int]
    REACHED_FIELD_NUMBER: _ClassVar[int]
    kind: str
    key: str
    limit_usd: float
    spent_usd: float
    reached: bool
    def __init__(self, kind: _Optional[str] = ..., key: _Optional[str] = ..., limit_usd: _Optional[float] = ..., spent_usd: _Optional[float] = ..., reached: _Optional[bool] = ...) -> None: ...

class UsageReport(_message.Message):
    __slots__ = ("rows", "budgets", "next_page_token")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[UsageRow]
    budgets: _containers.RepeatedCompositeFieldContainer[BudgetStatus]
    next_page_token: str
    def __init__(self, rows: _Optional[_Iterable[_Union[UsageRow, _Mapping]]] = ..., budgets: _Optional[_Iterable[_Union[BudgetStatus, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ContinueTaskRequest(_message.Message):
    __slots__ = ("task_id", "prompt")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    prompt: str
    def __init__(self, task_id: _Optional[str] = ..., prompt: _Optional[str] = ...) -> None: ...

class CreateTaskRequest(_message.Message):
    __slots__ = ("agent", "input_json", "labels", "policy", "allow_unknown_agent")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AGENT_FIELD_NUMBER: _ClassVar[int]
    INPUT_JSON_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    ALLOW_UNKNOWN_AGENT_FIELD_NUMBER: _ClassVar[int]
    agent: str
    input_json: str
    labels: _containers.ScalarMap[str, str]
    policy: _common_pb2.TaskPolicy
    allow_unknown_agent: bool
    def __init__(self, agent: _Optional[str] = ..., input_json: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., policy: _Optional[_Union[_common_pb2.TaskPolicy, _Mapping]] = ..., allow_unknown_agent: _Optional[bool] = ...) -> None: ...

class CreateTaskResponse(_message.Message):
    __slots__ = ("task", "created")
    TASK_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    task: _common_pb2.Task
    created: bool
    def __init__(self, task: _Optional[_Union[_common_pb2.Task, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class CreateTasksRequest(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[CreateTaskRequest]
    def __init__(self, tasks: _Optional[_Iterable[_Union[CreateTaskRequest, _Mapping]]] = ...) -> None: ...

class CreateTasksResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[CreateTaskResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[CreateTaskResponse, _Mapping]]] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("task_id", "before_attempt")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    BEFORE_ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    before_attempt: int
    def __init__(self, task_id: _Optional[str] = ..., before_attempt: _Optional[int] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ("statuses", "agent", "labels", "worker_id", "page_size", "page_token", "schedule", "parent_task_id")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    PARENT_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedScalarFieldContainer[_common_pb2.TaskStatus]
    agent: str
    labels: _containers.ScalarMap[str, str]
    worker_id: str
    page_size: int
    page_token: str
    schedule: str
    parent_task_id: str
    def __init__(self, statuses: _Optional[_Iterable[_Union[_common_pb2.TaskStatus, str]]] = ..., agent: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., worker_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., schedule: _Optional[str] = ..., parent_task_id: _Optional[str] = ...) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks", "next_page_token")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[_common_pb2.Task]
    next_page_token: str
    def __init__(self, tasks: _Optional[_Iterable[_Union[_common_pb2.Task, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelTaskRequest(_message.Message):
    __slots__ = ("task_id", "reason")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    reason: str
    def __init__(self, task_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CreateAndFollowTaskRequest(_message.Message):
    __slots__ = ("task", "include_events", "outcome_only")
    TASK_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_EVENTS_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_ONLY_FIELD_NUMBER: _ClassVar[int]
    task: CreateTaskRequest
    include_events: bool
    outcome_only: bool
    def __init__(self, task: _Optional[_Union[CreateTaskRequest, _Mapping]] = ..., include_events: _Optional[bool] = ..., outcome_only: _Optional[bool] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("request_id", "create", "stop")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CREATE_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    create: CreateAndFollowTaskRequest
    stop: bool
    def __init__(self, request_id: _Optional[int] = ..., create: _Optional[_Union[CreateAndFollowTaskRequest, _Mapping]] = ..., stop: _Optional[bool] = ...) -> None: ...

class SubmitUpdate(_message.Message):
    __slots__ = ("request_id", "update", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    update: TaskUpdate
    error: RequestError
    def __init__(self, request_id: _Optional[int] = ..., update: _Optional[_Union[TaskUpdate, _Mapping]] = ..., error: _Optional[_Union[RequestError, _Mapping]] = ...) -> None: ...

class RequestError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class FollowTaskRequest(_message.Message):
    __slots__ = ("task_id", "follow", "include_events", "outcome_only")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_EVENTS_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_ONLY_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    follow: bool
    include_events: bool
    outcome_only: bool
    def __init__(self, task_id: _Optional[str] = ..., follow: _Optional[bool] = ..., include_events: _Optional[bool] = ..., outcome_only: _Optional[bool] = ...) -> None: ...

class TaskUpdate(_message.Message):
    __slots__ = ("task", "chunks", "created", "last")
    TASK_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    task: _common_pb2.Task
    chunks: _containers.RepeatedCompositeFieldContainer[_common_pb2.OutputChunk]
    created: bool
    last: bool
    def __init__(self, task: _Optional[_Union[_common_pb2.Task, _Mapping]] = ..., chunks: _Optional[_Iterable[_Union[_common_pb2.OutputChunk, _Mapping]]] = ..., created: _Optional[bool] = ..., last: _Optional[bool] = ...) -> None: ...
