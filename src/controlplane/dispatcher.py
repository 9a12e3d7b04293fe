"""Which pending run goes to which worker. Pure logic: no I/O, no grpc, easy to test.

A run fits a worker that announces its agent as available, has every required label, offers
the required provider/model *for that agent* (not merely for another agent of the worker), has a
free slot and is not draining or quarantined. Among runs, higher priority first, then oldest;
among fitting workers, one other than the worker that failed the previous attempt first, then
the least loaded (by share of capacity in use).

Workers are found through a `WorkerIndex`: per agent, the workers with a free slot in load
order, so a plan looks at the few least loaded candidates instead of every connected worker.
Whether a candidate may take a run is `Candidate.fits(requirement)` (with `backends_fit`), a pure
predicate applied to the candidates the index yields in order: what it checks can change without
the index.

Runs planned together go out in batches: in one plan, the worker chosen for a run also takes the
next runs of the same requirement, up to a share of the runs that were waiting for it
(`ceil(waiting / ROUND_SPREAD)`) or until its slots are full; the next batch goes to the then
least loaded worker. A single run (a trickle) therefore goes to the least loaded worker as
before, a burst of a few runs is still spread one per worker, and a burst of hundreds reaches
about `ROUND_SPREAD` workers instead of hundreds: a batch is one message to its worker and comes
back as one report, where a run per worker costs its own assignment, report and acknowledgement.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from taskrun.core.ids import RunId, TaskId, WorkerId

# A plan spreads the runs waiting for one requirement over about this many workers at most
# (fewer when fewer fit, more when their free slots run out first): see the module docstring.
# Measured with 1,000 sessions of capacity 256 (scripts/bench --idle-workers 1000), a hundred
# instant runs cost the server 0.17 ms each over 4 workers, 0.20 over 8 and 0.23 over 16
# (against 0.16 over two): per worker reached, an assignment, a report and their acks.
# The server's `dispatch_spread` setting; 0 = no batches, every run to the least loaded worker.
ROUND_SPREAD = 4

# Requirements narrower than an agent with a heap of their own in a WorkerIndex, at most; past
# that, the heaps are dropped and made again as they are asked for.
MAX_NARROW_HEAPS = 256

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

    @property
    def load(self) -> tuple[float, int]:
        """Order among candidates: share of capacity in use, then runs (then the id)."""
        return (self.active / self.capacity, self.active)

    def fits(self, req: Requirement) -> bool:
        agent, labels, provider, model, worker_id = req
        backends = self.agents.get(agent)
        if backends is None or (worker_id and worker_id != self.worker_id):
            return False
        if any(self.labels.get(k) != v for k, v in labels):
            return False
        return backends_fit(provider, model, backends)


_Entry = tuple[float, int, WorkerId]  # (share in use, active, worker) when pushed


class WorkerIndex:
    """Connected workers with a free slot, per agent, least loaded first.

    Each agent has a heap of entries; a worker gets a new entry whenever `put` is told its
    load or state changed, and an entry that no longer matches its worker is dropped when it
    reaches the top (lazy deletion; the heaps are rebuilt when stale entries pile up).

    A requirement narrower than its agent (labels, a provider or a model) gets a heap of its
    own, of the workers that fit it, made the first time it is asked for and kept up to date by
    `put`: a run only a few workers may take looks at those few, not past every worker with the
    agent that does not fit (the agent's heap would have to be popped down to them each time).
    """

    def __init__(self, workers: Iterable[Candidate] = ()) -> None:
        self._workers: dict[WorkerId, Candidate] = {}
        self._heaps: dict[str, list[_Entry]] = {}
        self._narrow: dict[str, dict[Requirement, list[_Entry]]] = {}  # by agent; see above
        self._narrowed = 0  # requirements with a heap in _narrow
        self._entries = 0
        for w in workers:
            self.put(w)

    def __len__(self) -> int:
        return len(self._workers)

    def get(self, worker_id: str) -> Candidate | None:
        return self._workers.get(WorkerId(worker_id))

    def put(self, worker: Candidate) -> None:
        """Add a worker, or note that its load, capacity, draining or agents changed."""
        self._workers[worker.worker_id] = worker
        if worker.free > 0:
            entry = (*worker.load, worker.worker_id)
            for agent in worker.agents:
                heapq.heappush(self._heaps.setdefault(agent, []), entry)
                self._entries += 1
                for req, heap in self._narrow.get(agent, {}).items():
                    if worker.fits(req):
                        heapq.heappush(heap, entry)
                        self._entries += 1
        heaps = len(self._heaps) + self._narrowed
        if self._entries > 4 * len(self._workers) * max(1, heaps) + 64:
            self._rebuild()

    def remove(self, worker_id: WorkerId) -> None:
        self._workers.pop(worker_id, None)  # its entries are dropped lazily

    def _current(self, entry: _Entry) -> Candidate | None:
        worker = self._workers.get(entry[2])
        if worker is None or worker.free <= 0 or (entry[0], entry[1]) != worker.load:
            return None
        return worker

    def pick(self, req: Requirement, avoid: str = "") -> Candidate | None:
        """The least loaded worker with a free slot that fits `req`, preferring any other than
        `avoid`; None when none fits."""
        agent, labels, provider, model, worker_id = req
        if worker_id:  # pinned to one worker
            pinned = self._workers.get(WorkerId(worker_id))
            return pinned if pinned and pinned.free > 0 and pinned.fits(req) else None
        heap = self._narrow_heap(req) if labels or provider or model else self._heaps.get(agent)
        if not heap:
            return None
        # Every current entry of this heap fits, but for a worker whose agents changed since
        # it was pushed (put pushed a new one if it fits again): dropped like a stale one.
        avoided: list[_Entry] = []  # the avoided worker's entries, put back after
        found: Candidate | None = None
        while heap:
            worker = self._current(heap[0])
            if worker is None or not worker.fits(req):
                heapq.heappop(heap)
                self._entries -= 1
            elif avoid and worker.worker_id == avoid:
                avoided.append(heapq.heappop(heap))
            else:
                found = worker
                break
        for entry in avoided:
            heapq.heappush(heap, entry)
        return found or (self._workers[avoided[0][2]] if avoided else None)

    def _narrow_heap(self, req: Requirement) -> list[_Entry]:
        heap = self._narrow.get(req[0], {}).get(req)
        if heap is None:
            if self._narrowed >= MAX_NARROW_HEAPS:  # requirements come and go: start over
                for heaps in self._narrow.values():
                    self._entries -= sum(len(h) for h in heaps.values())
                self._narrow, self._narrowed = {}, 0
            heap = [
                (*w.load, w.worker_id) for w in self._workers.values() if w.free > 0 and w.fits(req)
            ]
            heapq.heapify(heap)
            self._narrow.setdefault(req[0], {})[req] = heap
            self._narrowed += 1
            self._entries += len(heap)
        return heap

    def _rebuild(self) -> None:
        self._heaps, self._entries = {}, 0
        self._narrow, self._narrowed = {}, 0  # made again as they are asked for
        for worker in self._workers.values():
            if worker.free > 0:
                for agent in worker.agents:
                    self._heaps.setdefault(agent, []).append((*worker.load, worker.worker_id))
                    self._entries += 1
        for heap in self._heaps.values():
            heapq.heapify(heap)


@dataclass(slots=True)
class _Group:
    heap: list[tuple[int, int, RunId]] = field(default_factory=list)
    waiting: int = 0  # runs in the queue (the heap may also hold removed ones)


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
        group.waiting += 1

    def remove(self, run_id: RunId) -> PendingRun | None:
        """Forget a run (cancelled); its heap slot is skipped lazily."""
        entry = self._entries.pop(run_id, None)
        if entry is not None and (group := self._groups.get(entry.requirement)) is not None:
            group.waiting -= 1
        return entry

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

    def plan(
        self, workers: WorkerIndex | Iterable[Candidate], spread: int = ROUND_SPREAD
    ) -> list[tuple[PendingRun, WorkerId]]:
        """Pop as many runs as fit the free slots, best first, in batches per worker (see the
        module docstring). Mutates `active` counts (and tells the index)."""
        index = workers if isinstance(workers, WorkerIndex) else WorkerIndex(workers)
        if not index or not self._entries:
            return []
        live: list[Requirement] = []
        share: dict[Requirement, int] = {}
        for req, group in list(self._groups.items()):
            if self._head(group) is None:
                del self._groups[req]
            else:
                live.append(req)
                share[req] = max(1, -(-group.waiting // spread)) if spread > 0 else 1
        # per requirement: the worker taking its current batch, and how many more it may take
        batch: dict[Requirement, tuple[Candidate, int]] = {}
        plan: list[tuple[PendingRun, WorkerId]] = []
        while live:
            best_req: Requirement | None = None
            best_head: tuple[int, int, RunId] | None = None
            best_worker: Candidate | None = None
            for req in list(live):
                head = self._head(self._groups[req])
                worker = (self._batch_worker(batch, req) or index.pick(req)) if head else None
                if head is None or worker is None:
                    live.remove(req)  # nothing to run, or no free worker fits it
                    continue
                if best_head is None or head < best_head:
                    best_req, best_head, best_worker = req, head, worker
            if best_req is None or best_head is None or best_worker is None:
                break
            group = self._groups[best_req]
            heapq.heappop(group.heap)
            group.waiting -= 1
            entry = self._entries.pop(best_head[2])
            chosen = best_worker
            if entry.avoid == chosen.worker_id:  # a retry: another worker if one fits
                chosen = index.pick(best_req, avoid=entry.avoid) or chosen
            if chosen is best_worker:  # the batch goes on, or this run opens a new one
                open_ = self._batch_worker(batch, best_req) is chosen
                left = batch[best_req][1] if open_ else share[best_req]
                batch[best_req] = (chosen, left - 1)
            chosen.active += 1
            index.put(chosen)
            plan.append((entry, chosen.worker_id))
        return plan

    @staticmethod
    def _batch_worker(
        batch: dict[Requirement, tuple[Candidate, int]], req: Requirement
    ) -> Candidate | None:
        """The worker whose batch of `req` runs is still open (it has room for more)."""
        current = batch.get(req)
        if current is None or current[1] <= 0 or current[0].free <= 0:
            return None
        return current[0]
