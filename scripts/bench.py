"""Benchmark TaskRun on this machine against a bare grpc.aio baseline measured in the same run.

1. A temporary PKI and store: a SQLite file, or with --store postgresql a throwaway PostgreSQL
   server (initdb + pg_ctl on a free loopback port, fsync on, as the tests start it).
2. Baseline: a bare grpc.aio server (a subprocess, the same mTLS certificates, raw bytes, no
   protobuf): sequential unary round trips, one bidi stream carrying small messages one way,
   and the relays through a bare worker process (bench_bare.py): a call per request or every
   request on one client stream, each bare and with TaskRun's two SQLite commits (the stored
   stream relay is the latency figure's floor).
3. The real control plane and two workers, as subprocesses started through the `taskrun` CLI.
4. Throughput: echo tasks submitted by concurrent clients with CreateTasks, timed from the first
   submit until ListTasks finds no PENDING or RUNNING task.
5. Latency: sequential tasks through Client.submit_and_follow (each a request on the client's
   one SubmitTasks stream) until the task is COMPLETED. A follow that has not delivered the end
   after --follow-timeout is counted apart (and the task looked up).
   Then, unmeasured, where the time went: the p50 of each stage between the times stored with
   each task and run (created, assigned, started, finished) and the client's clock at either end.
6. The command line (bench_cli.py): `taskrun task create echo --follow` as a new process, and
   the HTTP API and MCP (bench_reach.py): GET /v1/tasks/{id}, a page of 50 from GET /v1/tasks
   and MCP create_task with wait,
   against the latency figure's control plane.
7. Failover (scripts/bench_failover.py): from `kill -9` of a worker, and from a silent network
   cut, to the run's next attempt RUNNING on another worker, with the default lease.

It prints a table (or, with --json, one JSON document) and never asserts. Everything listens on
127.0.0.1, lives in a temporary directory and stops by itself within --timeout seconds.
With --profile DIR, py-spy (if installed; not a project dependency) records the server and the
workers during each measured window into DIR/<phase>-<process>.txt, as collapsed stacks
(one line per stack and its sample count; flamegraph.pl or speedscope render them).

Apart, beside this file: the figures, aims and table (bench_report.py), the bare baseline
(bench_bare.py), the fleet of --idle-workers (bench_fleet.py), failover (bench_failover.py), the
command line (bench_cli.py), the HTTP API and MCP (bench_reach.py), child processes
(benchprocs.py) and a --compare-ref side (bench_compare.py). Why the phases stay in one
module: they share the control planes they start, the sides that take turns and the CPU
accounting, and `bench()` interleaves them.
"""

from __future__ import annotations

# First, so that this process (the clients measured) and the ones it starts use the same gRPC
# endpoints as TaskRun's own processes (taskrun.grpc_transport): grpc picks them as it loads.
import taskrun  # noqa: F401

# isort: split
import argparse
import asyncio
import contextlib
import functools
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from bench_bare import measure_baseline, measure_relay, start_baseline
from bench_cli import measure_cli
from bench_compare import Side, ref_side, this_side
from bench_failover import FAILOVER_WORKERS, MAX_ROUNDS, measure_failover
from bench_fleet import (
    Fleet,
    fleet_counts,
    fleet_ids,
    fleet_messages,
    rss_mb,
    start_fleet,
    wait_online,
)
from bench_reach import measure_reach
from bench_report import (
    METHOD,
    STAGES,
    WORKER_IDS,
    DeepQueue,
    Latency,
    Report,
    SequentialLatency,
    Throughput,
    ratios,
    report,
    targets,
)
from benchprocs import (  # scripts/ is on sys.path: this file runs as a script
    STOP_GRACE,
    BenchError,
    Child,
    clients,
    cpu_seconds,
    free_port,
    note,
    spawn,
    stop,
    tail,
    taskrun_argv,
    until,
)

from taskrun.cli.client import Client, TaskChanged
from taskrun.controlplane.pki import PkiPaths, init_pki
from taskrun.core.models import Task, TaskSpec
from taskrun.core.status import TaskStatus, WorkerStatus

ECHO_INPUT = '{"text":"x"}'
NON_TERMINAL = (TaskStatus.PENDING, TaskStatus.RUNNING)
SCRIPT = Path(__file__).resolve()


# --- arguments ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Measure TaskRun end to end against a bare grpc.aio baseline on this machine.",
    )
    p.add_argument("--tasks", type=int, default=5000, help="echo tasks for throughput (5000)")
    p.add_argument("--clients", type=int, default=4, help="concurrent submitting clients (4)")
    p.add_argument("--batch", type=int, default=100, help="tasks per CreateTasks call (100)")
    p.add_argument(
        "--latency-tasks", type=int, default=300, help="sequential tasks for latency (300)"
    )
    p.add_argument("--warmup", type=int, default=20, help="unmeasured tasks before latency (20)")
    p.add_argument("--unary", type=int, default=2000, help="bare unary round trips (2000)")
    p.add_argument("--stream", type=int, default=20000, help="bare stream messages (20000)")
    p.add_argument(
        "--follow-timeout",
        type=float,
        default=0.5,
        metavar="S",
        help="give up following one latency task after S seconds and look it up instead (0.5)",
    )
    p.add_argument("--capacity", type=int, default=256, help="runs per worker (256)")
    p.add_argument(
        "--poll-interval",
        type=float,
        default=0.02,
        metavar="S",
        help="seconds between completion polls (0.02)",
    )
    p.add_argument(
        "--timeout", type=float, default=900.0, metavar="S", help="overall deadline (900)"
    )
    p.add_argument(
        "--failover-rounds",
        type=int,
        choices=range(MAX_ROUNDS + 1),
        metavar="0-5",
        default=3,
        help="kill -9 and silent-cut rounds for the failover figures; 0 skips them (3)",
    )
    p.add_argument(
        "--store",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="the control plane's store: a SQLite temp file (default), or a PostgreSQL server "
        "started for the run (needs the postgres extra and the server binaries); the failover "
        "figures always use SQLite",
    )
    p.add_argument(
        "--compare-ref",
        metavar="REF",
        help="also measure the commit REF (e.g. main) in the same run: its server and workers "
        "run from `git archive REF`; the two take turns (sequential tasks one by one, "
        "throughput in --rounds rounds, the other phases once each), and the table shows both "
        "and their ratio",
    )
    p.add_argument(
        "--idle-workers",
        type=int,
        default=0,
        metavar="N",
        help="also start N worker sessions (own certificate and connection each, heartbeating "
        "like the daemon) from --fleet-procs processes: server CPU and memory while idle, time "
        "to connect them all, dispatch rate with them vs with two (0: skip; the aim is for 1000)",
    )
    p.add_argument("--fleet-procs", type=int, default=4, help="processes holding them (4)")
    p.add_argument(
        "--fleet-tasks",
        type=int,
        default=10_000,
        help="echo tasks for the fleet dispatch rate (10000: at 5,000/s and more, 3,000 took "
        "0.6 s, and one collector pause or round of idle heartbeats moved the rate by 15 %%)",
    )
    p.add_argument(
        "--fleet-rounds",
        type=int,
        choices=range(1, 11),
        metavar="1-10",
        default=3,
        help="dispatch windows per fleet size, taking turns between a control plane with two "
        "sessions and one with all of them (3)",
    )
    p.add_argument(
        "--idle-seconds",
        type=float,
        default=10.0,
        help="idle window for CPU and memory (10: keep it a multiple of the server's idle "
        "heartbeat interval, or it may catch one round of idle heartbeats more or less)",
    )
    p.add_argument(
        "--deep-queue",
        type=int,
        default=10_000,
        metavar="N",
        help="queue N tasks no worker can take, then measure ListTasks and dispatch (10000; "
        "0 skips)",
    )
    p.add_argument(
        "--cli-runs",
        type=int,
        default=15,
        metavar="N",
        help="run `taskrun task create echo --follow` N times, a new process each, beside a "
        "Python process that imports nothing (15; 0 skips)",
    )
    p.add_argument(
        "--reach-calls",
        type=int,
        default=200,
        metavar="N",
        help="N calls each of GET /v1/tasks/{id}, GET /v1/tasks (a page of 50) and MCP "
        "create_task with wait, one at a time (200; 0 skips)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="with --compare-ref: throughput in this many rounds per side, taking turns (4)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document instead")
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record server and workers with py-spy into DIR (py-spy must be installed)",
    )
    args = p.parse_args(argv)
    for name in (
        "tasks",
        "clients",
        "batch",
        "latency_tasks",
        "unary",
        "stream",
        "capacity",
        "rounds",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if (
        min(args.idle_workers, args.deep_queue, args.cli_runs, args.reach_calls) < 0
        or args.fleet_procs < 1
    ):
        p.error(
            "--idle-workers, --deep-queue, --cli-runs and --reach-calls must be >= 0, "
            "--fleet-procs >= 1"
        )
    if args.batch > 1000:
        p.error("--batch must be at most 1000 (the server's limit)")
    if args.warmup < 0 or min(args.poll_interval, args.timeout, args.follow_timeout) <= 0:
        p.error("--warmup must be >= 0, --poll-interval, --follow-timeout and --timeout > 0")
    return args


# --- measurements ------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    usable: int | None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on macOS
        usable = os.cpu_count()
    load: float | None
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        # what every process of the run started with (see taskrun.grpc_transport)
        "grpc_experiments": os.environ.get("GRPC_EXPERIMENTS", ""),
        "platform": platform.platform(terse=True),
        "load_1min_at_start": load,
    }


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of a process's main thread and of its other threads; {} off Linux.

    (CPython does not name native threads, so they cannot be told apart here; use --profile.)
    """
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = "main thread" if task.name == str(pid) else "other threads"
        fields = stat[stat.rindex(")") + 2 :].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


# --- child processes ---------------------------------------------------------------------------


# --- the control plane -------------------------------------------------------------------------


@dataclass
class ControlPlane:
    server: Child
    workers: list[Child]
    address: str
    http_address: str = ""  # the HTTP API's and MCP's, when it serves them

    @property
    def children(self) -> list[Child]:
        return [self.server, *self.workers]

    def check(self) -> None:
        for child in self.children:
            child.check()


async def start_control_plane(
    pki: PkiPaths,
    tmp: Path,
    capacity: int,
    started: list[Child],
    store: str,
    side: Side,
    worker_ids: Sequence[str] = WORKER_IDS,
    *,
    http: bool = False,
) -> ControlPlane:
    """Server, then the workers once it answers; returns when every worker is ONLINE.

    Every child is appended to `started` as soon as it exists, so the caller can stop it. The
    children of a --compare-ref side run that commit's code and carry its name in theirs.
    With `http`, the server also serves the HTTP API and MCP (which it imports only then: the
    fleet's figures leave it out, as their memory figure would grow by its stack).
    """
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--certs-dir", str(pki.directory), "--log-level", "warning"]
    suffix = "" if side.name == "this" else f" ({side.name})"
    tmp.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before anything runs
    http_address = f"127.0.0.1:{free_port()}" if http else ""
    server = await spawn_server(pki, tmp, address, store, side, http_address)
    started.append(server)
    async with clients(address, pki, 1) as (client,):
        await until(lambda: _answers(client), server.check, "the server to answer")
        workers = []
        for worker_id in worker_ids:
            argv = taskrun_argv(
                "worker",
                "run",
                "--id",
                worker_id,
                "--agents",
                "echo",
                "--capacity",
                str(capacity),
                "--server",
                address,
                "--drain-timeout",
                "5",
                *common,
            )
            workers.append(
                await spawn(f"{worker_id}{suffix}", argv, tmp / f"{worker_id}.log", env=side.env)
            )
            started.append(workers[-1])
        plane = ControlPlane(server, workers, address, http_address)

        async def online() -> bool:
            listed = await client.list_workers([WorkerStatus.ONLINE])
            return {w.id for w, _ in listed} >= set(worker_ids)

        await until(online, plane.check, "the workers to be ONLINE")
    return plane


async def spawn_server(
    pki: PkiPaths, tmp: Path, address: str, store: str, side: Side, http_address: str = ""
) -> Child:
    """The control plane's process (its log: tmp/server.log, appended to by a restart); with
    `http_address`, it serves the HTTP API and MCP there too."""
    suffix = "" if side.name == "this" else f" ({side.name})"
    common = ["--certs-dir", str(pki.directory), "--log-level", "warning"]
    http = ["--http-listen", http_address] if http_address else []
    return await spawn(
        f"server{suffix}",
        taskrun_argv("server", "--listen", address, "--store", store, *http, *common),
        tmp / "server.log",
        env=side.env,
    )


async def _answers(client: Client) -> bool:
    try:
        await client.list_workers()
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            return False
        raise
    return True


# --- profiling (optional) ----------------------------------------------------------------------


def find_py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


@contextlib.asynccontextmanager
async def profiled(
    directory: Path | None, phase: str, plane: ControlPlane, tmp: Path
) -> AsyncIterator[None]:
    """While the block runs, py-spy samples each control-plane process into DIR/PHASE-NAME.txt."""
    if directory is None:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - before measuring
    py_spy = find_py_spy()
    if py_spy is None:
        raise BenchError("--profile needs py-spy: .venv/bin/pip install py-spy")
    spies: list[Child] = []
    outputs: list[Path] = []
    for child in plane.children:
        out = directory / f"{phase}-{child.name}.txt"
        outputs.append(out)
        argv = [
            py_spy,
            "record",
            "--nonblocking",
            "--threads",
            "--format",
            "raw",
            "--rate",
            "200",
            "--output",
            str(out),
            "--pid",
            str(child.proc.pid),
        ]
        spies.append(await spawn(f"py-spy {child.name}", argv, tmp / "py-spy.log"))
    await asyncio.sleep(1.0)  # let py-spy attach before the measurement starts
    try:
        yield
    finally:
        for spy in spies:
            if spy.alive:
                spy.proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for spy in spies:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_GRACE):
                    await spy.proc.wait()
            await stop(spy)
        missing = [str(out) for out in outputs if not out.exists()]
        if missing:
            note(f"py-spy wrote no {', '.join(missing)}:\n{tail(tmp / 'py-spy.log')}")


# --- phases ------------------------------------------------------------------------------------

Profiler = Callable[[str], contextlib.AbstractAsyncContextManager[None]]


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes of the machine have used since boot (Linux /proc/stat)."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


OTHERS = "other processes"


def _cpu(plane: ControlPlane) -> dict[str, float | None]:
    times = {c.name: cpu_seconds(c.proc.pid) for c in plane.children}
    times["bench (clients)"] = time.process_time()
    times[OTHERS] = machine_busy_seconds()
    return times


def _cpu_delta(
    before: dict[str, float | None], after: dict[str, float | None]
) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, end in after.items():
        start = before.get(name)
        out[name] = None if start is None or end is None else round(end - start, 3)
    # The machine's total minus ours: anything else competing for the cores (py-spy included).
    total = out.get(OTHERS)
    ours = [v for k, v in out.items() if k != OTHERS]
    if total is not None and None not in ours:
        out[OTHERS] = round(max(0.0, total - sum(v for v in ours if v is not None)), 3)
    return out


def _per_task(
    before: dict[str, float | None], after: dict[str, float | None], n: int
) -> dict[str, float]:
    """CPU seconds per task by process group, for the groups measured at both ends."""
    spent = _cpu_delta(before, after)
    return {name: v / n for name, v in spent.items() if v is not None and n}


def _plane_cpu(plane: ControlPlane) -> dict[str, float | None]:
    workers = [cpu_seconds(w.proc.pid) for w in plane.workers]
    return {
        "server": cpu_seconds(plane.server.proc.pid),
        "workers": None if None in workers else sum(w for w in workers if w is not None),
    }


async def _count(client: Client, statuses: Sequence[TaskStatus]) -> int:
    count = 0
    async for _ in client.iter_tasks(statuses=statuses, page_size=1000):
        count += 1
    return count


async def measure_throughput(
    plane: ControlPlane,
    pki: PkiPaths,
    profile: Profiler,
    n: int,
    n_clients: int,
    batch: int,
    poll: float,
) -> Throughput:
    specs = [TaskSpec(agent="echo", input=ECHO_INPUT) for _ in range(n)]
    batches = [specs[i : i + batch] for i in range(0, n, batch)]
    async with clients(plane.address, pki, n_clients + 1) as (monitor, *submitters):

        async def submit(i: int) -> None:
            for chunk in batches[i::n_clients]:
                await submitters[i].create_tasks(chunk)

        async with profile("throughput"):
            cpu_before = _cpu(plane)
            threads_before = thread_cpu_seconds(plane.server.proc.pid)
            started = time.perf_counter()
            await asyncio.gather(*(submit(i) for i in range(n_clients)))
            submitted = time.perf_counter()
            polls, poll_seconds = 0, 0.0
            while True:
                t0 = time.perf_counter()
                unfinished, _ = await monitor.list_tasks(statuses=NON_TERMINAL, limit=1)
                poll_seconds += time.perf_counter() - t0
                polls += 1
                if not unfinished:
                    break
                plane.check()
                await asyncio.sleep(poll)
            finished = time.perf_counter()
            cpu = _cpu_delta(cpu_before, _cpu(plane))
            threads_after = thread_cpu_seconds(plane.server.proc.pid)
        server_threads = {
            name: round(spent - threads_before.get(name, 0.0), 3)
            for name, spent in sorted(threads_after.items(), key=lambda kv: -kv[1])
            if spent - threads_before.get(name, 0.0) > 0
        }
        completed = await _count(monitor, [TaskStatus.COMPLETED])
        not_completed = {
            s.name: c
            for s in (TaskStatus.FAILED, TaskStatus.CANCELLED)
            if (c := await _count(monitor, [s]))
        }
    return Throughput(
        tasks=n,
        clients=n_clients,
        batch=batch,
        submit_seconds=submitted - started,
        submit_tasks_per_s=n / (submitted - started),
        end_to_end_seconds=finished - started,
        end_to_end_tasks_per_s=n / (finished - started),
        completed=completed,
        not_completed=not_completed,
        completion_polls=polls,
        poll_round_trip_ms=poll_seconds / polls * 1000,
        cpu_seconds=cpu,
        server_threads_cpu_seconds=server_threads,
    )


class _Sequential:
    """One side's sequential tasks: a client, and the samples taken so far."""

    def __init__(self, client: Client, follow_timeout: float) -> None:
        self.client = client
        self.follow_timeout = follow_timeout
        self.total: list[float] = []
        self.create: list[float] = []
        self.follow: list[float] = []
        self.outcomes: Counter[str] = Counter()
        self.missed: list[str] = []
        self.ends: list[tuple[str, float, float]] = []  # (task id, time.time() at either end)
        self.stages: dict[str, float] = {}
        self.tail_stages: dict[str, float] = {}
        self.runs: list[float] = []  # Client.run, submit to the ended task

    async def one_run(self) -> None:
        """One task through Client.run: the outcome only."""
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.follow_timeout):
                final = await self.client.run(TaskSpec(agent="echo", input=ECHO_INPUT))
        except TimeoutError:
            self.missed.append(f"Client.run: no outcome within {self.follow_timeout:g}s")
            return
        if final.status is TaskStatus.COMPLETED:
            self.runs.append(time.perf_counter() - t0)

    async def one(self, measured: bool) -> None:
        client = self.client
        w0 = time.time()
        t0 = time.perf_counter()
        t1: float | None = None
        final: Task | None = None
        events = client.submit_and_follow(TaskSpec(agent="echo", input=ECHO_INPUT))
        try:
            async with asyncio.timeout(self.follow_timeout), contextlib.aclosing(events):
                async for event in events:
                    if isinstance(event, TaskChanged):
                        t1 = t1 or time.perf_counter()
                        final = event.task
        except TimeoutError:
            pass
        t2 = time.perf_counter()
        if final is None or t1 is None:
            raise BenchError(f"no task created within {self.follow_timeout:g}s")
        if not final.status.terminal:
            # The stream never delivered the end: look the task up so the run goes on.
            final, _ = await client.get_task(final.id)
            if measured:
                self.missed.append(f"{final.id} ({final.status.name} when looked up)")
                self.outcomes[final.status.name] += 1
            return
        if measured:
            self.outcomes[final.status.name] += 1
            self.total.append(t2 - t0)
            self.create.append(t1 - t0)
            self.follow.append(t2 - t1)
            self.ends.append((final.id, w0, w0 + (t2 - t0)))

    async def read_stages(self) -> None:
        """The p50 of each of STAGES over the measured tasks, from their stored times; and the
        same over the slowest 1 % of them (at least 3), the tasks that make the p99."""
        samples: list[list[float]] = [[] for _ in STAGES]
        tail: list[list[float]] = [[] for _ in STAGES]
        slowest = sorted(self.ends, key=lambda end: end[2] - end[1])
        slow_ids = {task_id for task_id, _, _ in slowest[-max(3, len(slowest) // 100) :]}
        for task_id, submitted, read in self.ends:
            task, runs = await self.client.get_task(task_id)
            run = runs[-1] if runs else None
            if run is None or None in (run.assigned_at, run.started_at, run.finished_at):
                continue
            assert run.assigned_at and run.started_at and run.finished_at  # for mypy
            times = [
                submitted,
                task.created_at.timestamp(),
                run.assigned_at.timestamp(),
                run.started_at.timestamp(),
                run.finished_at.timestamp(),
                read,
            ]
            for i, found in enumerate(samples):
                found.append(times[i + 1] - times[i])
                if task_id in slow_ids:
                    tail[i].append(times[i + 1] - times[i])
        self.stages, self.tail_stages = (
            {
                name: statistics.median(found) * 1000
                for (name, _), found in zip(STAGES, kept, strict=True)
                if found
            }
            for kept in (samples, tail)
        )

    def result(self) -> SequentialLatency:
        if not self.total:
            raise BenchError(
                f"FollowTask never reported the end of a task within {self.follow_timeout:g}s"
            )
        outcomes = Counter(self.outcomes)
        completed = outcomes.pop(TaskStatus.COMPLETED.name, 0)
        return SequentialLatency(
            submit_to_completed=Latency.of(self.total),
            create_call=Latency.of(self.create),
            follow_until_completed=Latency.of(self.follow),
            completed=completed,
            not_completed=dict(outcomes),
            follow_missed_end=len(self.missed),
            follow_missed_examples=self.missed[:5],
            stages_ms=self.stages,
            tail_stages_ms=self.tail_stages,
            run_to_completed=Latency.of(self.runs) if self.runs else None,
        )


async def measure_latency(
    planes: Sequence[ControlPlane],
    pki: PkiPaths,
    profiles: Sequence[Profiler],
    n: int,
    warmup: int,
    follow_timeout: float,
) -> list[SequentialLatency]:
    """Sequential tasks on each plane, interleaved task by task (A B B A ...) when there are
    several, so a change of load on the machine falls on every side alike."""
    async with contextlib.AsyncExitStack() as stack:
        sides = []
        for plane in planes:
            (client,) = await stack.enter_async_context(clients(plane.address, pki, 1))
            sides.append(_Sequential(client, follow_timeout))
        for _ in range(warmup):
            for side in sides:
                await side.one(measured=False)
        async with contextlib.AsyncExitStack() as profiling:
            for profile in profiles:
                await profiling.enter_async_context(profile("latency"))
            before = [_plane_cpu(plane) for plane in planes]
            client0 = time.process_time()
            order = list(sides)
            for _ in range(n):
                for side in order:
                    await side.one(measured=True)
                order.reverse()
            after = [_plane_cpu(plane) for plane in planes]
            client1 = time.process_time()
        # then as many through Client.run (not profiled, no CPU counted), taking turns alike
        for _ in range(n):
            for side in order:
                await side.one_run()
            order.reverse()
        for side in sides:  # after the measurement: the reading costs it nothing
            await side.read_stages()
    results = [side.result() for side in sides]
    for result, b, a in zip(results, before, after, strict=True):
        if len(sides) == 1:  # this process served only that side's client
            b["client"], a["client"] = client0, client1
        result.cpu_s = _per_task(b, a, n)
    return results


def merge_throughput(parts: Sequence[Throughput]) -> Throughput:
    """Rounds of one side as one figure: their tasks over their summed time."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    tasks = sum(p.tasks for p in parts)
    submit = sum(p.submit_seconds for p in parts)
    end = sum(p.end_to_end_seconds for p in parts)
    polls = sum(p.completion_polls for p in parts)
    cpu: dict[str, float | None] = {}
    for p in parts:
        for k, v in p.cpu_seconds.items():
            cpu[k] = None if v is None or (k in cpu and cpu[k] is None) else (cpu.get(k) or 0) + v
    threads: dict[str, float] = {}
    for p in parts:
        for k, v in p.server_threads_cpu_seconds.items():
            threads[k] = threads.get(k, 0.0) + v
    not_completed: Counter[str] = Counter()
    for p in parts:
        not_completed.update(p.not_completed)
    return Throughput(
        tasks=tasks,
        clients=first.clients,
        batch=first.batch,
        submit_seconds=submit,
        submit_tasks_per_s=tasks / submit,
        end_to_end_seconds=end,
        end_to_end_tasks_per_s=tasks / end,
        completed=sum(p.completed for p in parts),
        not_completed=dict(not_completed),
        completion_polls=polls,
        poll_round_trip_ms=sum(p.poll_round_trip_ms * p.completion_polls for p in parts) / polls,
        cpu_seconds=cpu,
        server_threads_cpu_seconds=threads,
    )


BLOCKED_AGENT = "bench-blocked"  # announced by no worker: its tasks wait in the queue


async def _list_p50(client: Client, n: int, statuses: Sequence[TaskStatus] = ()) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await client.list_tasks(statuses=statuses, limit=50)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1000


async def measure_deep_queue(
    plane: ControlPlane, pki: PkiPaths, queued: int, tasks: int, n_clients: int, batch: int
) -> DeepQueue:
    """ListTasks latency before and after `queued` tasks that no worker can take are waiting,
    then the dispatch rate of `tasks` echo tasks with them still waiting."""
    async with clients(plane.address, pki, 1) as (client,):
        before = await _list_p50(client, 50)
        t0 = time.perf_counter()
        spec = TaskSpec(agent=BLOCKED_AGENT, input="{}")
        for start in range(0, queued, 1000):
            await client.create_tasks([spec] * min(1000, queued - start), allow_unknown_agent=True)
        queue_seconds = time.perf_counter() - t0
        after = await _list_p50(client, 50)
        pending = await _list_p50(client, 50, [TaskStatus.PENDING])
    rate = await _echo_rate(plane.address, pki, tasks, n_clients, batch, plane.check)
    return DeepQueue(queued, queue_seconds, before, after, pending, rate)


async def _echo_rate(
    address: str, pki: PkiPaths, n: int, n_clients: int, batch: int, check: Callable[[], None]
) -> float:
    """Echo tasks from `n_clients` clients in CreateTasks batches: tasks/s from the first submit
    until ListTasks(agent=echo, PENDING or RUNNING) is empty (polled every 10 ms)."""
    specs = [TaskSpec(agent="echo", input=ECHO_INPUT) for _ in range(n)]
    batches = [specs[i : i + batch] for i in range(0, n, batch)]
    async with clients(address, pki, n_clients + 1) as (monitor, *submitters):
        started = time.perf_counter()

        async def submit(i: int) -> None:
            for chunk in batches[i::n_clients]:
                await submitters[i].create_tasks(chunk)

        await asyncio.gather(*(submit(i) for i in range(n_clients)))
        while (await monitor.list_tasks(statuses=NON_TERMINAL, agent="echo", limit=1))[0]:
            check()
            await asyncio.sleep(0.01)
        return n / (time.perf_counter() - started)


async def _fleet_plane(
    args: argparse.Namespace,
    pki: PkiPaths,
    tmp: Path,
    side: Side,
    started: list[Child],
    workers: Sequence[str],
    nprocs: int,
) -> tuple[ControlPlane, list[Child], float]:
    """A fresh server in `tmp` and fleet processes holding `workers`, all of them ONLINE."""
    store = f"sqlite:{tmp / 'taskrun.db'}"
    plane = await start_control_plane(pki, tmp, 1, started, store, side, ())
    fleet, connect = await start_fleet(
        plane.address, pki, workers, nprocs, args.capacity, tmp, side.env
    )
    started.extend(fleet)
    await wait_online(plane.address, pki, len(workers))
    return plane, fleet, connect


def _profile_dir(args: argparse.Namespace, side: Side) -> Path | None:
    """Where --profile puts a side's stacks (a subdirectory per side with --compare-ref)."""
    directory: Path | None = args.profile
    if directory is None:
        return None
    return directory / side.name if args.compare_ref else directory


@dataclass
class DispatchWindow:
    """One fleet dispatch measurement: the rate, and per task what it cost the server and the
    fleet processes (CPU), and the stream messages both ways per 100 tasks."""

    tasks_per_s: float
    server_cpu_ms: float
    fleet_cpu_ms: float
    messages_per_100: float


def _combined(windows: Sequence[DispatchWindow]) -> DispatchWindow:
    """Windows of the same number of tasks as one: the rate over their summed time, the rest
    per task over all of them."""
    k = len(windows)
    return DispatchWindow(
        tasks_per_s=k / sum(1 / w.tasks_per_s for w in windows),
        server_cpu_ms=sum(w.server_cpu_ms for w in windows) / k,
        fleet_cpu_ms=sum(w.fleet_cpu_ms for w in windows) / k,
        messages_per_100=sum(w.messages_per_100 for w in windows) / k,
    )


async def _fleet_dispatch(
    args: argparse.Namespace,
    plane: ControlPlane,
    fleet: Sequence[Child],
    pki: PkiPaths,
    phase: str,
    side: Side,
    tmp: Path,
) -> DispatchWindow:
    """Dispatch rate of --fleet-tasks echo tasks, and the server's and the fleet's CPU per task
    over that window (less sensitive than the rate to what else loads a shared machine)."""
    pid = plane.server.proc.pid
    async with profiled(_profile_dir(args, side), phase, plane, tmp):
        messages0 = await fleet_messages(fleet)
        fleet0 = [cpu_seconds(c.proc.pid) or 0.0 for c in fleet]
        cpu0 = cpu_seconds(pid)
        rate = await _echo_rate(plane.address, pki, args.fleet_tasks, 4, args.batch, plane.check)
        cpu1 = cpu_seconds(pid)
        fleet1 = [cpu_seconds(c.proc.pid) or 0.0 for c in fleet]
        messages1 = await fleet_messages(fleet)
    n = args.fleet_tasks
    return DispatchWindow(
        tasks_per_s=rate,
        server_cpu_ms=((cpu1 or 0.0) - (cpu0 or 0.0)) * 1000 / n,
        fleet_cpu_ms=(sum(fleet1) - sum(fleet0)) * 1000 / n,
        messages_per_100=(messages1 - messages0) * 100 / n,
    )


async def _fleet_restart(
    plane: ControlPlane,
    fleet: Sequence[Child],
    pki: PkiPaths,
    tmp: Path,
    side: Side,
    n: int,
    started_children: list[Child],
) -> tuple[float, float, int, float, float]:
    """kill -9 of the server, a new one on its address and store at once: seconds from its
    start until it answers and until all `n` sessions are ONLINE again, the fleet's failed
    connection attempts meanwhile, and the CPU (% of one core) of the fleet processes and of
    the new server over that window: they share the machine's cores. `plane.server` is the new
    server afterwards, in `started_children` from its start (stopped by the caller even when
    this fails)."""
    _, failed0 = await fleet_counts(fleet)
    plane.server.proc.kill()
    await plane.server.proc.wait()
    fleet0 = sum(cpu_seconds(c.proc.pid) or 0.0 for c in fleet)
    started = time.perf_counter()
    plane.server = await spawn_server(pki, tmp, plane.address, f"sqlite:{tmp / 'taskrun.db'}", side)
    started_children.append(plane.server)
    async with clients(plane.address, pki, 1) as (client,):
        await until(lambda: _answers(client), plane.server.check, "the new server to answer")
    answered = time.perf_counter() - started
    await wait_online(plane.address, pki, n)
    back = time.perf_counter() - started
    fleet_cpu = sum(cpu_seconds(c.proc.pid) or 0.0 for c in fleet) - fleet0
    server_cpu = cpu_seconds(plane.server.proc.pid) or 0.0
    _, failed1 = await fleet_counts(fleet)
    return answered, back, failed1 - failed0, fleet_cpu * 100 / back, server_cpu * 100 / back


async def fleet_many(
    args: argparse.Namespace,
    pki: PkiPaths,
    tmp: Path,
    side: Side,
    started: list[Child],
    profile: Path | None = None,
) -> Fleet:
    """Connect time, idle CPU and memory with all N sessions; then the dispatch rate with all N
    against a second control plane with two sessions, in --fleet-rounds rounds taking turns (so
    that both see the machine at the same speed: on a shared VM it moves by the minute); then a
    restart. With `profile`, py-spy records the server over the idle window
    (DIR/idle-server.txt) and each dispatch window."""
    n, procs = args.idle_workers, min(args.fleet_procs, args.idle_workers)
    note(f"[{side.name}] fleet: a control plane with 2 sessions, for reference")
    ref, ref_fleet, _ = await _fleet_plane(
        args, pki, tmp / "fleet-2", side, started, fleet_ids(n)[:2], 1
    )
    note(f"[{side.name}] fleet: {n} sessions from {procs} processes")
    plane, fleet, connect = await _fleet_plane(
        args, pki, tmp / f"fleet-{n}", side, started, fleet_ids(n), procs
    )
    # Measure the idle sessions at their steady rate: once each is past its first idle wait
    # (each drawn over the interval's last fifth: 0.9 of it on average),
    # and the connection storm has settled. A window right after connecting catches about one
    # heartbeat per session, where steady state has 1.11 per interval.
    await asyncio.sleep(SERVER_IDLE_INTERVAL + 2.0)
    pid = plane.server.proc.pid
    async with profiled(profile, "idle", plane, tmp):
        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        await asyncio.sleep(args.idle_seconds)
        cpu1, t1 = cpu_seconds(pid), time.perf_counter()
    rss = rss_mb(pid)
    plane.check()
    rounds = args.fleet_rounds
    note(f"[{side.name}] fleet: dispatch in {rounds} rounds, 2 sessions and {n} taking turns")
    twos: list[DispatchWindow] = []
    manys: list[DispatchWindow] = []
    for r in range(rounds):
        turns = [(ref, ref_fleet, "fleet-2", twos), (plane, fleet, f"fleet-{n}", manys)]
        for p, f, phase, windows in turns if r % 2 == 0 else reversed(turns):
            windows.append(await _fleet_dispatch(args, p, f, pki, f"{phase}-{r}", side, tmp))
    for child in [*ref_fleet, ref.server]:
        await stop(child)
    two, many = _combined(twos), _combined(manys)
    note(f"[{side.name}] fleet: kill -9 of the control plane, then all {n} sessions back")
    answered, restart_s, failed, fleet_cpu, server_cpu = await _fleet_restart(
        plane, fleet, pki, tmp / f"fleet-{n}", side, n, started
    )
    for child in [*fleet, plane.server]:
        await stop(child)
    cpu = ((cpu1 or 0.0) - (cpu0 or 0.0)) / (t1 - t0) * 100
    return Fleet(
        workers=n,
        processes=procs,
        connect_seconds=connect,
        idle_seconds=args.idle_seconds,
        idle_cpu_percent=cpu,
        idle_rss_mb=rss,
        idle_rss_kb_per_worker=rss * 1024 / n,
        tasks=args.fleet_tasks,
        dispatch_tasks_per_s=many.tasks_per_s,
        dispatch_two_workers_tasks_per_s=two.tasks_per_s,
        dispatch_cpu_ms_per_task=many.server_cpu_ms,
        dispatch_two_workers_cpu_ms_per_task=two.server_cpu_ms,
        dispatch_fleet_cpu_ms_per_task=many.fleet_cpu_ms,
        dispatch_two_workers_fleet_cpu_ms_per_task=two.fleet_cpu_ms,
        dispatch_messages_per_100=many.messages_per_100,
        dispatch_two_workers_messages_per_100=two.messages_per_100,
        restart_answered_seconds=answered,
        restart_seconds=restart_s,
        restart_failed_connects=failed,
        dispatch_round_ratios=[
            m.tasks_per_s / t.tasks_per_s for t, m in zip(twos, manys, strict=True)
        ],
        restart_fleet_cpu_percent=fleet_cpu,
        restart_server_cpu_percent=server_cpu,
    )


# The control plane's default idle heartbeat interval (the bench starts it with its defaults)
SERVER_IDLE_INTERVAL = 10.0

# --- main --------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, tmp: Path) -> tuple[Report, Report | None]:
    machine = machine_info()
    fleet = fleet_ids(args.idle_workers) if args.idle_workers else []
    if fleet:
        note(f"certificates for {len(fleet)} fleet workers")
    pki = init_pki(tmp / "certs", workers=(*WORKER_IDS, *FAILOVER_WORKERS, *fleet))
    sides = [this_side()]
    if args.compare_ref:
        sides.append(ref_side(args.compare_ref, tmp))
    started: list[Child] = []
    deadline: asyncio.Timeout | None = None
    database: Any = None  # tests.postgres.PostgresServer with --store postgresql
    results: dict[str, dict[str, Any]] = {side.name: {} for side in sides}
    labels: dict[str, str] = {}
    try:
        if args.store == "postgresql" and len(sides) > 1:
            raise BenchError("--compare-ref measures SQLite only")
        deadline = asyncio.timeout(args.timeout)
        async with deadline:
            note("baseline: bare grpc.aio server")
            bare, port = await start_baseline(pki, tmp)
            started.append(bare)
            baseline = await measure_baseline(f"127.0.0.1:{port}", pki, args.unary, args.stream)
            relay = functools.partial(
                measure_relay,
                f"127.0.0.1:{port}",
                pki,
                tmp,
                args.latency_tasks,
                max(args.warmup, 20),
                bare.proc.pid,
            )
            note("baseline: bare relay through a bare worker process")
            baseline.relay, baseline.relay_cpu_s = await relay()
            note("baseline: the same relay with TaskRun's two SQLite commits")
            baseline.stored_relay, baseline.stored_relay_cpu_s = await relay(method="StoredRelay")
            note("baseline: both relays again, each request a message on one client stream")
            baseline.stream_relay, baseline.stream_relay_cpu_s = await relay(method="StreamRelay")
            (
                baseline.stored_stream_relay,
                baseline.stored_stream_relay_cpu_s,
            ) = await relay(method="StoredStreamRelay")
            await stop(bare)

            planes: dict[str, ControlPlane] = {}
            for side in sides:
                store_url, labels[side.name] = (
                    f"sqlite:{tmp / side.name / 'taskrun.db'}",
                    ("SQLite in a temp file"),
                )
                if args.store == "postgresql":
                    database = start_postgres()
                    store_url = database.url
                    labels[side.name] = "PostgreSQL on loopback (fsync on)"
                note(f"[{side.name}] starting the control plane ({labels[side.name]}) and workers")
                planes[side.name] = await start_control_plane(
                    pki,
                    tmp / side.name,
                    args.capacity,
                    started,
                    store_url,
                    side,
                    http=args.reach_calls > 0,
                )

            def profile(
                side: Side, phase: str, suffix: str = ""
            ) -> contextlib.AbstractAsyncContextManager[None]:
                plane = planes[side.name]
                where = (
                    args.profile / side.name if args.profile and len(sides) > 1 else args.profile
                )
                return profiled(where, phase + suffix, plane, tmp)

            # The sides take turns (A B B A ...): sequential tasks one by one, throughput in
            # rounds, the deep queue once each; so a change of load falls on both alike.
            rounds = args.rounds if len(sides) > 1 else 1
            parts: dict[str, list[Throughput]] = {side.name: [] for side in sides}
            order = list(sides)
            for r in range(rounds):
                for side in order:
                    note(f"[{side.name}] throughput: {args.tasks // rounds} echo tasks")
                    parts[side.name].append(
                        await measure_throughput(
                            planes[side.name],
                            pki,
                            functools.partial(profile, side, suffix=f"-{r + 1}"),
                            args.tasks // rounds,
                            args.clients,
                            args.batch,
                            args.poll_interval,
                        )
                    )
                order.reverse()
            for side in sides:
                results[side.name]["throughput"] = merge_throughput(parts[side.name])
            note(f"latency: {args.latency_tasks} sequential tasks per side, interleaved")
            latencies = await measure_latency(
                [planes[side.name] for side in sides],
                pki,
                [functools.partial(profile, side) for side in sides],
                args.latency_tasks,
                args.warmup,
                args.follow_timeout,
            )
            for side, latency in zip(sides, latencies, strict=True):
                results[side.name]["latency"] = latency
            if args.deep_queue:
                for side in order:
                    note(f"[{side.name}] deep queue: {args.deep_queue} tasks no worker takes")
                    results[side.name]["deep_queue"] = await measure_deep_queue(
                        planes[side.name],
                        pki,
                        args.deep_queue,
                        args.tasks,
                        args.clients,
                        args.batch,
                    )
                order.reverse()
            if args.cli_runs:
                note(f"the command line: {args.cli_runs} x taskrun task create --follow per side")
                lines = await measure_cli(
                    sides, [planes[side.name].address for side in sides], pki, args.cli_runs
                )
                for side, line in zip(sides, lines, strict=True):
                    results[side.name]["cli"] = line
            if args.reach_calls:
                note(f"the HTTP API and MCP: {args.reach_calls} calls of each per side")
                reached = await measure_reach(
                    [planes[side.name].http_address for side in sides],
                    [planes[side.name].address for side in sides],
                    pki,
                    args.reach_calls,
                    [
                        functools.partial(cpu_seconds, planes[side.name].server.proc.pid)
                        for side in sides
                    ],
                    [functools.partial(profile, side, "reach") for side in sides],
                )
                for side, reach in zip(sides, reached, strict=True):
                    results[side.name]["reach"] = reach
            for plane in planes.values():
                await asyncio.gather(*(stop(c) for c in plane.workers))
                await stop(plane.server)
            if args.idle_workers:
                for side in order:
                    where = (
                        args.profile / side.name
                        if args.profile and len(sides) > 1
                        else args.profile
                    )
                    results[side.name]["fleet"] = await fleet_many(
                        args, pki, tmp / side.name, side, started, where
                    )
            if args.failover_rounds > 0:
                note(f"failover: {args.failover_rounds} x kill -9, {args.failover_rounds} x cut")
                results["this"]["failover"] = await measure_failover(
                    pki, tmp, args.failover_rounds, started
                )
    except TimeoutError as exc:
        if deadline is not None and deadline.expired():
            raise BenchError(
                f"the benchmark did not finish within --timeout {args.timeout:g}s"
            ) from None
        ours = [
            f
            for f in traceback.extract_tb(exc.__traceback__)
            if Path(f.filename).parent == SCRIPT.parent
        ]
        frame = (ours or traceback.extract_tb(exc.__traceback__))[-1]
        raise BenchError(
            f"a step timed out at {Path(frame.filename).name}:{frame.lineno} ({frame.line})"
        ) from None
    finally:
        # Workers first (they drain and say goodbye), then the server, then anything else.
        workers = [c for c in started if c.name.split(" (")[0] in WORKER_IDS]
        await asyncio.gather(*(stop(c) for c in workers))
        for child in started:
            if child not in workers:
                await stop(child)
        if database is not None:
            database.destroy()
    reports = []
    for side in sides:
        got = results[side.name]
        reports.append(
            Report(
                machine=machine,
                setup={
                    "side": side.name,
                    "commit": side.commit,
                    "workers": len(WORKER_IDS),
                    "capacity": args.capacity,
                    "store": labels[side.name],
                    "poll_interval": args.poll_interval,
                    "warmup_tasks": args.warmup,
                    "follow_timeout": args.follow_timeout,
                },
                baseline=baseline,
                throughput=got["throughput"],
                latency=got["latency"],
                ratios=ratios(baseline, got["throughput"], got["latency"]),
                targets=targets(),
                method=METHOD,
                failover=got.get("failover"),
                deep_queue=got.get("deep_queue"),
                fleet=got.get("fleet"),
                cli=got.get("cli"),
                reach=got.get("reach"),
            )
        )
    return reports[0], (reports[1] if len(reports) > 1 else None)


def start_postgres() -> Any:
    """A throwaway PostgreSQL server with fsync on (tests/postgres.py starts it)."""
    from tests.postgres import PostgresServer, find_pg_bin  # scripts/.. is on sys.path

    found = find_pg_bin()
    if found is None:
        raise BenchError("--store postgresql needs the PostgreSQL server binaries (initdb)")
    note("starting a PostgreSQL server")
    server = PostgresServer(found, fsync=True)
    try:
        server.start()
    except BaseException:
        server.destroy()
        raise
    return server


@contextlib.contextmanager
def temporary_directory() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="taskrun-bench-") as name:
        yield Path(name)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    with temporary_directory() as tmp:
        try:
            result = asyncio.run(bench(args, tmp))
        except BenchError as exc:
            sys.stderr.write(f"bench: {exc}\n")
            return 1
        except KeyboardInterrupt:
            sys.stderr.write("bench: interrupted\n")
            return 130
    report(*result, as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
