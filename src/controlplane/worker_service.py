"""gRPC handlers of WorkerService: the registry of workers as operators see and steer it."""

from __future__ import annotations

import grpc
import structlog

from taskrun import convert
from taskrun.controlplane.auth import Authenticator
from taskrun.controlplane.engine import Engine
from taskrun.controlplane.pages import page_token, token_field
from taskrun.controlplane.services import MAX_PAGE_SIZE, domain_errors
from taskrun.controlplane.sizing import fitting
from taskrun.core import errors
from taskrun.core.access import AuditKind, Scope
from taskrun.core.ids import WorkerId
from taskrun.core.status import WorkerStatus
from taskrun.core.text import quoted
from taskrun.v1 import common_pb2 as pb
from taskrun.v1 import workers_pb2, workers_pb2_grpc

log = structlog.get_logger(__name__)


class WorkerService(workers_pb2_grpc.WorkerServiceServicer):
    def __init__(self, engine: Engine, auth: Authenticator) -> None:
        self.engine = engine
        self.auth = auth

    @domain_errors
    async def ListWorkers(
        self, request: workers_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> workers_pb2.ListWorkersResponse:
        await self.auth.operator(context, Scope.READ)
        try:
            statuses = {WorkerStatus(s) for s in request.statuses}
        except ValueError:
            raise errors.InvalidArgument("unknown worker status", field="statuses") from None
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            raise errors.InvalidArgument(
                f"must be between 0 and {MAX_PAGE_SIZE}", field="page_size"
            )
        size = request.page_size or len(self.engine.workers)
        after = token_field(request.page_token, "ListWorkers")
        workers = sorted(
            (
                w
                for w in self.engine.workers.values()
                if w.id > after and (not statuses or w.status in statuses)
            ),
            key=lambda w: w.id,
        )
        listed, cut = fitting(
            (
                convert.worker_to_pb(self.engine.show_health(w), self.engine.worker_runs(w.id))
                for w in workers[:size]
            ),
            self.engine.config.max_message_bytes,
        )
        more = cut or len(workers) > size
        return workers_pb2.ListWorkersResponse(
            workers=listed, next_page_token=page_token(listed[-1].id) if more else ""
        )

    @domain_errors
    async def GetWorker(
        self, request: workers_pb2.GetWorkerRequest, context: grpc.aio.ServicerContext
    ) -> pb.Worker:
        await self.auth.operator(context, Scope.READ)
        if not request.worker_id:
            raise errors.InvalidArgument("must not be empty", field="worker_id")
        worker = self.engine.workers.get(WorkerId(request.worker_id))
        if worker is None:
            raise errors.NotFound(f"no worker {quoted(request.worker_id)}", field="worker_id")
        return convert.worker_to_pb(
            self.engine.show_health(worker), self.engine.worker_runs(worker.id)
        )

    @domain_errors
    async def DrainWorker(
        self, request: workers_pb2.DrainWorkerRequest, context: grpc.aio.ServicerContext
    ) -> pb.Worker:
        principal = await self.auth.operator(context, Scope.ADMIN)
        if not request.worker_id:
            raise errors.InvalidArgument("must not be empty", field="worker_id")
        worker = self.engine.drain_worker(WorkerId(request.worker_id))
        log.info("drain requested", worker_id=worker.id, by=str(principal))
        return convert.worker_to_pb(worker, self.engine.worker_runs(worker.id))

    @domain_errors
    async def RevokeWorker(
        self, request: workers_pb2.RevokeWorkerRequest, context: grpc.aio.ServicerContext
    ) -> pb.Worker:
        principal = await self.auth.operator(context, Scope.ADMIN)
        if not request.worker_id:
            raise errors.InvalidArgument("must not be empty", field="worker_id")
        if len(request.reason) > 1024:
            raise errors.InvalidArgument("must be at most 1024 characters", field="reason")
        worker = await self.engine.revoke_worker(WorkerId(request.worker_id), request.reason)
        self.auth.access.audit(
            AuditKind.WORKER_REVOKED,
            principal=str(principal),
            subject=worker.id,
            peer=context.peer() or "",
            detail=f"worker revoked: {worker.revoked_reason}",
        )
        return convert.worker_to_pb(worker)
