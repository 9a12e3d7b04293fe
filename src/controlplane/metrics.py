"""Prometheus metrics of the control plane (served by taskrun.metrics_http on --metrics-listen).

Gauges are read from the engine at scrape time; histograms and terminal task counts are fed by
the engine's committed changes (an EventHub observer); gRPC rejections and worker stream traffic
are counted by a server interceptor, so handlers stay unaware of metrics.
"""

from __future__ import annotations

import inspect
import time
from collections import Counter as Tally
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from taskrun.controlplane.access import AccessControl
from taskrun.controlplane.engine import Engine
from taskrun.core.access import AuditKind
from taskrun.core.models import Run, Usage
from taskrun.core.status import RUN_TERMINAL, TASK_TERMINAL, RunStatus, TaskStatus, WorkerStatus
from taskrun.core.store import ChangeSet

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
DURATION_BUCKETS = (0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600, 7200)
# Rejections counted at the edge (the engine counts rejected worker reports itself).
EDGE_REJECTIONS = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid_argument",
    grpc.StatusCode.PERMISSION_DENIED: "permission_denied",
    grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
}
# The same refusals over the HTTP API, by the status of the problem answer.
HTTP_REJECTIONS = {400: "invalid_argument", 401: "unauthenticated", 403: "permission_denied"}
STREAM_METHOD = "/taskrun.v1.RunService/StreamConnect"


class ControlPlaneMetrics(Collector):
    """Every series of the control plane, in its own registry."""

    def __init__(self, engine: Engine, access: AccessControl | None = None) -> None:
        self.engine = engine
        self.access = access  # security events
        self.registry = CollectorRegistry()
        self.finished: Tally[TaskStatus] = Tally()  # tasks that ended since the start
        self.rejected: Tally[str] = Tally()
        self.dispatch_latency = Histogram(
            "taskrun_dispatch_latency_seconds",
            "Time from a run's creation to its assignment to a worker.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.run_duration = Histogram(
            "taskrun_run_duration_seconds",
            "Time from a run's start (or assignment) to its end, by agent and outcome.",
            ["agent", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self._durations: dict[tuple[str, RunStatus], Histogram] = {}
        self.stream_in = Counter(
            "taskrun_stream_messages_received",
            "WorkerMessages received on worker sessions (StreamConnect).",
            registry=self.registry,
        )
        self.stream_out = Counter(
            "taskrun_stream_messages_sent",
            "ServerMessages sent on worker sessions (StreamConnect).",
            registry=self.registry,
        )
        self.tokens = Counter(
            "taskrun_tokens",
            "Model tokens spent by finished runs (failed and cancelled ones too, where the agent "
            "reported them), by agent, model and kind (input, output, cache_read, "
            "cache_creation).",
            ["agent", "model", "kind"],
            registry=self.registry,
        )
        self.cost = Counter(
            "taskrun_cost_usd",
            "Cost in US dollars of finished runs, by agent and model: each run's own spending "
            "(never a session's running total).",
            ["agent", "model"],
            registry=self.registry,
        )
        self.worker_cost = Counter(
            "taskrun_worker_cost_usd",
            "Cost in US dollars of finished runs, by worker (per day: increase over 1d).",
            ["worker"],
            registry=self.registry,
        )
        self.registry.register(self)
        engine.events.observe(self.observe)

    # --- fed by committed changes ------------------------------------------------------------

    def observe(self, captured: ChangeSet) -> None:
        # a change set may list one object twice (created, then assigned in the same commit)
        tasks = {t.id: t for t in captured.tasks}
        for task in tasks.values():
            if task.status in TASK_TERMINAL:
                self.finished[task.status] += 1
        for run in {r.id: r for r in captured.runs}.values():
            status = run.status
            if status is RunStatus.ASSIGNED:
                if run.assigned_at and run.created_at:
                    latency = (run.assigned_at - run.created_at).total_seconds()
                    self.dispatch_latency.observe(max(latency, 0.0))
            elif status in RUN_TERMINAL and run.finished_at:
                owner = tasks.get(run.task_id) or self.engine.tasks.get(run.task_id)
                agent = owner.agent if owner is not None else "unknown"
                self._count_usage(agent, run)
                began = run.started_at or run.assigned_at
                if began is None:
                    continue  # never reached a worker (cancelled or failed in the queue)
                self._run_duration(agent, status).observe(
                    max((run.finished_at - began).total_seconds(), 0.0)
                )
        for late in captured.late_usage:  # a cancelled run's spending, reported after its end
            self._count(late.agent, late.model, late.worker_id, late.usage)

    def _run_duration(self, agent: str, status: RunStatus) -> Histogram:
        """The duration histogram of one agent and outcome: looked up once, then kept (labels()
        checks and locks on every call, and this is asked once per finished run)."""
        key = (agent, status)
        child = self._durations.get(key)
        if child is None:
            child = self._durations[key] = self.run_duration.labels(agent, status.name.lower())
        return child

    def _count_usage(self, agent: str, run: Run) -> None:
        model = run.backend_used.model_name if run.backend_used else ""
        self._count(agent, model, run.worker_id or "", run.usage)

    def _count(self, agent: str, model: str, worker_id: str, usage: Usage) -> None:
        if usage.empty:
            return
        for kind, count in (
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
            ("cache_read", usage.cache_read_tokens),
            ("cache_creation", usage.cache_creation_tokens),
        ):
            if count > 0:
                self.tokens.labels(agent, model, kind).inc(count)
        if usage.cost_usd > 0:
            self.cost.labels(agent, model).inc(usage.cost_usd)
            self.worker_cost.labels(worker_id).inc(usage.cost_usd)

    # --- read at scrape time -----------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        engine = self.engine
        tasks = GaugeMetricFamily(
            "taskrun_tasks",
            "Tasks by status: pending and running now; completed, failed and cancelled since "
            "this control plane started.",
            labels=["status"],
        )
        live = Tally(t.status for t in engine.tasks.values())
        for status in TaskStatus:
            count = self.finished[status] if status.terminal else live[status]
            tasks.add_metric([status.name.lower()], count)
        yield tasks
        depth = GaugeMetricFamily(
            "taskrun_queue_depth", "Runs waiting for a worker, by agent.", labels=["agent"]
        )
        for agent, count in sorted(engine.queue.depth_by_agent().items()):
            depth.add_metric([agent], count)
        yield depth
        workers = GaugeMetricFamily(
            "taskrun_workers", "Known workers by status.", labels=["status"]
        )
        by_status = Tally(w.status for w in engine.workers.values())
        for ws in WorkerStatus:
            workers.add_metric([ws.name.lower()], by_status[ws])
        yield workers
        rejected = CounterMetricFamily(
            "taskrun_rejected_requests",
            "Requests refused, by reason: stale_report (a worker report for a run that is not "
            "current), invalid_argument, permission_denied, unauthenticated (over gRPC, and "
            "over HTTP as 400, 403 and 401).",
            labels=["reason"],
        )
        rejected.add_metric(["stale_report"], engine.rejected_reports)
        for reason in EDGE_REJECTIONS.values():
            rejected.add_metric([reason], self.rejected[reason])
        yield rejected
        expiry = GaugeMetricFamily(
            "taskrun_worker_certificate_expiry_timestamp_seconds",
            "When the certificate of each connected worker's session expires (Unix time); "
            "alert when it comes near: renewal should have replaced it at 70-90 % of its life.",
            labels=["worker"],
        )
        for worker_id, session in sorted(engine.sessions.items()):
            expires = session.worker.certificate_expires_at
            if expires is not None:
                expiry.add_metric([worker_id], expires.timestamp())
        yield expiry
        yield from self._health_and_budgets()
        if self.access is not None:
            security = CounterMetricFamily(
                "taskrun_security_events",
                "Audit events by kind since this control plane started (enrollments, renewals, "
                "revocations, token changes, refusals), including refusals not stored.",
                labels=["kind"],
            )
            for kind in AuditKind:
                security.add_metric([kind.value], self.access.event_counts[kind])
            yield security

    def _health_and_budgets(self) -> Iterable[Metric]:
        engine = self.engine
        now = time.monotonic()
        quarantined = GaugeMetricFamily(
            "taskrun_worker_quarantined",
            "1 while a worker is quarantined by its circuit breaker (runs failing fast), else 0; "
            "connected workers.",
            labels=["worker"],
        )
        for worker_id in sorted(engine.sessions):
            quarantined.add_metric([worker_id], int(engine.health.quarantined(worker_id, now)))
        yield quarantined
        trips = CounterMetricFamily(
            "taskrun_worker_quarantines",
            "Quarantines begun since this control plane started.",
        )
        trips.add_metric([], engine.health.quarantines)
        yield trips
        spent = GaugeMetricFamily(
            "taskrun_budget_spent_usd",
            "Spending today (UTC) against each daily budget, by kind (label, schedule) and key.",
            labels=["kind", "key"],
        )
        limit = GaugeMetricFamily(
            "taskrun_budget_limit_usd",
            "Each daily budget, by kind and key.",
            labels=["kind", "key"],
        )
        for cap in engine.budgets.caps():
            spent.add_metric([cap.kind, cap.key], cap.spent_usd)
            limit.add_metric([cap.kind, cap.key], cap.limit_usd)
        yield spent
        yield limit

    # --- the gRPC edge -----------------------------------------------------------------------

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        return _EdgeInterceptor(self)

    def note_http_status(self, status: int) -> None:
        reason = HTTP_REJECTIONS.get(status)
        if reason is not None:
            self.rejected[reason] += 1

    def note_code(self, code: object) -> None:
        reason = EDGE_REJECTIONS.get(code) if isinstance(code, grpc.StatusCode) else None
        if reason is not None:
            self.rejected[reason] += 1


class _EdgeContext:
    """The servicer context a handler sees: a refusal is counted before its status leaves.

    grpc's `abort` sends the status and only then raises, so counting as the handler ends
    would let a caller see its refusal, scrape, and not find it. A status set without abort
    is sent after the handler returns, and is counted then (`finish`)."""

    __slots__ = ("_context", "_metrics", "_noted")

    def __init__(self, context: grpc.aio.ServicerContext, metrics: ControlPlaneMetrics) -> None:
        self._context = context
        self._metrics = metrics
        self._noted = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", *args: Any, **kwargs: Any
    ) -> None:
        if not self._noted:
            self._noted = True
            self._metrics.note_code(code)
        await self._context.abort(code, details, *args, **kwargs)  # trailing_metadata=…

    def refused(self, code: grpc.StatusCode) -> None:
        """A request refused in band on a multiplexed stream (the call goes on)."""
        self._metrics.note_code(code)

    def finish(self) -> None:
        if not self._noted:
            self._noted = True
            self._metrics.note_code(self._context.code())


class _CountingContext(_EdgeContext):
    """The context of a worker session, which also counts the messages read and written."""

    __slots__ = ()

    async def read(self) -> Any:
        message = await self._context.read()
        if message is not grpc.aio.EOF:
            self._metrics.stream_in.inc()
        return message

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self._metrics.stream_out.inc()


class _EdgeInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, metrics: ControlPlaneMetrics) -> None:
        self.metrics = metrics
        # a method's handler is the same object call after call: wrap it once
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        known = self._wrapped.get(details.method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap_handler(handler, details.method)
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped

    def _wrap_handler(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        counting = method == STREAM_METHOD
        for name in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, name)
            if behavior is not None:
                wrapped = self._wrap(behavior, counting)
                return handler._replace(**{name: wrapped})
        return handler

    def _wrap(self, behavior: Callable[..., Any], counting: bool) -> Callable[..., Any]:
        metrics = self.metrics

        edge = _CountingContext if counting else _EdgeContext

        if inspect.isasyncgenfunction(behavior):

            async def streaming(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                inner = edge(context, metrics)
                try:
                    async for item in behavior(request, inner):
                        yield item
                finally:
                    inner.finish()

            return streaming

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            inner = edge(context, metrics)
            try:
                return await behavior(request, inner)
            finally:
                inner.finish()

        return unary
