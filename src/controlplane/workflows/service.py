"""gRPC handlers of WorkflowService: authenticate, convert at the edge, call the executor."""

from __future__ import annotations

import grpc

from taskrun import convert
from taskrun.controlplane.auth import Authenticator
from taskrun.controlplane.pages import (
    dated_page,
    page_size,
    page_token,
    position_token,
    token_field,
    token_position,
)
from taskrun.controlplane.services import domain_errors
from taskrun.controlplane.sizing import fitting, leave_out_results
from taskrun.controlplane.workflows.executor import WorkflowExecutor
from taskrun.core import errors
from taskrun.core.access import Scope
from taskrun.core.text import quoted
from taskrun.core.validation import validate_input
from taskrun.core.workflow import WorkflowRun
from taskrun.v1 import workflows_pb2, workflows_pb2_grpc

MAX_LIMIT = 1000
MAX_ID = 64
MAX_COMMENT = 4096
MAX_KEY = 256


def _bounded(value: str, field: str, limit: int = MAX_ID, *, required: bool = True) -> str:
    if required and not value:
        raise errors.InvalidArgument("must not be empty", field=field)
    if len(value) > limit:
        raise errors.InvalidArgument(f"is longer than {limit} characters", field=field)
    return value


class WorkflowService(workflows_pb2_grpc.WorkflowServiceServicer):
    def __init__(self, executor: WorkflowExecutor, auth: Authenticator) -> None:
        self.executor = executor
        self.auth = auth

    @property
    def _budget(self) -> int:
        return self.executor.engine.config.max_message_bytes

    def _run_pb(self, run: WorkflowRun) -> workflows_pb2.WorkflowRun:
        """The run as sent: every step, the results that fit."""
        return leave_out_results(convert.workflow_run_to_pb(run), self._budget)

    @domain_errors
    async def PutWorkflow(
        self, request: workflows_pb2.PutWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> workflows_pb2.PutWorkflowResponse:
        await self.auth.operator(context, Scope.SUBMIT)
        if not request.definition.strip():
            raise errors.InvalidArgument("must not be empty", field="definition")
        workflow, created = await self.executor.put_workflow(request.definition)
        return workflows_pb2.PutWorkflowResponse(
            workflow=convert.workflow_to_pb(workflow), created=created
        )

    @domain_errors
    async def ListWorkflows(
        self, request: workflows_pb2.ListWorkflowsRequest, context: grpc.aio.ServicerContext
    ) -> workflows_pb2.ListWorkflowsResponse:
        await self.auth.operator(context, Scope.READ)
        size = page_size(request.page_size, MAX_LIMIT) or MAX_LIMIT  # 0: as many as fit
        after = token_field(request.page_token, "ListWorkflows")
        workflows = [w for w in await self.executor.store.list_workflows() if w.name > after]
        listed, cut = fitting((convert.workflow_to_pb(w) for w in workflows[:size]), self._budget)
        more = cut or len(workflows) > size
        return workflows_pb2.ListWorkflowsResponse(
            workflows=listed, next_page_token=page_token(listed[-1].name) if more else ""
        )

    @domain_errors
    async def GetWorkflow(
        self, request: workflows_pb2.GetWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> workflows_pb2.Workflow:
        await self.auth.operator(context, Scope.READ)
        _bounded(request.name, "name")
        if request.version < 0:
            raise errors.InvalidArgument("must be 0 (the newest) or positive", field="version")
        workflow = await self.executor.get_workflow(request.name, request.version)
        return convert.workflow_to_pb(workflow)

    @domain_errors
    async def StartWorkflowRun(
        self, request: workflows_pb2.StartWorkflowRunRequest, context: grpc.aio.ServicerContext
    ) -> workflows_pb2.StartWorkflowRunResponse:
        await self.auth.operator(context, Scope.SUBMIT)
        _bounded(request.name, "name")
        _bounded(request.idempotency_key, "idempotency_key", MAX_KEY, required=False)
        if request.version < 0:
            raise errors.InvalidArgument("must be 0 (the newest) or positive", field="version")
        _, data = validate_input(request.input_json, "input_json")  # size, depth, an object
        run, created = await self.executor.start_run(
            request.name, data, version=request.version, key=request.idempotency_key
        )
        return workflows_pb2.StartWorkflowRunResponse(run=self._run_pb(run), created=created)

    @domain_errors
    async def GetWorkflowRun(
        self, request: workflows_pb2.GetWorkflowRunRequest, context: grpc.aio.ServicerContext
    ) -> workflows_pb2.WorkflowRun:
        await self.auth.operator(context, Scope.READ)
        run = await self.executor.get_run(_bounded(request.id, "id"))
        if not request.step:
            return self._run_pb(run)
        step = run.steps.get(request.step)
        if step is None:
            known = ", ".join(run.steps)
            raise errors.NotFound(
                f"no step {quoted(request.step)} in workflow run {run.id} (its steps: {known})",
                field="step",
            )
        run.steps = {step.name: step}  # one result fits: each is at most 1 MiB
        return convert.workflow_run_to_pb(run)

    @domain_errors
    async def ListWorkflowRuns(
        self, request: workflows_pb2.ListWorkflowRunsRequest, context: grpc.aio.ServicerContext
    ) -> workflows_pb2.ListWorkflowRunsResponse:
        await self.auth.operator(context, Scope.READ)
        _bounded(request.workflow, "workflow", required=False)
        limit = request.limit or 100
        if not 1 <= limit <= MAX_LIMIT:
            raise errors.InvalidArgument(f"must be between 1 and {MAX_LIMIT}", field="limit")
        before = token_position(request.page_token, "ListWorkflowRuns")
        runs = await self.executor.list_runs(request.workflow, limit + 1, before)
        listed, cut = fitting((self._run_pb(r) for r in runs[:limit]), self._budget)
        last = runs[len(listed) - 1] if listed else None
        more = cut or len(runs) > limit
        return workflows_pb2.ListWorkflowRunsResponse(
            runs=listed,
            next_page_token=position_token(last.created_at, last.id) if more and last else "",
        )

    @domain_errors
    async def CancelWorkflowRun(
        self, request: workflows_pb2.CancelWorkflowRunRequest, context: grpc.aio.ServicerContext
    ) -> workflows_pb2.WorkflowRun:
        await self.auth.operator(context, Scope.SUBMIT)
        _bounded(request.reason, "reason", MAX_COMMENT, required=False)
        run = await self.executor.cancel_run(_bounded(request.id, "id"), request.reason)
        return self._run_pb(run)

    @domain_errors
    async def ListInboxItems(
        self, request: workflows_pb2.ListInboxItemsRequest, context: grpc.aio.ServicerContext
    ) -> workflows_pb2.ListInboxItemsResponse:
        await self.auth.operator(context, Scope.READ)
        listed, token = dated_page(
            self.executor.inbox(),
            page_size(request.page_size, MAX_LIMIT),
            request.page_token,
            "ListInboxItems",
            convert.inbox_item_to_pb,
            self._budget,
        )
        return workflows_pb2.ListInboxItemsResponse(items=listed, next_page_token=token)

    @domain_errors
    async def AnswerInboxItem(
        self, request: workflows_pb2.AnswerInboxItemRequest, context: grpc.aio.ServicerContext
    ) -> workflows_pb2.WorkflowRun:
        caller = await self.auth.operator(context, Scope.SUBMIT)
        _bounded(request.comment, "comment", MAX_COMMENT, required=False)
        _bounded(request.choice, "choice", required=False)
        run = await self.executor.answer(
            _bounded(request.id, "id"),
            approve=request.approve,
            choice=request.choice,
            comment=request.comment,
            by=caller.name,
        )
        return self._run_pb(run)
