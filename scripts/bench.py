"""Benchmark TaskRun on this machine against a bare grpc.aio baseline measured in the same run.

1. A temporary PKI and store: a SQLite file, or with --store postgresql a throwaway PostgreSQL
   server (initdb + pg_ctl on a free loopback port, fsync on, as the tests start it).
2. Baseline: a bare grpc.aio server (a subprocess, the same mTLS certificates, raw bytes, no
   protobuf): sequential unary round trips, and one bidi stream carrying small messages one way.
3. The real control plane and two workers, as subprocesses started through the `taskrun` CLI.
4. Throughput: echo tasks submitted by concurrent clients with CreateTasks, timed from the first
   submit until ListTasks finds no PENDING or RUNNING task.
5. Latency: sequential CreateTask, then FollowTask until the task is COMPLETED. A follow that
   has not delivered the end after --follow-timeout is counted apart (and the task looked up).
   Then, unmeasured, where the time went: the p50 of each stage between the times stored with
   each task and run (created, assigned, started, finished) and the client's clock at either end.
6. Failover (scripts/bench_failover.py): from `kill -9` of a worker, and from a silent network
   cut, to the run's next attempt RUNNING on another worker, with the default lease.

It prints a table (or, with --json, one JSON document) and never asserts. Everything listens on
127.0.0.1, lives in a temporary directory and stops by itself within --timeout seconds.
With --profile DIR, py-spy (if installed; not a project dependency) records the server and the
workers during each measured window into DIR/<phase>-<process>.txt, as collapsed stacks
(one line per stack and its sample count; flamegraph.pl or speedscope render them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from bench_compare import Side, ref_side, this_side
from bench_failover import FAILOVER_WORKERS, MAX_ROUNDS, Failover, measure_failover
from bench_fleet import (
    Fleet,
    fleet_counts,
    fleet_ids,
    fleet_messages,
    rss_mb,
    start_fleet,
    wait_online,
)
from benchprocs import (  # scripts/ is on sys.path: this file runs as a script
    READY_WITHIN,
    STOP_GRACE,
    BenchError,
    Child,
    clients,
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

TARGET_TASKS_PER_S = 4000.0
TARGET_P50_MS = 1.5
TARGET_P99_MS = 4.0
TARGET_IDLE_CPU_PERCENT = 10.0  # of one core, 1,000 idle workers
TARGET_IDLE_RSS_MB = 200.0
TARGET_FLEET_RATIO = 0.8  # dispatch with 1,000 workers / with two
TARGET_DEEP_RATIO = 0.8  # dispatch with 10,000 tasks queued / without
TARGET_LIST_RATIO = 1.5  # ListTasks p50 with 10,000 tasks queued / without
TARGET_MACHINE = "2-core machine"

BARE_SERVICE = "taskrun.bench.Bare"
BARE_PAYLOAD = b"x" * 64  # about the size of a CreateTask request for echo {"text": "x"}
RELAY_KEY = 8  # the relay's requests start with their number
ECHO_INPUT = '{"text":"x"}'
NON_TERMINAL = (TaskStatus.PENDING, TaskStatus.RUNNING)
WORKER_IDS = ("worker-1", "worker-2")
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
    p.add_argument("--serve-baseline", type=Path, metavar="CERTS", help=argparse.SUPPRESS)
    p.add_argument("--bare-worker", nargs=2, metavar=("CERTS", "ADDRESS"), help=argparse.SUPPRESS)
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
    if min(args.idle_workers, args.deep_queue) < 0 or args.fleet_procs < 1:
        p.error("--idle-workers and --deep-queue must be >= 0, --fleet-procs >= 1")
    if args.batch > 1000:
        p.error("--batch must be at most 1000 (the server's limit)")
    if args.warmup < 0 or min(args.poll_interval, args.timeout, args.follow_timeout) <= 0:
        p.error("--warmup must be >= 0, --poll-interval, --follow-timeout and --timeout > 0")
    return args


# --- measurements ------------------------------------------------------------------------------


@dataclass
class Latency:
    """Milliseconds."""

    count: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latency:
        ordered = sorted(seconds)
        return cls(
            count=len(ordered),
            p50_ms=_percentile(ordered, 0.50) * 1000,
            p99_ms=_percentile(ordered, 0.99) * 1000,
            mean_ms=statistics.fmean(ordered) * 1000,
            max_ms=ordered[-1] * 1000,
        )


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted data."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass
class Baseline:
    unary: Latency
    unary_ops_per_s: float
    stream_messages: int
    stream_seconds: float
    stream_msgs_per_s: float
    # A call whose answer comes from a worker process over a stream it holds: the path of a
    # task, with nothing stored, validated or converted (see serve_baseline).
    relay: Latency | None = None
    # CPU seconds per relay call of the bare server and the bare worker (with the client: the
    # CPU any design with a worker process in the loop pays per task, on the same cores)
    relay_cpu_s: dict[str, float] = field(default_factory=dict)


@dataclass
class Throughput:
    tasks: int
    clients: int
    batch: int
    submit_seconds: float
    submit_tasks_per_s: float
    end_to_end_seconds: float
    end_to_end_tasks_per_s: float
    completed: int
    not_completed: dict[str, int]
    completion_polls: int
    poll_round_trip_ms: float
    cpu_seconds: dict[str, float | None]
    server_threads_cpu_seconds: dict[str, float]


@dataclass
class SequentialLatency:
    submit_to_completed: Latency
    create_call: Latency
    follow_until_completed: Latency
    completed: int
    not_completed: dict[str, int]
    # Tasks whose FollowTask stream had not delivered the terminal update after --follow-timeout
    # (left out of the latency figures above).
    follow_missed_end: int
    follow_missed_examples: list[str]
    # CPU seconds per task over the measured tasks: "server", "workers" (all of them) and, when
    # one side ran alone, "client" (this process); on two cores the round trip waits for these
    cpu_s: dict[str, float] = field(default_factory=dict)
    # Where the round trip's time went, p50 milliseconds per stage (STAGES), from the times the
    # control plane stored with each task and run and this process's clock at either end (one
    # machine, one clock); read after the measured tasks, so the reading costs them nothing.
    stages_ms: dict[str, float] = field(default_factory=dict)


# The stages of one sequential task, in order; each from the stored time named to the next.
STAGES = (
    ("to the control plane", "submitted -> the task's created_at"),
    ("creating, assigning", "created_at -> the run's assigned_at"),
    ("committing, to the worker, started", "assigned_at -> started_at"),
    ("running, reported", "started_at -> finished_at"),
    ("committing, back to the client", "finished_at -> the terminal update read"),
)


@dataclass
class Report:
    machine: dict[str, Any]
    setup: dict[str, Any]
    baseline: Baseline
    throughput: Throughput
    latency: SequentialLatency
    ratios: dict[str, float]
    targets: dict[str, Any]
    method: dict[str, str] = field(default_factory=dict)
    failover: Failover | None = None
    deep_queue: DeepQueue | None = None
    fleet: Fleet | None = None


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
        "platform": platform.platform(terse=True),
        "load_1min_at_start": load,
    }


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc); None where unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


# --- the bare baseline -------------------------------------------------------------------------


async def serve_baseline(certs: Path) -> None:
    """A bare grpc.aio server with the control plane's mTLS setup; prints its port, then serves
    until SIGTERM."""
    paths = PkiPaths.at(certs)
    creds = grpc.ssl_server_credentials(
        [(paths.server_key.read_bytes(), paths.server_cert.read_bytes())],
        root_certificates=paths.ca_cert.read_bytes(),
        require_client_auth=True,
    )

    async def unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return request

    # The relay: a bare worker holds a Work stream; a Relay call answers at once ("created"),
    # hands its request to the worker, and answers again with the worker's reply: the shape
    # of CreateAndFollowTask with a worker in the loop, the floor for any design that has one.
    to_worker: asyncio.Queue[bytes] = asyncio.Queue()
    waiting: dict[bytes, asyncio.Future[bytes]] = {}

    async def work(
        replies: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        async def read() -> None:
            async for reply in replies:
                waiting.pop(reply[:RELAY_KEY]).set_result(reply)

        reader = asyncio.create_task(read())
        try:
            while True:
                yield await to_worker.get()
        finally:
            reader.cancel()

    async def relay(
        request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        answered: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        waiting[request[:RELAY_KEY]] = answered
        to_worker.put_nowait(request)
        yield b"created"
        yield await answered

    async def stream(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        count = 0
        async for _ in requests:
            count += 1
        yield str(count).encode()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                BARE_SERVICE,
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(unary),
                    "Stream": grpc.stream_stream_rpc_method_handler(stream),
                    "Work": grpc.stream_stream_rpc_method_handler(work),
                    "Relay": grpc.unary_stream_rpc_method_handler(relay),
                },
            ),
        )
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    await server.stop(1.0)


async def bare_worker(certs: Path, address: str) -> None:
    """The relay's worker: holds one Work stream and answers each request with itself."""
    paths = PkiPaths.at(certs)
    creds = grpc.ssl_channel_credentials(
        root_certificates=paths.ca_cert.read_bytes(),
        private_key=paths.operator_key.read_bytes(),
        certificate_chain=paths.operator_cert.read_bytes(),
    )
    async with grpc.aio.secure_channel(address, creds) as channel:
        call = channel.stream_stream(f"/{BARE_SERVICE}/Work")()
        async for request in call:
            await call.write(request)


async def start_baseline(pki: PkiPaths, tmp: Path) -> tuple[Child, int]:
    argv = [sys.executable, str(SCRIPT), "--serve-baseline", str(pki.directory)]
    child = await spawn("bare server", argv, tmp / "bare-server.log", pipe_stdout=True)
    assert child.proc.stdout is not None
    try:
        async with asyncio.timeout(READY_WITHIN):
            line = await child.proc.stdout.readline()
    except TimeoutError:
        raise BenchError(f"bare server did not start within {READY_WITHIN:g}s") from None
    if not line.strip().isdigit():
        await child.proc.wait()
        child.check()
    return child, int(line)


async def measure_baseline(address: str, pki: PkiPaths, unary_n: int, stream_n: int) -> Baseline:
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.ca_cert.read_bytes(),
        private_key=pki.operator_key.read_bytes(),
        certificate_chain=pki.operator_cert.read_bytes(),
    )
    async with grpc.aio.secure_channel(address, creds) as channel:
        async with asyncio.timeout(READY_WITHIN):
            await channel.channel_ready()
        unary = channel.unary_unary(f"/{BARE_SERVICE}/Unary")
        for _ in range(min(200, unary_n)):
            await unary(BARE_PAYLOAD)
        samples: list[float] = []
        started = time.perf_counter()
        for _ in range(unary_n):
            t0 = time.perf_counter()
            await unary(BARE_PAYLOAD)
            samples.append(time.perf_counter() - t0)
        unary_seconds = time.perf_counter() - started

        open_stream = channel.stream_stream(f"/{BARE_SERVICE}/Stream")

        async def one_stream(n: int) -> float:
            call = open_stream()
            t0 = time.perf_counter()
            for _ in range(n):
                await call.write(BARE_PAYLOAD)
            await call.done_writing()
            reply = await call.read()
            elapsed = time.perf_counter() - t0
            if reply != str(n).encode():
                raise BenchError(f"bare stream: server counted {reply!r}, sent {n}")
            return elapsed

        await one_stream(min(1000, stream_n))
        stream_seconds = await one_stream(stream_n)
    return Baseline(
        unary=Latency.of(samples),
        unary_ops_per_s=unary_n / unary_seconds,
        stream_messages=stream_n,
        stream_seconds=stream_seconds,
        stream_msgs_per_s=stream_n / stream_seconds,
    )


async def measure_relay(
    address: str, pki: PkiPaths, tmp: Path, n: int, warmup: int, server_pid: int
) -> tuple[Latency, dict[str, float]]:
    """Sequential Relay calls through a bare worker process, from the call to its second
    answer (the worker's), as the latency figure measures a task; and the CPU per call of the
    bare server, the bare worker and this client."""
    argv = [sys.executable, str(SCRIPT), "--bare-worker", str(pki.directory), address]
    worker = await spawn("bare worker", argv, tmp / "bare-worker.log")
    try:
        creds = grpc.ssl_channel_credentials(
            root_certificates=pki.ca_cert.read_bytes(),
            private_key=pki.operator_key.read_bytes(),
            certificate_chain=pki.operator_cert.read_bytes(),
        )
        async with grpc.aio.secure_channel(address, creds) as channel:
            relay = channel.unary_stream(f"/{BARE_SERVICE}/Relay")
            samples: list[float] = []
            pids = {"server": server_pid, "workers": worker.proc.pid}
            cpu0: dict[str, float | None] = {}
            for i in range(warmup + n):
                if i == warmup:
                    cpu0 = {k: cpu_seconds(pid) for k, pid in pids.items()}
                    cpu0["client"] = time.process_time()
                request = i.to_bytes(RELAY_KEY, "big") + BARE_PAYLOAD
                t0 = time.perf_counter()
                async with asyncio.timeout(READY_WITHIN):
                    answers = [answer async for answer in relay(request)]
                if answers != [b"created", request]:
                    raise BenchError(f"bare relay: answered {answers!r}")
                if i >= warmup:
                    samples.append(time.perf_counter() - t0)
            cpu1 = {k: cpu_seconds(pid) for k, pid in pids.items()}
            cpu1["client"] = time.process_time()
        return Latency.of(samples), _per_task(cpu0, cpu1, n)
    finally:
        await stop(worker)


# --- the control plane -------------------------------------------------------------------------


@dataclass
class ControlPlane:
    server: Child
    workers: list[Child]
    address: str

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
) -> ControlPlane:
    """Server, then the workers once it answers; returns when every worker is ONLINE.

    Every child is appended to `started` as soon as it exists, so the caller can stop it. The
    children of a --compare-ref side run that commit's code and carry its name in theirs.
    """
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--certs-dir", str(pki.directory), "--log-level", "warning"]
    suffix = "" if side.name == "this" else f" ({side.name})"
    tmp.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before anything runs
    server = await spawn_server(pki, tmp, address, store, side)
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
        plane = ControlPlane(server, workers, address)

        async def online() -> bool:
            listed = await client.list_workers([WorkerStatus.ONLINE])
            return {w.id for w, _ in listed} >= set(worker_ids)

        await until(online, plane.check, "the workers to be ONLINE")
    return plane


async def spawn_server(pki: PkiPaths, tmp: Path, address: str, store: str, side: Side) -> Child:
    """The control plane's process (its log: tmp/server.log, appended to by a restart)."""
    suffix = "" if side.name == "this" else f" ({side.name})"
    common = ["--certs-dir", str(pki.directory), "--log-level", "warning"]
    return await spawn(
        f"server{suffix}",
        taskrun_argv("server", "--listen", address, "--store", store, *common),
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
        """The p50 of each of STAGES over the measured tasks, from their stored times."""
        samples: list[list[float]] = [[] for _ in STAGES]
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
        self.stages = {
            name: statistics.median(found) * 1000
            for (name, _), found in zip(STAGES, samples, strict=True)
            if found
        }

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


@dataclass
class DeepQueue:
    queued: int  # tasks no worker can take, waiting while the figures below are measured
    queue_seconds: float  # to create them (CreateTasks of 1,000)
    list_p50_ms_before: float  # ListTasks (first page of 50), before they were queued
    list_p50_ms: float  # the same with them queued
    list_pending_p50_ms: float  # ListTasks(statuses=PENDING) with them queued
    dispatch_tasks_per_s: float  # echo tasks end to end, as in the throughput figure


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

LATENCY_CALL = (
    "Client.submit_and_follow: each task a request on the client's one SubmitTasks stream, from "
    "submit to the terminal update (a server without it: a CreateAndFollowTask stream per task, "
    "or CreateTask, then FollowTask)"
)

METHOD = {
    "baseline": "bare grpc.aio server in its own process, same CA/server/operator certificates "
    "(mTLS), generic handlers on raw bytes; unary: sequential echo of 64 bytes after 200 warm-up "
    "calls; stream: one stream_stream call, the client writes N 64-byte messages, the server "
    "counts them and answers once at the end; relay: a Relay call (unary_stream) answers "
    "'created', hands its 72 bytes to a bare worker process over the Work stream it holds, and "
    "answers with the worker's reply: the shape of a task's round trip with nothing stored, "
    "validated or converted (as many calls as sequential tasks, one at a time)",
    "throughput": "clocks start before the first CreateTasks; clients each submit their share of "
    "batches one call at a time; after the last submit returns, one extra client polls "
    "ListTasks(statuses=PENDING,RUNNING, page_size=1) every --poll-interval until it is empty "
    "(one indexed query per poll, at most 1/interval extra calls per second, only during the "
    "tail); clocks stop at the first empty answer; the end time is therefore late by at most one "
    "poll interval plus one round trip",
    "latency": "one client, one task at a time after --warmup unmeasured ones: "
    "Client.submit_and_follow (a request on the client's one SubmitTasks stream; a "
    "CreateAndFollowTask stream per task, or CreateTask then FollowTask, on a server without "
    "it); timed from the call to the terminal update; 'until created' is the "
    "first update (the task as committed); a stream without the terminal update after "
    "--follow-timeout is abandoned, the task looked up with GetTask, and the sample left out of "
    "the figures and counted in follow_missed_end",
    "deep_queue": "N tasks for an agent no worker announces are created (CreateTasks of 1,000); "
    "ListTasks p50 (first page of 50, 50 calls) before and after; then the throughput figure's "
    "echo tasks again, timed until ListTasks(agent=echo, PENDING or RUNNING) is empty",
    "fleet": "two fresh control planes, one with two sessions and one with all N; fleet "
    "processes hold sessions that each have "
    "their own certificate and connection, heartbeat like the daemon (the server's interval "
    "while holding a run, its idle interval otherwise) and complete each assignment at once "
    "(after renewing a lapsed lease); CPU and RSS of the server over --idle-seconds, from one "
    "idle heartbeat interval and 2 s after the sessions connected (their steady rate); "
    "dispatch: --fleet-tasks echo tasks from 4 clients, "
    "with two sessions and with all N taking turns for --fleet-rounds rounds (the rate over the "
    "rounds' summed time; each round's ratio shown); the server's CPU (user+system) over each "
    "dispatch window "
    "per task (with all N it includes their heartbeats during the window), the fleet processes' "
    "own CPU per task (they share the cores with the server), and the stream messages the "
    "sessions read and wrote over the window (both ways) per 100 tasks",
    "cpu": "user+system CPU seconds of each process during the throughput phase (/proc)",
}


# --- the report --------------------------------------------------------------------------------


def ratios(b: Baseline, t: Throughput, lat: SequentialLatency) -> dict[str, float]:
    s = lat.submit_to_completed
    return {
        "end_to_end_tasks_per_s / bare_stream_msgs_per_s": t.end_to_end_tasks_per_s
        / b.stream_msgs_per_s,
        "end_to_end_tasks_per_s / bare_unary_ops_per_s": t.end_to_end_tasks_per_s
        / b.unary_ops_per_s,
        "submit_to_completed_p50 / bare_unary_p50": s.p50_ms / b.unary.p50_ms,
        "submit_to_completed_p99 / bare_unary_p99": s.p99_ms / b.unary.p99_ms,
        "create_call_p50 / bare_unary_p50": lat.create_call.p50_ms / b.unary.p50_ms,
        **(
            {"submit_to_completed_p50 / bare_relay_p50": s.p50_ms / b.relay.p50_ms}
            if b.relay is not None
            else {}
        ),
    }


def targets() -> dict[str, Any]:
    return {
        "end_to_end_tasks_per_s_min": TARGET_TASKS_PER_S,
        "submit_to_completed_p50_ms_max": TARGET_P50_MS,
        "submit_to_completed_p99_ms_max": TARGET_P99_MS,
        "idle_workers_cpu_percent_max": TARGET_IDLE_CPU_PERCENT,
        "idle_workers_rss_mb_max": TARGET_IDLE_RSS_MB,
        "dispatch_many_workers_vs_two_min": TARGET_FLEET_RATIO,
        "deep_queue_dispatch_vs_empty_min": TARGET_DEEP_RATIO,
        "deep_queue_list_vs_empty_max": TARGET_LIST_RATIO,
        "on": TARGET_MACHINE,
    }


def _ms(value: float) -> str:
    return f"{value:,.2f} ms"


def _rate(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}"


def _met(ok: bool) -> str:
    return "met" if ok else "missed"


Getter = Callable[["Report"], float | None]


@dataclass
class Row:
    """One line of the table: a figure of each side, how it compares, and its aim."""

    label: str
    value: Getter | None = None  # None: a section title
    fmt: Callable[[float], str] = str
    bare: Callable[[Report], str] = lambda _r: ""
    aim: str = ""
    met: Callable[[float], bool] | None = None
    text: Callable[[Report], str] | None = None  # shown instead of fmt(value)


def _get(r: Report, getter: Getter) -> float | None:
    try:
        return getter(r)
    except (AttributeError, KeyError, TypeError, ZeroDivisionError):
        return None  # the phase (or that figure) did not run on this side


def _stage(r: Report, name: str) -> float:
    return r.latency.stages_ms[name]


def _stage_span(_r: Report, span: str) -> str:
    return span


def rows() -> list[Row]:
    tasks_s: Callable[[float], str] = lambda v: _rate(v, "tasks/s")  # noqa: E731
    return [
        Row("bare grpc.aio mTLS unary round trip, one in flight"),
        Row("  p50", lambda r: r.baseline.unary.p50_ms, _ms, lambda _r: "baseline"),
        Row("  p99", lambda r: r.baseline.unary.p99_ms, _ms, lambda _r: "baseline"),
        Row("bare relay: call -> worker process -> answer, one in flight (the floor below)"),
        Row("  p50", lambda r: r.baseline.relay.p50_ms, _ms, lambda _r: "baseline"),  # type: ignore[union-attr]
        Row("  p99", lambda r: r.baseline.relay.p99_ms, _ms, lambda _r: "baseline"),  # type: ignore[union-attr]
        Row("bare bidi stream, one way", None),
        Row("  rate", lambda r: r.baseline.stream_msgs_per_s, lambda v: _rate(v, "msgs/s")),
        Row("throughput: echo tasks, concurrent CreateTasks, two workers"),
        Row(
            "  end to end (first submit -> all COMPLETED)",
            lambda r: r.throughput.end_to_end_tasks_per_s,
            tasks_s,
            lambda r: (
                f"{r.throughput.end_to_end_tasks_per_s / r.baseline.unary_ops_per_s:.2f}"
                " x unary ops/s"
            ),
            f">= {TARGET_TASKS_PER_S:,.0f}/s",
            lambda v: v >= TARGET_TASKS_PER_S,
        ),
        Row("  submit only", lambda r: r.throughput.submit_tasks_per_s, tasks_s),
        Row(
            "  server CPU",
            lambda r: _server_cpu(r),
            lambda v: f"{v:.0%} of a core",
        ),
        # CPU time per task moves less with the machine's load than a rate does
        Row("  CPU per task: server", lambda r: _cpu_per_task(r, "server"), _us),
        Row("  CPU per task: workers", lambda r: _cpu_per_task(r, "worker"), _us),
        Row("  CPU per task: clients", lambda r: _cpu_per_task(r, "bench"), _us),
        Row("latency: one task at a time, submit -> COMPLETED"),
        Row(
            "  p50",
            lambda r: r.latency.submit_to_completed.p50_ms,
            _ms,
            lambda r: _vs_bare(r, r.latency.submit_to_completed.p50_ms, "p50"),
            f"<= {TARGET_P50_MS:g} ms",
            lambda v: v <= TARGET_P50_MS,
        ),
        Row(
            "  p99",
            lambda r: r.latency.submit_to_completed.p99_ms,
            _ms,
            lambda r: _vs_bare(r, r.latency.submit_to_completed.p99_ms, "p99"),
            f"<= {TARGET_P99_MS:g} ms",
            lambda v: v <= TARGET_P99_MS,
        ),
        Row("  mean", lambda r: r.latency.submit_to_completed.mean_ms, _ms),
        Row(
            "  of which until created (p50)",
            lambda r: r.latency.create_call.p50_ms,
            _ms,
            lambda r: f"{r.latency.create_call.p50_ms / r.baseline.unary.p50_ms:.1f} x bare p50",
        ),
        Row("  where it went (p50 of each stage, from the times stored with the task and run)"),
        *(
            Row(
                f"    {name}",
                functools.partial(_stage, name=name),
                _ms,
                functools.partial(_stage_span, span=span),
            )
            for name, span in STAGES
        ),
        # the round trip waits for this CPU: on two cores, the processes take turns
        Row(
            "  CPU per task: server",
            lambda r: r.latency.cpu_s["server"],
            _us,
            lambda r: _vs_relay_cpu(r, "server"),
        ),
        Row(
            "  CPU per task: workers",
            lambda r: r.latency.cpu_s["workers"],
            _us,
            lambda r: _vs_relay_cpu(r, "workers"),
        ),
        Row(
            "  CPU per task: client",
            lambda r: r.latency.cpu_s["client"],
            _us,
            lambda r: _vs_relay_cpu(r, "client"),
        ),
        Row(
            "  follow misses (left out above)",
            lambda r: float(r.latency.follow_missed_end),
            lambda v: f"{v:.0f}",
        ),
        Row("deep queue: tasks that no worker can take, waiting"),
        Row("  queued", lambda r: float(r.deep_queue.queued), lambda v: f"{v:,.0f}"),  # type: ignore[union-attr]
        Row(
            "  ListTasks p50, empty queue",
            lambda r: r.deep_queue.list_p50_ms_before,  # type: ignore[union-attr]
            _ms,
        ),
        Row(
            "  ListTasks p50, deep queue",
            lambda r: r.deep_queue.list_p50_ms,  # type: ignore[union-attr]
            _ms,
            lambda r: (
                f"{r.deep_queue.list_p50_ms / r.deep_queue.list_p50_ms_before:.2f}"  # type: ignore[union-attr]
                " x empty queue"
            ),
            f"<= {TARGET_LIST_RATIO:g} x empty",
            None,
        ),
        Row(
            "  ListTasks(PENDING) p50, deep queue",
            lambda r: r.deep_queue.list_pending_p50_ms,  # type: ignore[union-attr]
            _ms,
        ),
        Row(
            "  dispatch, deep queue",
            lambda r: r.deep_queue.dispatch_tasks_per_s,  # type: ignore[union-attr]
            tasks_s,
            lambda r: f"{_deep_ratio(r):.2f} x without",
            f">= {TARGET_DEEP_RATIO:g} x without",
            None,
        ),
        Row("idle workers: sessions with their own certificate and connection"),
        Row("  sessions", lambda r: float(r.fleet.workers), lambda v: f"{v:,.0f}"),  # type: ignore[union-attr]
        Row(
            "  all connected in",
            lambda r: r.fleet.connect_seconds,  # type: ignore[union-attr]
            lambda v: f"{v:.2f} s",
        ),
        Row(
            "  server CPU while idle",
            lambda r: r.fleet.idle_cpu_percent,  # type: ignore[union-attr]
            lambda v: f"{v:.1f} % of a core",
            aim=f"< {TARGET_IDLE_CPU_PERCENT:g} % (1,000)",
            met=lambda v: v < TARGET_IDLE_CPU_PERCENT,
        ),
        Row(
            "  server memory (RSS)",
            lambda r: r.fleet.idle_rss_mb,  # type: ignore[union-attr]
            lambda v: f"{v:,.0f} MB",
            aim=f"< {TARGET_IDLE_RSS_MB:g} MB (1,000)",
            met=lambda v: v < TARGET_IDLE_RSS_MB,
        ),
        Row(
            "  dispatch, two sessions",
            lambda r: r.fleet.dispatch_two_workers_tasks_per_s,  # type: ignore[union-attr]
            tasks_s,
        ),
        Row(
            "  dispatch, all sessions",
            lambda r: r.fleet.dispatch_tasks_per_s,  # type: ignore[union-attr]
            tasks_s,
            lambda r: _round_ratios(r.fleet),  # type: ignore[arg-type]
            f">= {TARGET_FLEET_RATIO:g} x two",
            None,
        ),
        Row(
            "  server CPU per task, two sessions",
            lambda r: r.fleet.dispatch_two_workers_cpu_ms_per_task,  # type: ignore[union-attr]
            lambda v: f"{v:.3f} ms",
        ),
        Row(
            "  server CPU per task, all sessions",
            lambda r: r.fleet.dispatch_cpu_ms_per_task,  # type: ignore[union-attr]
            lambda v: f"{v:.3f} ms",
            lambda r: f"{r.fleet.dispatch_cpu_ratio:.2f} x two sessions",  # type: ignore[union-attr]
        ),
        Row(
            "    less the idle sessions' cost",
            lambda r: r.fleet.dispatch_cpu_net_ms_per_task,  # type: ignore[union-attr]
            lambda v: f"{v:.3f} ms",
            lambda r: f"{r.fleet.dispatch_cpu_net_ratio:.2f} x two sessions",  # type: ignore[union-attr]
        ),
        Row(
            "  fleet processes' CPU per task, two sessions",
            lambda r: r.fleet.dispatch_two_workers_fleet_cpu_ms_per_task,  # type: ignore[union-attr]
            lambda v: f"{v:.3f} ms",
        ),
        Row(
            "  fleet processes' CPU per task, all sessions",
            lambda r: r.fleet.dispatch_fleet_cpu_ms_per_task,  # type: ignore[union-attr]
            lambda v: f"{v:.3f} ms",
        ),
        Row(
            "  stream messages per 100 tasks, two sessions",
            lambda r: r.fleet.dispatch_two_workers_messages_per_100,  # type: ignore[union-attr]
            lambda v: f"{v:.1f}",
        ),
        Row(
            "  stream messages per 100 tasks, all sessions",
            lambda r: r.fleet.dispatch_messages_per_100,  # type: ignore[union-attr]
            lambda v: f"{v:.1f}",
        ),
        Row(
            "  kill -9 of the server: a new one answers in",
            lambda r: r.fleet.restart_answered_seconds,  # type: ignore[union-attr]
            lambda v: f"{v:.2f} s",
        ),
        Row(
            "  all sessions back in",
            lambda r: r.fleet.restart_seconds,  # type: ignore[union-attr]
            lambda v: f"{v:.2f} s",
        ),
        Row(
            "  failed connection attempts meanwhile",
            lambda r: float(r.fleet.restart_failed_connects),  # type: ignore[union-attr]
            lambda v: f"{v:,.0f}",
        ),
        Row(
            "  CPU meanwhile: the fleet processes (they share the cores)",
            lambda r: r.fleet.restart_fleet_cpu_percent,  # type: ignore[union-attr]
            lambda v: f"{v:.0f} % of a core",
        ),
        Row(
            "  CPU meanwhile: the new server",
            lambda r: r.fleet.restart_server_cpu_percent,  # type: ignore[union-attr]
            lambda v: f"{v:.0f} % of a core",
        ),
        Row("failover: fault -> next attempt RUNNING elsewhere (default lease)"),
        Row(
            "  kill -9 of the worker, slowest",
            lambda r: max(r.failover.kill_9_to_running_s),  # type: ignore[union-attr]
            lambda v: f"{v:.2f} s",
            aim="<= 5 s",
            met=lambda v: v <= 5,
            text=lambda r: r.failover.summary(r.failover.kill_9_to_running_s),  # type: ignore[union-attr]
        ),
        Row(
            "  silent network cut, slowest",
            lambda r: max(r.failover.silent_cut_to_running_s),  # type: ignore[union-attr]
            lambda v: f"{v:.2f} s",
            aim="<= 15 s",
            met=lambda v: v <= 15,
            text=lambda r: r.failover.summary(r.failover.silent_cut_to_running_s),  # type: ignore[union-attr]
        ),
    ]


def _vs_bare(r: Report, ms: float, which: str) -> str:
    """A latency against the bare unary round trip and, when measured, the bare relay."""
    unary = getattr(r.baseline.unary, f"{which}_ms")
    out = f"{ms / unary:.1f} x bare {which}"
    if r.baseline.relay is not None:
        out += f", {ms / getattr(r.baseline.relay, f'{which}_ms'):.1f} x relay"
    return out


def _vs_relay_cpu(r: Report, process: str) -> str:
    relay, ours = r.baseline.relay_cpu_s.get(process), r.latency.cpu_s.get(process)
    if not relay or ours is None:
        return ""
    return f"{ours / relay:.1f} x the relay's ({_us(relay)})"


def _server_cpu(r: Report) -> float | None:
    spent = next(
        (v for k, v in r.throughput.cpu_seconds.items() if k.split(" (")[0] == "server"), None
    )
    return None if spent is None else spent / r.throughput.end_to_end_seconds


def _cpu_per_task(r: Report, process: str) -> float | None:
    """Seconds of CPU per task spent by the processes whose name starts with `process`."""
    spent = [
        v for k, v in r.throughput.cpu_seconds.items() if k.startswith(process) and v is not None
    ]
    return sum(spent) / r.throughput.tasks if spent else None


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs"


def _deep_ratio(r: Report) -> float:
    assert r.deep_queue is not None
    return r.deep_queue.dispatch_tasks_per_s / r.throughput.end_to_end_tasks_per_s


# Aims stated as ratios within one side's run (they need two figures, not one).
RATIO_AIMS: dict[str, Callable[[Report], bool]] = {
    "  ListTasks p50, deep queue": lambda r: (
        r.deep_queue is not None
        and r.deep_queue.list_p50_ms <= TARGET_LIST_RATIO * r.deep_queue.list_p50_ms_before
    ),
    "  dispatch, deep queue": lambda r: _deep_ratio(r) >= TARGET_DEEP_RATIO,
    "  dispatch, all sessions": lambda r: (
        r.fleet is not None and r.fleet.dispatch_ratio >= TARGET_FLEET_RATIO
    ),
}


def _round_ratios(fleet: Fleet) -> str:
    rounds = ", ".join(f"{v:.2f}" for v in fleet.dispatch_round_ratios)
    return f"{fleet.dispatch_ratio:.2f} x two sessions" + (f" (rounds {rounds})" if rounds else "")


def render(this: Report, ref: Report | None = None) -> str:
    m = this.machine
    cores = f"{m['cores']} cores" + (
        f" ({m['usable_cores']} usable)" if m["usable_cores"] != m["cores"] else ""
    )
    load = m["load_1min_at_start"]
    head = [
        f"TaskRun benchmark: {cores}, Python {m['python']}, grpcio {m['grpcio']}"
        + (f", load {load:.2f} at start" if load is not None else ""),
        f"control plane: server + {len(WORKER_IDS)} workers (echo, capacity "
        f"{this.setup['capacity']} each), {this.setup['store']}, mTLS, all on 127.0.0.1",
        f"this: {this.setup['commit']}",
    ]
    if ref is not None:
        head.append(
            f"{ref.setup['side']}: {ref.setup['commit']} (measured in the same run, taking turns "
            "with this one)"
        )
    head.append("")
    header = ["figure", "this"]
    if ref is not None:
        header += [ref.setup["side"], "this / ref"]
    header += ["vs bare baseline", "aim"]
    table: list[list[str]] = [header]
    for row in rows():
        if row.value is None:
            table.append([row.label])
            continue
        mine = _get(this, row.value)
        theirs = _get(ref, row.value) if ref is not None else None
        if mine is None and theirs is None:
            continue

        def shown(r: Report, v: float | None, row: Row = row) -> str:
            if v is None:
                return "-"
            return row.text(r) if row.text is not None else row.fmt(v)

        cells = [row.label, shown(this, mine)]
        if ref is not None:
            ratio = f"{mine / theirs:.2f}" if mine is not None and theirs else ""
            cells += [shown(ref, theirs), ratio]
        try:
            bare = row.bare(this) if mine is not None else ""
        except (AttributeError, TypeError, ZeroDivisionError):
            bare = ""
        aim = row.aim
        if aim and mine is not None:
            ok = row.met(mine) if row.met is not None else RATIO_AIMS[row.label](this)
            aim = f"{aim}: {_met(ok)}"
        cells += [bare, aim]
        table.append(cells)
    # A row with only its first cell is a section title: printed whole, not sized as a column.
    columns = len(header)
    sized = [r for r in table if len(r) == columns]
    widths = [max(len(r[i]) for r in sized) for i in range(columns)]
    # Drop section titles with no figure under them (a phase that did not run).
    kept: list[list[str]] = []
    for i, r in enumerate(table):
        if len(r) == 1 and (i + 1 == len(table) or len(table[i + 1]) == 1):
            continue
        kept.append(r)
    lines = list(head)
    for i, r in enumerate(kept):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip())
        if i == 0:
            lines.append("-" * (sum(widths) + 2 * (columns - 1)))
    t = this.throughput
    lines += [
        "",
        f"throughput: {t.tasks} echo tasks, {t.clients} clients x CreateTasks({t.batch}); "
        f"latency: {this.latency.submit_to_completed.count} tasks after "
        f"{this.setup['warmup_tasks']} unmeasured, {LATENCY_CALL}",
        "aims (issue): >= 4,000 echo tasks/s end to end; sequential p50 <= 1.5 ms, p99 <= 4 ms; "
        "1,000 idle workers < 10 % of a core and < 200 MB, dispatch with them >= 0.8 x with two; "
        "10,000 queued tasks slow neither dispatch nor ListTasks",
    ]
    return "\n".join(lines)


def report(this: Report, ref: Report | None, as_json: bool) -> None:
    """The only output on stdout."""
    if as_json:
        doc: dict[str, Any] = asdict(this)
        if ref is not None:
            doc = {"this": doc, "ref": asdict(ref)}
        text = json.dumps(doc, indent=2)
    else:
        text = render(this, ref)
    sys.stdout.write(text + "\n")


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
            note("baseline: bare relay through a bare worker process")
            baseline.relay, baseline.relay_cpu_s = await measure_relay(
                f"127.0.0.1:{port}",
                pki,
                tmp,
                args.latency_tasks,
                max(args.warmup, 20),
                bare.proc.pid,
            )
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
                    pki, tmp / side.name, args.capacity, started, store_url, side
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
    if args.serve_baseline is not None:
        asyncio.run(serve_baseline(args.serve_baseline))
        return 0
    if args.bare_worker is not None:
        asyncio.run(bare_worker(Path(args.bare_worker[0]), args.bare_worker[1]))
        return 0
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
