"""Which pending run goes to which worker. Pure logic: no I/O, no grpc, easy to test.

A run fits a worker that announces its agent as available, has every required label, offers
the required provider/model *for that agent* (not merely for another agent of the worker), has a
free slot and is not draining or quarantined. Among runs, higher priority first, then oldest;
among fitting workers, one other than the worker that failed the previous attempt first, then
the least loaded (by share of capacity in use).

`backends_fit` and `Candidate.fits` are pure functions of (requirement, the worker's entry for
the agent), so an index by agent and free capacity can use them unchanged.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from taskrun.core.ids import RunId, TaskId, WorkerId

# agent, labels, provider, model, worker (a run may be pinned to one worker)
Requirement = tuple[str, tuple[tuple[str, str], ...], str, str, str]


@dataclass(slots=True)
class PendingRun:
    run_id: RunId
    task_id: TaskId
    agent: str
    priority: int = 0
    required_labels: tuple[tuple[str, str], ...] = ()
    provider: str = ""
    model: str = ""
    worker_id: str = ""  # only this worker may run it
    avoid: str = ""  # the worker that failed the previous attempt: another one first
    order: int = 0  # creation order; set by the queue

    @property
    def requirement(self) -> Requirement:
        return (self.agent, self.required_labels, self.provider, self.model, self.worker_id)


Backends = frozenset[tuple[str, str]]  # (provider, model_name) of one agent


def backends_fit(provider: str, model: str, backends: Iterable[tuple[str, str]]) -> bool:
    """Whether one agent's backends meet a provider/model requirement ("" = any)."""
    if not (provider or model):
        return True
    return any((not provider or p == provider) and (not model or m == model) for p, m in backends)


@dataclass(slots=True)
class Candidate:
    """What the dispatcher needs to know about a connected worker: the agents it can run now
    (unavailable ones left out), each with its own backends."""

    worker_id: WorkerId
    agents: Mapping[str, Backends]
    labels: dict[str, str]
    capacity: int
    active: int
    draining: bool = False  # draining or quarantined: no new runs

    @property
    def free(self) -> int:
        return 0 if self.draining else max(0, self.capacity - self.active)

    def fits(self, req: Requirement) -> bool:
        agent, labels, provider, model, worker_id = req
        backends = self.agents.get(agent)
        if backends is None or (worker_id and worker_id != self.worker_id):
            return False
        if any(self.labels.get(k) != v for k, v in labels):
            return False
        return backends_fit(provider, model, backends)


@dataclass(slots=True)
class _Group:
    heap: list[tuple[int, int, RunId]] = field(default_factory=list)


class PendingQueue:
    """Runs waiting for a worker, grouped by what they require."""

    def __init__(self) -> None:
        self._groups: dict[Requirement, _Group] = {}
        self._entries: dict[RunId, PendingRun] = {}
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._entries

    def add(self, run: PendingRun) -> None:
        run.order = next(self._counter)
        self._entries[run.run_id] = run
        group = self._groups.setdefault(run.requirement, _Group())
        heapq.heappush(group.heap, (-run.priority, run.order, run.run_id))

    def remove(self, run_id: RunId) -> PendingRun | None:
        """Forget a run (cancelled); its heap slot is skipped lazily."""
        return self._entries.pop(run_id, None)

    def depth_by_agent(self) -> dict[str, int]:
        depth: dict[str, int] = {}
        for entry in self._entries.values():
            depth[entry.agent] = depth.get(entry.agent, 0) + 1
        return depth

    def _head(self, group: _Group) -> tuple[int, int, RunId] | None:
        heap = group.heap
        while heap and heap[0][2] not in self._entries:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def plan(self, workers: Iterable[Candidate]) -> list[tuple[PendingRun, WorkerId]]:
        """Pop as many runs as fit the free slots, best first. Mutates `active` counts."""
        free_workers = [w for w in workers if w.free > 0]
        if not free_workers or not self._entries:
            return []
        fitting: dict[Requirement, list[Candidate]] = {}
        for req, group in list(self._groups.items()):
            if self._head(group) is None:
                del self._groups[req]
                continue
            matches = [w for w in free_workers if w.fits(req)]
            if matches:
                fitting[req] = matches
        plan: list[tuple[PendingRun, WorkerId]] = []
        while fitting:
            best_req: Requirement | None = None
            best_head: tuple[int, int, RunId] | None = None
            for req in list(fitting):
                head = self._head(self._groups[req])
                if head is None or not any(w.free > 0 for w in fitting[req]):
                    del fitting[req]
                    continue
                if best_head is None or head < best_head:
                    best_req, best_head = req, head
            if best_req is None or best_head is None:
                break
            heapq.heappop(self._groups[best_req].heap)
            entry = self._entries.pop(best_head[2])
            avoid = entry.avoid
            worker = min(
                (w for w in fitting[best_req] if w.free > 0),
                key=lambda w: (w.worker_id == avoid, w.active / w.capacity, w.active, w.worker_id),
            )
            worker.active += 1
            plan.append((entry, worker.worker_id))
        return plan
