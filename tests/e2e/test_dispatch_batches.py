"""Placement with real processes: a burst goes out in batches per worker, a trickle is spread
least loaded, and no worker ever holds more runs than its capacity.

Everything is asserted from what the control plane stored (each run's worker, assignment and end
times), never from speed.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime

import pytest

from taskrun.cli.client import Client
from taskrun.core.models import Run, TaskSpec
from taskrun.core.status import RunStatus, TaskStatus
from tests.e2e.test_faults import Processes, online, procs

pytestmark = pytest.mark.e2e

__all__ = ["procs"]  # the fixture, imported for these tests

WORKERS = ("worker-1", "worker-2", "worker-3")  # ties in load go by id: in this order
CAPACITY = 8
SLOW = json.dumps({"text": "ab", "chunks": 2, "delay": 1.0})  # about a second each
SPREAD = 16  # --dispatch-spread: with 48 runs waiting, batches of 3


async def runs_of(client: Client, task_ids: Sequence[str]) -> list[Run]:
    """The only run of each task, in the tasks' order (each completed at its first attempt)."""
    out = []
    for task_id in task_ids:
        task = await client.wait(task_id)
        assert task.status is TaskStatus.COMPLETED, task.error
        _, runs = await client.get_task(task_id)
        assert [r.status for r in runs] == [RunStatus.COMPLETED]
        out.append(runs[0])
    return out


def most_held_at_once(runs: list[Run]) -> dict[str, int]:
    """Per worker, the most runs it held at one time: from assignment until the end was stored
    (a slot freed by an end may be refilled in the same commit, at the same instant)."""
    moments: dict[str, list[tuple[datetime, int]]] = defaultdict(list)
    for run in runs:
        assert run.worker_id and run.assigned_at and run.finished_at
        moments[run.worker_id] += [(run.assigned_at, 1), (run.finished_at, -1)]
    most: dict[str, int] = {}
    for worker_id, events in moments.items():
        held = peak = 0
        for _, change in sorted(events):  # at the same instant an end (-1) sorts first
            held += change
            peak = max(peak, held)
        most[worker_id] = peak
    return most


async def test_a_burst_is_packed_per_worker_and_a_trickle_is_spread_least_loaded(
    procs: Processes,
) -> None:
    procs.start_server("--dispatch-spread", str(SPREAD))
    for worker_id in WORKERS:
        procs.start_worker(worker_id, CAPACITY)
    async with procs.client() as client:
        await online(client, *WORKERS)

        # A burst: twice the fleet's slots in one CreateTasks, so one plan places 24 at once.
        burst = 2 * CAPACITY * len(WORKERS)
        created = await client.create_tasks([TaskSpec(agent="echo", input=SLOW)] * burst)
        runs = await runs_of(client, [t.id for t in created])

        assert -(-burst // SPREAD) == 3  # runs per batch
        first = runs[: CAPACITY * len(WORKERS)]
        assert len({r.assigned_at for r in first}) == 1  # one plan placed them all
        # consecutive runs in batches of three on one worker, the least loaded worker next; the
        # last batches stop at two, where a worker's eight slots are full
        one, two, three = WORKERS
        batches = [one] * 3 + [two] * 3 + [three] * 3
        assert [r.worker_id for r in first] == [
            *batches,
            *batches,
            one,
            one,
            two,
            two,
            three,
            three,
        ]
        assert set(most_held_at_once(runs).values()) == {CAPACITY}  # full, never over

        # A trickle: one task per call, each its own plan, all still running when the next
        # comes: each goes to the least loaded worker, so they go round the fleet.
        trickle = [(await client.create_task("echo", SLOW)).id for _ in range(2 * len(WORKERS))]
        spread = await runs_of(client, trickle)
        assert [r.worker_id for r in spread] == [*WORKERS, *WORKERS]
        assigned = [r.assigned_at for r in spread if r.assigned_at]
        assert len(assigned) == len(spread)
        assert all(a < b for a, b in itertools.pairwise(assigned))
        assert max(assigned) < min(r.finished_at for r in spread if r.finished_at)


async def test_a_server_told_not_to_batch_places_a_burst_one_run_per_worker(
    procs: Processes,
) -> None:
    procs.start_server("--dispatch-spread", "0")
    for worker_id in WORKERS:
        procs.start_worker(worker_id, CAPACITY)
    async with procs.client() as client:
        await online(client, *WORKERS)
        created = await client.create_tasks([TaskSpec(agent="echo", input=SLOW)] * 6)
        runs = await runs_of(client, [t.id for t in created])
        assert len({r.assigned_at for r in runs}) == 1  # one plan
        assert [r.worker_id for r in runs] == [*WORKERS, *WORKERS]
