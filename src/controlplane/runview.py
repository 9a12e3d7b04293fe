"""The engine's current runs: by id, and by the worker each one was assigned to.

A worker's hello reconciles the runs the control plane thinks that worker holds. Finding them by
worker keeps a hello O(its runs); a scan of every unfinished run made connecting N workers to a
long-lived store O(N x runs), a restart with a deep queue and a thousand workers included.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar, overload

from taskrun.core.ids import RunId, WorkerId
from taskrun.core.models import Run

_T = TypeVar("_T")
_MISSING = object()


class CurrentRuns(dict[RunId, Run]):
    """The current run of each unfinished task, by id (an ordinary dict to read), and, apart,
    the ones given to each worker.

    A run is filed under its worker when it is stored with one (a reload from the store) or when
    the dispatcher tells `assigned`, and leaves with `pop` or `del`; a run's worker never changes
    after that (a retry is a new run).
    """

    __slots__ = ("_by_worker",)

    def __init__(self) -> None:
        super().__init__()
        self._by_worker: dict[WorkerId, dict[RunId, Run]] = {}

    def __setitem__(self, run_id: RunId, run: Run) -> None:
        old = self.get(run_id)
        if old is not None and old is not run:
            self._unfile(old)
        super().__setitem__(run_id, run)
        self.assigned(run)

    def __delitem__(self, run_id: RunId) -> None:
        self._unfile(super().pop(run_id))

    @overload
    def pop(self, run_id: RunId, /) -> Run: ...
    @overload
    def pop(self, run_id: RunId, default: Run, /) -> Run: ...
    @overload
    def pop(self, run_id: RunId, default: _T, /) -> Run | _T: ...
    def pop(self, run_id: RunId, default: object = _MISSING, /) -> object:
        if run_id not in self:
            if default is _MISSING:
                raise KeyError(run_id)
            return default
        run = super().pop(run_id)
        self._unfile(run)
        return run

    def _unfile(self, run: Run) -> None:
        worker_id = run.worker_id
        filed = self._by_worker.get(worker_id) if worker_id else None
        if worker_id and filed is not None and filed.get(run.id) is run:
            del filed[run.id]
            if not filed:
                del self._by_worker[worker_id]

    def assigned(self, run: Run) -> None:
        """`run` (current) was given to `run.worker_id` (nothing when it has none yet)."""
        worker_id = run.worker_id
        if worker_id:
            filed = self._by_worker.get(worker_id)
            if filed is None:
                filed = self._by_worker[worker_id] = {}
            filed[run.id] = run

    def assigned_to(self, worker_id: WorkerId) -> Iterator[Run]:
        """The current runs given to `worker_id`, in the order they were given (any status).

        Costs the runs filed under that worker, never a scan of every run; the caller may end
        them meanwhile."""
        for run in list(self._by_worker.get(worker_id, {}).values()):
            if self.get(run.id) is run:
                yield run
