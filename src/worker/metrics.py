"""Prometheus metrics of a worker (served by taskrun.metrics_http on --metrics-listen)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from taskrun.core.status import RunStatus


class WorkerMetrics:
    """Runs by outcome and active runs, in their own registry."""

    def __init__(self, active: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.runs = Counter(
            "taskrun_worker_runs",
            "Runs this worker finished, by outcome (completed, failed, cancelled).",
            ["outcome"],
            registry=self.registry,
        )
        self.active = Gauge(
            "taskrun_worker_active_runs",
            "Runs executing on this worker now.",
            registry=self.registry,
        )
        self.active.set_function(lambda: float(active()))

    def run_ended(self, status: RunStatus) -> None:
        self.runs.labels(status.name.lower()).inc()
