"""Two control planes on one PostgreSQL database, as real processes, with real workers.

The promise: exactly one control plane leads; when it dies (kill -9) or is frozen past its
lease (SIGSTOP) the standby takes over within 10 s with the default leadership lease, workers
and clients move to it, every task ends exactly once, no two attempts of a task overlap (from
the stored timestamps), and output is complete, with nothing repeated, also for a client that
was following a task across the failover.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from taskrun.cli.client import Client, EventKind, FleetEvent, OutputReceived
from taskrun.cli.status_cmd import cluster_status
from taskrun.controlplane.pki import PkiPaths
from taskrun.core.models import Run, Task, TaskPolicy, TaskSpec
from taskrun.core.status import RunStatus, TaskStatus
from tests.e2e.test_faults import Processes, attempts_never_overlap, online, until
from tests.postgres import PostgresServer, postgres_or_skip

pytestmark = pytest.mark.e2e

T = TypeVar("T")


class TwoControlPlanes(Processes):
    """Control planes "a" and "b" on one database; workers and clients know both addresses."""

    def __init__(self, pki: PkiPaths, tmp: Path, store: str) -> None:
        super().__init__(pki, tmp)
        self.store = store
        self.ports = {"a": self.port, "b": self.reserve_port()}  # with --public-listen ""
        self.servers: dict[str, subprocess.Popen[bytes]] = {}
        self.env["TASKRUN_SERVER"] = self.addresses
        self.env["TASKRUN_METRICS_LISTEN"] = ""

    @property
    def addresses(self) -> str:
        return ",".join(self.address(name) for name in ("a", "b"))

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def start_control_plane(self, name: str, *flags: str) -> None:
        self.servers[name] = self._spawn(
            f"server-{name}",
            "server",
            "--listen",
            self.address(name),
            "--public-listen",
            "",
            "--store",
            self.store,
            *flags,
        )

    def client(self) -> Client:
        return Client(
            self.addresses,
            ca=self.pki.ca_cert.read_bytes(),
            cert=self.pki.operator_cert.read_bytes(),
            key=self.pki.operator_key.read_bytes(),
            timeout=20,
        )

    def one(self, name: str) -> Client:
        return Client(
            self.address(name),
            ca=self.pki.ca_cert.read_bytes(),
            cert=self.pki.operator_cert.read_bytes(),
            key=self.pki.operator_key.read_bytes(),
            timeout=5,
        )

    async def serving(self, name: str) -> bool:
        with contextlib.suppress(grpc.aio.AioRpcError, TimeoutError):
            async with self.one(name) as client:
                reply = await health_pb2_grpc.HealthStub(client.channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
        return False

    async def standing_by(self, name: str) -> bool:
        with contextlib.suppress(grpc.aio.AioRpcError, TimeoutError):
            async with self.one(name) as client:
                reply = await health_pb2_grpc.HealthStub(client.channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
                return bool(reply.status == health_pb2.HealthCheckResponse.NOT_SERVING)
        return False

    def stop(self) -> None:
        for proc in self.servers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
        self.server = None
        procs = [*self.workers.values(), *self.servers.values()]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.release()


@pytest.fixture
def database() -> Iterator[PostgresServer]:
    server = PostgresServer(postgres_or_skip())
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
async def cps(
    pki: PkiPaths, tmp_path: Path, database: PostgresServer
) -> AsyncIterator[TwoControlPlanes]:
    p = TwoControlPlanes(pki, tmp_path, database.url)
    try:
        yield p
    finally:
        p.stop()


async def leader_and_standby(
    cps: TwoControlPlanes, *flags: str, workers: dict[str, int] | None = None
) -> None:
    """Start "a", wait until it leads, then "b" and the `workers` (id: capacity), which start
    while "b" does, and wait until "b" stands by."""
    cps.start_control_plane("a", *flags)
    await until(lambda: cps.serving("a"), within=40)
    cps.start_control_plane("b", *flags)
    for worker_id, capacity in (workers or {}).items():
        cps.start_worker(worker_id, capacity)
    await until(lambda: cps.standing_by("b"), within=40)


async def output_of(client: Client, task_id: str) -> dict[str, str]:
    by_run: dict[str, str] = {}
    async for event in client.follow(task_id, follow=False):
        if isinstance(event, OutputReceived):
            by_run[event.chunk.run_id] = by_run.get(event.chunk.run_id, "") + event.chunk.data
    return by_run


async def test_kill_9_of_the_leader_the_standby_takes_over_within_10s_and_nothing_is_lost(
    cps: TwoControlPlanes,
) -> None:
    # the default leases: on PostgreSQL the workers' one outlasts a takeover, so that they
    # reclaim their runs (one attempt each)
    await leader_and_standby(cps, workers={"worker-1": 4, "worker-2": 4})
    async with cps.client() as client:
        await online(client, "worker-1", "worker-2")
        texts = [f"<{n}:" + "".join(f"[{i:02d}]" for i in range(30)) + ">" for n in range(6)]
        tasks = [
            await client.create_task("echo", {"text": t, "chunks": 30, "delay": 0.15})
            for t in texts
        ]

        async def all_running() -> bool:
            found = [await client.get_task(t.id) for t in tasks]
            return all(runs and runs[-1].status is RunStatus.RUNNING for _, runs in found)

        await until(all_running)
        followed: list[str] = []
        finals: list[TaskStatus] = []

        async def follow() -> None:
            async with cps.client() as follower:
                async for event in follower.follow(tasks[0].id):
                    if isinstance(event, OutputReceived):
                        followed.append(event.chunk.data)
                    elif event.task.status.terminal:
                        finals.append(event.task.status)

        watched: list[FleetEvent] = []

        async def watch() -> None:
            left = {t.id for t in tasks}
            async with cps.client() as watcher:
                async for event in watcher.watch_events(snapshot=True, include_output=True):
                    watched.append(event)
                    if event.task is not None and event.task.status.terminal:
                        left.discard(event.task.id)
                        if not left:
                            return

        following = asyncio.create_task(follow())
        watching = asyncio.create_task(watch())
        await asyncio.sleep(0.5)
        assert followed, "the follow stream is live before the kill"
        killed_at = time.monotonic()
        cps.servers["a"].kill()  # kill -9 of the leader
        await until(lambda: cps.serving("b"), within=15)
        took_over = time.monotonic() - killed_at
        results = [await asyncio.wait_for(client.wait(t.id), 60) for t in tasks]
        await asyncio.wait_for(following, 30)
        await asyncio.wait_for(watching, 30)
        status = await cluster_status(client)
        runs_of = {t.id: (await client.get_task(t.id))[1] for t in tasks}
        shown = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "taskrun.cli.main",
            "status",
            "--output",
            "json",
            env=cps.env,
            stdout=asyncio.subprocess.PIPE,
        )
        shown_out, _ = await asyncio.wait_for(shown.communicate(), 60)
        assert shown.returncode == 0
        outputs = {t.id: await output_of(client, t.id) for t in tasks}

    assert took_over < 10.0, f"the standby took {took_over:.1f}s to take over"
    assert status.epoch == 2 and status.leader_address == cps.address("b")
    doc = json.loads(shown_out)  # `taskrun status`, through the list of both addresses
    assert doc["epoch"] == 2 and doc["leader_address"] == cps.address("b")
    assert {p["address"]: p["role"] for p in doc["control_planes"]}[cps.address("b")] == "leader"
    assert [r.status for r in results] == [TaskStatus.COMPLETED] * len(tasks)
    assert [r.attempts for r in results] == [1] * len(tasks)  # the workers reclaimed them
    for task, text in zip(tasks, texts, strict=True):
        runs = runs_of[task.id]
        assert [r.status for r in runs] == [RunStatus.COMPLETED]
        assert outputs[task.id] == {runs[0].id: text}  # whole, each chunk once
    assert "".join(followed) == texts[0]  # the follower missed and repeated nothing
    assert finals == [TaskStatus.COMPLETED]
    # the event watcher went on from its position on the new leader: the changes it saw are
    # the log's positions one after another (none missed, none twice), each task ended once
    changes = [e for e in watched if not e.snapshot]
    positions = [e.position for e in changes]
    start = next(e.position for e in watched if e.kind is EventKind.SNAPSHOT_END)
    assert positions == list(range(start + 1, start + 1 + len(positions)))
    ended = [e.task.id for e in changes if e.task is not None and e.task.status.terminal]
    assert sorted(ended) == sorted(t.id for t in tasks)
    # output too: from where the watch began to the end, each chunk once, none missed
    chunks = [e.chunk for e in changes if e.chunk is not None and e.chunk.task_id == tasks[1].id]
    seqs = [c.seq for c in chunks]
    assert seqs and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert texts[1].endswith("".join(c.data for c in chunks))


async def test_a_leader_frozen_past_its_lease_is_deposed_and_steps_down_when_it_wakes(
    cps: TwoControlPlanes,
) -> None:
    await leader_and_standby(cps, workers={"worker-1": 4})
    async with cps.client() as client:
        await online(client, "worker-1")
        text = "".join(f"({i:02d})" for i in range(30))
        task = await client.create_task(
            "echo", {"text": text, "chunks": 30, "delay": 0.2}, max_attempts=3
        )

        async def running() -> bool:
            _, runs = await client.get_task(task.id)
            return bool(runs) and runs[-1].status is RunStatus.RUNNING

        await until(running)
        frozen = cps.servers["a"]
        frozen.send_signal(signal.SIGSTOP)
        try:
            await until(lambda: cps.serving("b"), within=15)
            final = await asyncio.wait_for(client.wait(task.id), 60)
            _, runs_before = await client.get_task(task.id)
            other = await client.create_task("echo", {"text": "during"})
        finally:
            frozen.send_signal(signal.SIGCONT)
        # it wakes: its lease ran out by its own clock, a newer epoch leads: it stands by
        await until(lambda: cps.standing_by("a"), within=15)
        await asyncio.sleep(1.0)  # anything it still tried to write would land by now
        after, runs_after = await client.get_task(task.id)
        status = await cluster_status(client)
        other_final = await asyncio.wait_for(client.wait(other.id), 30)
        outputs = await output_of(client, task.id)

    assert final.status is TaskStatus.COMPLETED and after == final
    assert runs_after == runs_before  # not one row changed by the deposed leader
    assert attempts_never_overlap(runs_after)
    completed = [r for r in runs_after if r.status is RunStatus.COMPLETED]
    assert len(completed) == 1 and outputs[completed[0].id] == text
    assert status.epoch == 2 and status.leader_address == cps.address("b")
    assert {p.address: p.leader for p in status.control_planes} == {
        cps.address("a"): False,
        cps.address("b"): True,
    }
    assert other_final.status is TaskStatus.COMPLETED
    log = (cps.tmp / "server-a.log").read_text()
    assert "stepping down" in log


async def test_the_database_restarted_under_the_leader_writes_fail_cleanly_then_resume(
    cps: TwoControlPlanes, database: PostgresServer
) -> None:
    # a worker lease longer than the outage: the worker keeps its runs through it
    flags = ("--lease", "30", "--heartbeat-interval", "1")
    await leader_and_standby(cps, *flags, workers={"worker-1": 4})
    async with cps.client() as client:
        await online(client, "worker-1")
        texts = [f"<{n}:" + "abcdefghij" * 3 + ">" for n in range(4)]
        tasks = [
            await client.create_task("echo", {"text": t, "chunks": 10, "delay": 0.3}) for t in texts
        ]

        async def all_running() -> bool:
            found = [await client.get_task(t.id) for t in tasks]
            return all(runs and runs[-1].status is RunStatus.RUNNING for _, runs in found)

        await until(all_running)
        database.stop()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await cps.one("a").create_task("echo", {"text": "while down"})
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        async def stepped_down() -> bool:  # its leadership lease ran out unrenewed
            return "stepping down" in (cps.tmp / "server-a.log").read_text()

        await until(stepped_down, within=15)
        database.start()

        async def one_leads() -> bool:
            return await cps.serving("a") or await cps.serving("b")

        await until(one_leads, within=30)
        finals = [await asyncio.wait_for(client.wait(t.id), 60) for t in tasks]
        outputs = {t.id: await output_of(client, t.id) for t in tasks}
        runs_of = {t.id: (await client.get_task(t.id))[1] for t in tasks}
    assert [f.status for f in finals] == [TaskStatus.COMPLETED] * 4
    for task, text in zip(tasks, texts, strict=True):
        runs = runs_of[task.id]
        assert attempts_never_overlap(runs)
        completed = [r for r in runs if r.status is RunStatus.COMPLETED]
        assert len(completed) == 1 and outputs[task.id][completed[0].id] == text


SOAK_TASKS = 500


async def test_soak_500_tasks_random_kill_9_of_the_leader_and_of_workers(
    cps: TwoControlPlanes,
) -> None:
    """Every task ends exactly once, no two attempts overlap, output complete."""
    short: tuple[str, ...] = ("--leader-lease", "1", "--lease", "2", "--heartbeat-interval", "0.5")
    short += ("--lease-margin", "0.2")
    workers = ["worker-1", "worker-2", "worker-3"]
    await leader_and_standby(cps, *short, workers=dict.fromkeys(workers, 16))
    rng = random.Random(18)
    texts = [f"<{n}:" + "xyz" * rng.randint(1, 8) + ">" for n in range(SOAK_TASKS)]
    async with cps.client() as client:
        await online(client, *workers)
        kills = {"control plane": 0, "worker": 0}

        async def chaos() -> None:
            """The leader, then workers twice, at random moments while the tasks run, until
            the leader was killed twice and workers four times (a fixed count: whether the
            kills happen never depends on how fast the tasks go)."""
            turn = 0
            while kills["control plane"] < 2 or kills["worker"] < 4:
                await asyncio.sleep(rng.uniform(0.4, 1.2))
                if turn % 3 == 0:
                    serving = [n for n in ("a", "b") if await cps.serving(n)]
                    if not serving:
                        continue
                    leader = serving[0]
                    cps.servers[leader].kill()
                    cps.servers[leader].wait()
                    kills["control plane"] += 1
                    cps.start_control_plane(leader, *short)  # back as a standby
                else:
                    victim = rng.choice(workers)
                    cps.workers[victim].kill()
                    cps.workers[victim].wait()
                    kills["worker"] += 1
                    cps.start_worker(victim, capacity=16)
                turn += 1

        chaotic = asyncio.create_task(chaos())
        policy = TaskPolicy(max_attempts=20)
        ids: list[str] = []
        for start in range(0, SOAK_TASKS, 50):
            specs = [
                TaskSpec(
                    agent="echo",
                    input=f'{{"text": "{texts[n]}", "chunks": 3, "delay": 0.15}}',
                    labels={},
                    policy=TaskPolicy(
                        max_attempts=policy.max_attempts, idempotency_key=f"soak-{n}"
                    ),
                )
                for n in range(start, start + 50)
            ]
            ids.extend(t.id for t in await _submit(client, specs))
        assert len(set(ids)) == SOAK_TASKS

        async def all_done() -> bool:
            with contextlib.suppress(grpc.aio.AioRpcError):
                listed, _ = await client.list_tasks(
                    statuses=[TaskStatus.PENDING, TaskStatus.RUNNING], limit=1
                )
                return not listed
            return False

        await asyncio.wait_for(chaotic, 60)
        await until(all_done, within=150)
        reading = asyncio.Semaphore(32)

        async def result_of(task_id: str) -> tuple[Task, list[Run], dict[str, str]]:
            async with reading:
                task, runs = await _retrying(lambda: client.get_task(task_id))
                return task, runs, await _retrying(lambda: output_of(client, task_id))

        results = await asyncio.gather(*(result_of(task_id) for task_id in ids))

    assert kills["control plane"] >= 2 and kills["worker"] >= 2, kills
    assert any(len(runs) > 1 for _, runs, _ in results)  # the kills did cost attempts
    for n, (task, runs, outputs) in enumerate(results):
        assert task.status is TaskStatus.COMPLETED, (task.id, task.status, task.error)
        completed = [r for r in runs if r.status is RunStatus.COMPLETED]
        assert len(completed) == 1, (task.id, [r.status for r in runs])
        assert runs[-1] == completed[0]
        assert attempts_never_overlap(runs), task.id
        assert outputs[completed[0].id] == texts[n], task.id


async def _retrying(call: Callable[[], Awaitable[T]]) -> T:
    """A read, repeated while a takeover is under way."""
    for _ in range(40):
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            await asyncio.sleep(0.5)
    return await call()


async def _submit(client: Client, specs: list[TaskSpec]) -> list[Task]:
    """Idempotency keys make a submission repeatable when its answer was lost to a kill."""
    return await _retrying(lambda: client.create_tasks(specs))
