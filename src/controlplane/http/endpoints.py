"""The HTTP API's unary endpoints as data: method, path, the gRPC method they call, and how the
request message is filled from the path, the query string and the JSON body.

The same table builds the routes and the OpenAPI document, so neither can drift from the other;
the servicer methods build the answers, so the HTTP API cannot drift from the gRPC API.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import Message

from taskrun.core.access import Scope
from taskrun.v1 import common_pb2 as pb
from taskrun.v1 import conversations_pb2 as cpb
from taskrun.v1 import schedules_pb2 as spb
from taskrun.v1 import tasks_pb2 as tpb
from taskrun.v1 import webhooks_pb2 as whpb
from taskrun.v1 import workers_pb2 as wpb
from taskrun.v1 import workflows_pb2 as wfpb


@dataclass(frozen=True, slots=True)
class Query:
    """A query-string parameter that fills one request field."""

    name: str  # in the URL
    field: str  # in the request message
    description: str
    repeated: bool = False
    enum_prefix: str = ""  # "running" is accepted for TASK_STATUS_RUNNING
    pairs: bool = False  # `label=k=v`, repeatable, fills a map field


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: str
    path: str
    service: str  # the servicer: "tasks", "workers" or "schedules"
    rpc: str  # its method, e.g. "CreateTask"
    request: type[Message]
    response: type[Message]
    scope: Scope
    summary: str
    body: bool = False  # the JSON body is the request message (path fields set on top)
    path_fields: tuple[tuple[str, str], ...] = ()  # (path parameter, request field path)
    query: tuple[Query, ...] = ()
    created_status: bool = False  # 201 when the answer says it created something

    @property
    def operation_id(self) -> str:
        return self.rpc[0].lower() + self.rpc[1:]


PAGE = (
    Query("page_size", "page_size", "at most this many (default 50 for tasks, 100 for schedules)"),
    Query("page_token", "page_token", "`next_page_token` of the previous page"),
)
FITTING_PAGE = (  # a page as long as fits one reply, unless asked for fewer
    Query("page_size", "page_size", "at most this many (default: as many as fit one reply)"),
    PAGE[1],
)

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "POST",
        "/v1/conversations",
        "conversations",
        "CreateConversation",
        cpb.CreateConversationRequest,
        cpb.Conversation,
        Scope.SUBMIT,
        "Start a conversation with its first message (follow its turn's task for the answer)",
        body=True,
    ),
    Endpoint(
        "GET",
        "/v1/conversations",
        "conversations",
        "ListConversations",
        cpb.ListConversationsRequest,
        cpb.ListConversationsResponse,
        Scope.READ,
        "List conversations, newest first, without their turns",
        query=(
            Query("agent", "agent", "only this agent"),
            Query("label", "labels", "`key=value`; every one must match; repeatable", pairs=True),
            *PAGE,
        ),
    ),
    Endpoint(
        "GET",
        "/v1/conversations/{conversation_id}",
        "conversations",
        "GetConversation",
        cpb.GetConversationRequest,
        cpb.Conversation,
        Scope.READ,
        "A conversation with its turns in order (messages, answers, status, usage per turn): as "
        "many of the latest as fit one message; `earlier_turns` counts those before them",
        path_fields=(("conversation_id", "conversation_id"),),
        query=(
            Query(
                "before_turn",
                "before_turn",
                "only turns before this index (default: up to the latest)",
            ),
        ),
    ),
    Endpoint(
        "DELETE",
        "/v1/conversations/{conversation_id}",
        "conversations",
        "DeleteConversation",
        cpb.DeleteConversationRequest,
        cpb.DeleteConversationResponse,
        Scope.SUBMIT,
        "Delete a conversation and its transcript (its tasks stay, as history)",
        path_fields=(("conversation_id", "conversation_id"),),
    ),
    Endpoint(
        "POST",
        "/v1/tasks",
        "tasks",
        "CreateTask",
        tpb.CreateTaskRequest,
        tpb.CreateTaskResponse,
        Scope.SUBMIT,
        "Create a task (201; 200 when an idempotency key found an existing one)",
        body=True,
        created_status=True,
    ),
    Endpoint(
        "POST",
        "/v1/tasks/batch",
        "tasks",
        "CreateTasks",
        tpb.CreateTasksRequest,
        tpb.CreateTasksResponse,
        Scope.SUBMIT,
        "Create several tasks: all are validated first, none is created if one is invalid",
        body=True,
    ),
    Endpoint(
        "GET",
        "/v1/tasks",
        "tasks",
        "ListTasks",
        tpb.ListTasksRequest,
        tpb.ListTasksResponse,
        Scope.READ,
        "List tasks, newest first, with the filters of `taskrun task list`",
        query=(
            Query(
                "status",
                "statuses",
                "any of these statuses (`running` or `TASK_STATUS_RUNNING`); repeatable",
                repeated=True,
                enum_prefix="TASK_STATUS_",
            ),
            Query("agent", "agent", "only this agent"),
            Query("label", "labels", "`key=value`; every one must match; repeatable", pairs=True),
            Query("worker_id", "worker_id", "only tasks whose current run is on this worker"),
            Query("schedule", "schedule", "only tasks created by this schedule"),
            Query("parent_task_id", "parent_task_id", "only the direct sub-tasks of this task"),
            *PAGE,
        ),
    ),
    Endpoint(
        "GET",
        "/v1/usage",
        "tasks",
        "GetUsage",
        tpb.GetUsageRequest,
        tpb.UsageReport,
        Scope.READ,
        "Cost and tokens of ended runs per UTC day, agent, model and worker, with the daily "
        "budgets and what they used today (`taskrun usage`)",
        query=(
            Query("days", "days", "today and the days before it (default 7, at most 366)"),
            PAGE[1],
        ),
    ),
    Endpoint(
        "GET",
        "/v1/tasks/{task_id}",
        "tasks",
        "GetTask",
        tpb.GetTaskRequest,
        pb.Task,
        Scope.READ,
        "A task with its runs (the latest that fit one reply; `earlier_runs` counts the rest),"
        " its result, usage and cost",
        path_fields=(("task_id", "task_id"),),
        query=(
            Query(
                "before_attempt",
                "before_attempt",
                "only runs of attempts before this one (default: up to the latest)",
            ),
        ),
    ),
    Endpoint(
        "POST",
        "/v1/tasks/{task_id}/cancel",
        "tasks",
        "CancelTask",
        tpb.CancelTaskRequest,
        pb.Task,
        Scope.SUBMIT,
        "Cancel a pending or running task (the agent is really stopped)",
        body=True,
        path_fields=(("task_id", "task_id"),),
    ),
    Endpoint(
        "POST",
        "/v1/tasks/{task_id}/continue",
        "tasks",
        "ContinueTask",
        tpb.ContinueTaskRequest,
        pb.Task,
        Scope.SUBMIT,
        "A follow-up message to a completed task whose agent keeps a session",
        body=True,
        path_fields=(("task_id", "task_id"),),
    ),
    Endpoint(
        "GET",
        "/v1/workers",
        "workers",
        "ListWorkers",
        wpb.ListWorkersRequest,
        wpb.ListWorkersResponse,
        Scope.READ,
        "Registered workers with their agents (and input schemas), backends and load",
        query=(
            Query(
                "status",
                "statuses",
                "any of these statuses (`online` or `WORKER_STATUS_ONLINE`); repeatable",
                repeated=True,
                enum_prefix="WORKER_STATUS_",
            ),
            *FITTING_PAGE,
        ),
    ),
    Endpoint(
        "GET",
        "/v1/workers/{worker_id}",
        "workers",
        "GetWorker",
        wpb.GetWorkerRequest,
        pb.Worker,
        Scope.READ,
        "One worker",
        path_fields=(("worker_id", "worker_id"),),
    ),
    Endpoint(
        "POST",
        "/v1/schedules",
        "schedules",
        "CreateSchedule",
        spb.CreateScheduleRequest,
        spb.Schedule,
        Scope.SUBMIT,
        "Create a schedule (cron or RRULE in an IANA zone)",
        body=True,
    ),
    Endpoint(
        "GET",
        "/v1/schedules",
        "schedules",
        "ListSchedules",
        spb.ListSchedulesRequest,
        spb.ListSchedulesResponse,
        Scope.READ,
        "List schedules by name",
        query=PAGE,
    ),
    Endpoint(
        "GET",
        "/v1/schedules/{name}",
        "schedules",
        "GetSchedule",
        spb.GetScheduleRequest,
        spb.Schedule,
        Scope.READ,
        "One schedule with its next and last fire time",
        path_fields=(("name", "name"),),
    ),
    Endpoint(
        "PATCH",
        "/v1/schedules/{name}",
        "schedules",
        "UpdateSchedule",
        spb.UpdateScheduleRequest,
        spb.Schedule,
        Scope.SUBMIT,
        'Change the fields named in `update_mask` (e.g. "cron,timezone")',
        body=True,
        path_fields=(("name", "schedule.name"),),
    ),
    Endpoint(
        "DELETE",
        "/v1/schedules/{name}",
        "schedules",
        "DeleteSchedule",
        spb.DeleteScheduleRequest,
        spb.DeleteScheduleResponse,
        Scope.SUBMIT,
        "Delete a schedule (the tasks it created stay)",
        path_fields=(("name", "name"),),
    ),
    Endpoint(
        "POST",
        "/v1/schedules/{name}/pause",
        "schedules",
        "PauseSchedule",
        spb.PauseScheduleRequest,
        spb.Schedule,
        Scope.SUBMIT,
        "Pause a schedule",
        path_fields=(("name", "name"),),
    ),
    Endpoint(
        "POST",
        "/v1/schedules/{name}/resume",
        "schedules",
        "ResumeSchedule",
        spb.ResumeScheduleRequest,
        spb.Schedule,
        Scope.SUBMIT,
        "Resume a schedule from its next occurrence",
        path_fields=(("name", "name"),),
    ),
    Endpoint(
        "POST",
        "/v1/schedules/{name}/trigger",
        "schedules",
        "TriggerSchedule",
        spb.TriggerScheduleRequest,
        spb.TriggerScheduleResponse,
        Scope.SUBMIT,
        "Create one task now, outside the rhythm",
        path_fields=(("name", "name"),),
    ),
    Endpoint(
        "GET",
        "/v1/schedules/{name}/preview",
        "schedules",
        "PreviewSchedule",
        spb.PreviewScheduleRequest,
        spb.PreviewScheduleResponse,
        Scope.READ,
        "The next fire times of a schedule",
        path_fields=(("name", "name"),),
        query=(
            Query("count", "count", "how many (default 5, at most 100)"),
            Query("after", "after", "from this instant (RFC 3339; default now)"),
        ),
    ),
    Endpoint(
        "POST",
        "/v1/webhooks",
        "webhooks",
        "CreateWebhook",
        whpb.CreateWebhookRequest,
        whpb.CreateWebhookResponse,
        Scope.ADMIN,
        "Register a webhook endpoint; the answer holds its signing secret, shown only here",
        body=True,
    ),
    Endpoint(
        "GET",
        "/v1/webhooks",
        "webhooks",
        "ListWebhooks",
        whpb.ListWebhooksRequest,
        whpb.ListWebhooksResponse,
        Scope.READ,
        "Every webhook (without secrets)",
    ),
    Endpoint(
        "DELETE",
        "/v1/webhooks/{webhook_id}",
        "webhooks",
        "DeleteWebhook",
        whpb.DeleteWebhookRequest,
        whpb.DeleteWebhookResponse,
        Scope.ADMIN,
        "Delete a webhook and its deliveries",
        path_fields=(("webhook_id", "webhook_id"),),
    ),
    Endpoint(
        "GET",
        "/v1/webhooks/{webhook_id}/deliveries",
        "webhooks",
        "ListWebhookDeliveries",
        whpb.ListWebhookDeliveriesRequest,
        whpb.ListWebhookDeliveriesResponse,
        Scope.READ,
        "A webhook's deliveries, newest first: status, attempts, last response code and error",
        path_fields=(("webhook_id", "webhook_id"),),
        query=(Query("limit", "limit", "at most this many (default 50, at most 1000)"),),
    ),
    Endpoint(
        "POST",
        "/v1/webhooks/{webhook_id}/test",
        "webhooks",
        "TestWebhook",
        whpb.TestWebhookRequest,
        whpb.WebhookDelivery,
        Scope.ADMIN,
        "Send a webhook.test delivery now (signed, retried and recorded like any other)",
        path_fields=(("webhook_id", "webhook_id"),),
    ),
    # workflows and the inbox
    Endpoint(
        "POST",
        "/v1/workflows",
        "workflows",
        "PutWorkflow",
        wfpb.PutWorkflowRequest,
        wfpb.PutWorkflowResponse,
        Scope.SUBMIT,
        "Store a workflow definition (YAML or JSON text in `definition`) as its next version "
        "(201; 200 when it equals the newest version)",
        body=True,
        created_status=True,
    ),
    Endpoint(
        "GET",
        "/v1/workflows",
        "workflows",
        "ListWorkflows",
        wfpb.ListWorkflowsRequest,
        wfpb.ListWorkflowsResponse,
        Scope.READ,
        "The newest version of every workflow, by name",
        query=FITTING_PAGE,
    ),
    Endpoint(
        "GET",
        "/v1/workflows/{name}",
        "workflows",
        "GetWorkflow",
        wfpb.GetWorkflowRequest,
        wfpb.Workflow,
        Scope.READ,
        "A workflow's definition (the newest version unless `version`)",
        path_fields=(("name", "name"),),
        query=(Query("version", "version", "a version (default: the newest)"),),
    ),
    Endpoint(
        "POST",
        "/v1/workflows/{name}/runs",
        "workflows",
        "StartWorkflowRun",
        wfpb.StartWorkflowRunRequest,
        wfpb.StartWorkflowRunResponse,
        Scope.SUBMIT,
        "Start a run with `input_json` (201; 200 when an idempotency key found an existing one)",
        body=True,
        path_fields=(("name", "name"),),
        created_status=True,
    ),
    Endpoint(
        "GET",
        "/v1/workflow-runs",
        "workflows",
        "ListWorkflowRuns",
        wfpb.ListWorkflowRunsRequest,
        wfpb.ListWorkflowRunsResponse,
        Scope.READ,
        "Workflow runs, newest first",
        query=(
            Query("workflow", "workflow", "only runs of this workflow"),
            Query("limit", "limit", "at most this many (default 100, at most 1000)"),
            PAGE[1],
        ),
    ),
    Endpoint(
        "GET",
        "/v1/workflow-runs/{id}",
        "workflows",
        "GetWorkflowRun",
        wfpb.GetWorkflowRunRequest,
        wfpb.WorkflowRun,
        Scope.READ,
        "A workflow run with each step's status, result and decision (a result that does not"
        " fit the reply is left out, `result_left_out`: `?step=NAME` sends that step alone)",
        path_fields=(("id", "id"),),
        query=(Query("step", "step", "only this step, with its result"),),
    ),
    Endpoint(
        "POST",
        "/v1/workflow-runs/{id}/cancel",
        "workflows",
        "CancelWorkflowRun",
        wfpb.CancelWorkflowRunRequest,
        wfpb.WorkflowRun,
        Scope.SUBMIT,
        "Cancel a workflow run: its running steps' tasks are cancelled",
        body=True,
        path_fields=(("id", "id"),),
    ),
    Endpoint(
        "GET",
        "/v1/inbox",
        "workflows",
        "ListInboxItems",
        wfpb.ListInboxItemsRequest,
        wfpb.ListInboxItemsResponse,
        Scope.READ,
        "What waits for a person (approvals), oldest first",
        query=FITTING_PAGE,
    ),
    Endpoint(
        "POST",
        "/v1/inbox/{id}/answer",
        "workflows",
        "AnswerInboxItem",
        wfpb.AnswerInboxItemRequest,
        wfpb.WorkflowRun,
        Scope.SUBMIT,
        "Approve (`approve: true`, with a `choice` when the item has choices) or reject",
        body=True,
        path_fields=(("id", "id"),),
    ),
)
