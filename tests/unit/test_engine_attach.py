"""A worker's hello reconciles the runs it holds: found through the runs given to that worker
(runview.CurrentRuns), never a scan of every run, with the same outcome as before, also after a
control-plane restart."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from taskrun.controlplane.config import ServerConfig
from taskrun.controlplane.engine import Engine
from taskrun.controlplane.runview import CurrentRuns
from taskrun.controlplane.session import WorkerSession
from taskrun.controlplane.store.memory import MemoryStore
from taskrun.core.ids import RunId, TaskId, WorkerId
from taskrun.core.models import AgentSpec, Run, TaskPolicy, TaskSpec, Worker, utcnow
from taskrun.core.status import RunStatus
from taskrun.v1 import common_pb2 as pb
from taskrun.v1 import workers_pb2 as wpb

# --- the index itself (pure) -------------------------------------------------------------------


def run(run_id: str, worker: str = "") -> Run:
    return Run(
        id=RunId(run_id),
        task_id=TaskId(f"t-{run_id}"),
        attempt=1,
        status=RunStatus.ASSIGNED if worker else RunStatus.PENDING,
        worker_id=WorkerId(worker) if worker else None,
        created_at=utcnow(),
    )


def ids(runs: CurrentRuns, worker: str) -> list[str]:
    return [r.id for r in runs.assigned_to(WorkerId(worker))]


def test_runs_are_found_by_the_worker_they_were_given_to_and_leave_with_their_run() -> None:
    runs = CurrentRuns()
    runs[RunId("r1")] = run("r1", "w-1")  # stored with its worker (a reload)
    runs[RunId("r2")] = run("r2", "w-2")
    pending = run("r3")
    runs[pending.id] = pending
    assert ids(runs, "w-1") == ["r1"] and ids(runs, "w-3") == []
    pending.worker_id = WorkerId("w-1")
    runs.assigned(pending)  # the dispatcher placed it
    assert ids(runs, "w-1") == ["r1", "r3"] and ids(runs, "w-2") == ["r2"]
    assert runs.pop(RunId("r1")).id == "r1"
    del runs[RunId("r2")]
    assert runs.pop(RunId("gone"), None) is None
    with pytest.raises(KeyError):
        runs.pop(RunId("gone"))
    assert ids(runs, "w-1") == ["r3"] and ids(runs, "w-2") == []
    assert runs._by_worker == {"w-1": {"r3": pending}}  # nothing kept for runs that left
    replaced = run("r3", "w-2")  # a reload puts a new object under the same id
    runs[replaced.id] = replaced
    assert ids(runs, "w-1") == [] and ids(runs, "w-2") == ["r3"]
    assert dict(runs) == {"r3": replaced}  # still a dict to every reader


def test_a_run_ended_while_its_workers_runs_are_read_is_not_read_again() -> None:
    runs = CurrentRuns()
    for name in ("a", "b", "c"):
        runs[RunId(name)] = run(name, "w-1")
    seen = []
    for current in runs.assigned_to(WorkerId("w-1")):
        seen.append(current.id)
        runs.pop(RunId("c"), None)  # the hello ends runs as it goes
    assert seen == ["a", "b"]


# --- the hello, through the engine -------------------------------------------------------------


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    s = MemoryStore()
    await s.open()
    yield s


def hello(worker: str, held: dict[str, int] | None = None) -> tuple[Worker, wpb.WorkerHello]:
    host = {"w-1": "a", "w-2": "b"}[worker]
    w = Worker(
        WorkerId(worker),
        agents=(AgentSpec("echo"),),
        labels={"host": host},
        max_concurrent_runs=16,
    )
    claims = [wpb.HeldRun(run_id=r, attempt=a) for r, a in (held or {}).items()]
    return w, wpb.WorkerHello(worker_id=worker, held_runs=claims)


def connect(e: Engine, worker: str, held: dict[str, int] | None = None) -> WorkerSession:
    return e.attach(*hello(worker, held))


async def place(e: Engine, host: str, n: int) -> list[RunId]:
    """`n` tasks that only the worker labelled host=`host` may take; their runs, assigned."""
    specs = [
        TaskSpec("echo", "{}", policy=TaskPolicy(required_labels={"host": host})) for _ in range(n)
    ]
    created = await e.create_tasks(specs)
    await e.flush()
    placed = [t.current_run_id for t, _ in created]
    assert all(r is not None and e.runs[r].status is RunStatus.ASSIGNED for r in placed)
    return [r for r in placed if r is not None]


def start(e: Engine, session: WorkerSession, run_ids: list[RunId]) -> None:
    statuses = [
        wpb.RunStatusUpdate(run_id=r, attempt=1, status=pb.RUN_STATUS_RUNNING) for r in run_ids
    ]
    e.handle_reports(session, wpb.WorkerMessage(statuses=statuses, message_seq=1))


async def two_workers_with_runs(
    e: Engine,
) -> tuple[list[RunId], list[RunId], WorkerSession]:
    """w-1 holds a1 running, a2 assigned, a3 running, a4 assigned, a5 running; w-2 holds b1
    assigned, b2 running. Returns the runs of each and w-2's session."""
    one, two = connect(e, "w-1"), connect(e, "w-2")
    a, b = await place(e, "a", 5), await place(e, "b", 2)
    start(e, one, [a[0], a[2], a[4]])
    start(e, two, [b[1]])
    await e.flush()
    return a, b, two


async def reconnect_w1(e: Engine, a: list[RunId], b: list[RunId]) -> WorkerSession:
    """w-1 says hello again claiming a1 and a2, a5 with an old attempt, w-2's b2 and a run
    that never existed; not a3 (running) nor a4 (assigned)."""
    claims = {a[0]: 1, a[1]: 1, a[4]: 2, b[1]: 1, "run-unknown": 1}
    session = connect(e, "w-1", claims)
    await e.flush()
    return session


async def check_reconciled(
    e: Engine, store: MemoryStore, a: list[RunId], b: list[RunId], session: WorkerSession
) -> None:
    """What the hello of `reconnect_w1` must have done, read from the store and the session."""
    assert set(session.runs) == {a[0], a[1], a[3], b[1], "run-unknown"}
    assert [m.run_id for m in session._assignments] == [a[3]]  # sent again: maybe never read
    assert {c.run_id for c in session._cancels} == {b[1], "run-unknown"}  # not its runs
    stored = {r: await store.get_run(r) for r in (*a, *b)}
    assert {r: s.status for r, s in stored.items() if s} == {
        a[0]: RunStatus.RUNNING,
        a[1]: RunStatus.ASSIGNED,
        a[2]: RunStatus.LOST,  # running, and the worker no longer has it
        a[3]: RunStatus.ASSIGNED,
        a[4]: RunStatus.LOST,  # an attempt that is not the current one
        b[0]: RunStatus.ASSIGNED,  # w-2's runs: untouched by w-1's hello
        b[1]: RunStatus.RUNNING,
    }
    assert all(s is not None and s.worker_id == "w-2" for r, s in stored.items() if r in b)
    for lost in (a[2], a[4]):
        task = await store.get_task(stored[lost].task_id)  # type: ignore[union-attr]
        assert task is not None and task.current_run_id != lost  # retried as a new run


async def test_a_hello_reattaches_exactly_the_runs_the_worker_holds(store: MemoryStore) -> None:
    e = Engine(store, ServerConfig(store="memory"))
    await e.start()
    a, b, two = await two_workers_with_runs(e)
    session = await reconnect_w1(e, a, b)
    await check_reconciled(e, store, a, b, session)
    assert set(two.runs) == set(b) and e.sessions[WorkerId("w-2")] is two
    await e.stop()


async def test_after_a_restart_a_hello_reattaches_exactly_the_runs_the_worker_holds(
    store: MemoryStore,
) -> None:
    before = Engine(store, ServerConfig(store="memory"))
    await before.start()
    a, b, _ = await two_workers_with_runs(before)
    await before.stop()
    e = Engine(store, ServerConfig(store="memory"))  # the runs come back from the store
    await e.start()
    assert set(e._orphans) == {*a, *b}  # each waits for its worker, up to the lease
    session = await reconnect_w1(e, a, b)
    await check_reconciled(e, store, a, b, session)
    assert set(e._orphans) == set(b)  # w-2 has not come back: its runs still wait for it
    await e.stop()
