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
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from bench_failover import FAILOVER_WORKERS, MAX_ROUNDS, Failover, measure_failover
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

from taskrun.cli.client import Client
from taskrun.controlplane.pki import PkiPaths, init_pki
from taskrun.core.models import TaskSpec
from taskrun.core.status import TaskStatus, WorkerStatus

TARGET_TASKS_PER_S = 3000.0
TARGET_P50_MS = 1.5
TARGET_P99_MS = 5.0
TARGET_MACHINE = "2-core machine"

BARE_SERVICE = "taskrun.bench.Bare"
BARE_PAYLOAD = b"x" * 64  # about the size of a CreateTask request for echo {"text": "x"}
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
        "--timeout", type=float, default=300.0, metavar="S", help="overall deadline (300)"
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
    p.add_argument("--json", action="store_true", help="print one JSON document instead")
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record server and workers with py-spy into DIR (py-spy must be installed)",
    )
    p.add_argument("--serve-baseline", type=Path, metavar="CERTS", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("tasks", "clients", "batch", "latency_tasks", "unary", "stream", "capacity"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
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
    pki: PkiPaths, tmp: Path, capacity: int, started: list[Child], store: str
) -> ControlPlane:
    """Server, then the workers once it answers; returns when both workers are ONLINE.

    Every child is appended to `started` as soon as it exists, so the caller can stop it.
    """
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--certs-dir", str(pki.directory), "--log-level", "warning"]
    server = await spawn(
        "server",
        taskrun_argv("server", "--listen", address, "--store", store, *common),
        tmp / "server.log",
    )
    started.append(server)
    async with clients(address, pki, 1) as (client,):
        await until(lambda: _answers(client), server.check, "the server to answer")
        workers = []
        for worker_id in WORKER_IDS:
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
            workers.append(await spawn(worker_id, argv, tmp / f"{worker_id}.log"))
            started.append(workers[-1])
        plane = ControlPlane(server, workers, address)

        async def online() -> bool:
            listed = await client.list_workers([WorkerStatus.ONLINE])
            return {w.id for w, _ in listed} >= set(WORKER_IDS)

        await until(online, plane.check, "both workers to be ONLINE")
    return plane


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


async def measure_latency(
    plane: ControlPlane,
    pki: PkiPaths,
    profile: Profiler,
    n: int,
    warmup: int,
    follow_timeout: float,
) -> SequentialLatency:
    total: list[float] = []
    create: list[float] = []
    follow: list[float] = []
    outcomes: Counter[str] = Counter()
    missed: list[str] = []
    async with clients(plane.address, pki, 1) as (client,):

        async def one(measured: bool) -> None:
            t0 = time.perf_counter()
            task = await client.create_task("echo", ECHO_INPUT)
            t1 = time.perf_counter()
            try:
                async with asyncio.timeout(follow_timeout):
                    final = await client.wait(task.id)
            except TimeoutError:
                # FollowTask never delivered the end: look the task up so the run goes on.
                final, _ = await client.get_task(task.id)
                if measured:
                    missed.append(f"{task.id} ({final.status.name} when looked up)")
                    outcomes[final.status.name] += 1
                return
            t2 = time.perf_counter()
            if measured:
                outcomes[final.status.name] += 1
                total.append(t2 - t0)
                create.append(t1 - t0)
                follow.append(t2 - t1)

        for _ in range(warmup):
            await one(measured=False)
        async with profile("latency"):
            for _ in range(n):
                await one(measured=True)
    if not total:
        raise BenchError(f"FollowTask never reported the end of a task within {follow_timeout:g}s")
    completed = outcomes.pop(TaskStatus.COMPLETED.name, 0)
    return SequentialLatency(
        submit_to_completed=Latency.of(total),
        create_call=Latency.of(create),
        follow_until_completed=Latency.of(follow),
        completed=completed,
        not_completed=dict(outcomes),
        follow_missed_end=len(missed),
        follow_missed_examples=missed[:5],
    )


METHOD = {
    "baseline": "bare grpc.aio server in its own process, same CA/server/operator certificates "
    "(mTLS), generic handlers on raw bytes; unary: sequential echo of 64 bytes after 200 warm-up "
    "calls; stream: one stream_stream call, the client writes N 64-byte messages, the server "
    "counts them and answers once at the end",
    "throughput": "clocks start before the first CreateTasks; clients each submit their share of "
    "batches one call at a time; after the last submit returns, one extra client polls "
    "ListTasks(statuses=PENDING,RUNNING, page_size=1) every --poll-interval until it is empty "
    "(one indexed query per poll, at most 1/interval extra calls per second, only during the "
    "tail); clocks stop at the first empty answer; the end time is therefore late by at most one "
    "poll interval plus one round trip",
    "latency": "one client, one task at a time after --warmup unmeasured ones: CreateTask, then "
    "Client.wait (FollowTask stream until the terminal update); timed from sending CreateTask to "
    "receiving COMPLETED, so it includes opening the FollowTask stream; a follow without the "
    "terminal update after --follow-timeout is abandoned, the task looked up with GetTask, and "
    "the sample left out of the figures and counted in follow_missed_end",
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
    }


def targets() -> dict[str, Any]:
    return {
        "end_to_end_tasks_per_s_min": TARGET_TASKS_PER_S,
        "submit_to_completed_p50_ms_max": TARGET_P50_MS,
        "submit_to_completed_p99_ms_max": TARGET_P99_MS,
        "on": TARGET_MACHINE,
    }


def _ms(value: float) -> str:
    return f"{value:,.2f} ms"


def _rate(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}"


def _met(ok: bool) -> str:
    return "met" if ok else "missed"


def render(r: Report) -> str:
    m, b, t, lat = r.machine, r.baseline, r.throughput, r.latency
    s = lat.submit_to_completed
    cores = f"{m['cores']} cores" + (
        f" ({m['usable_cores']} usable)" if m["usable_cores"] != m["cores"] else ""
    )
    load = m["load_1min_at_start"]
    head = [
        f"TaskRun benchmark: {cores}, Python {m['python']}, grpcio {m['grpcio']}"
        + (f", load {load:.2f} at start" if load is not None else ""),
        f"control plane: server + {len(WORKER_IDS)} workers (echo, capacity "
        f"{r.setup['capacity']} each), {r.setup['store']}, mTLS, all on 127.0.0.1",
        "",
    ]
    rows: list[tuple[str, str, str, str]] = [
        ("figure", "value", "vs bare baseline", "target"),
        (f"bare unary round trip, sequential (n={b.unary.count})", "", "", ""),
        ("  p50 / p99", f"{_ms(b.unary.p50_ms)} / {_ms(b.unary.p99_ms)}", "baseline", ""),
        ("  rate", _rate(b.unary_ops_per_s, "ops/s"), "baseline", ""),
        (f"bare bidi stream, one way (n={b.stream_messages})", "", "", ""),
        ("  rate", _rate(b.stream_msgs_per_s, "msgs/s"), "baseline", ""),
        (
            f"throughput: {t.tasks} echo tasks, {t.clients} clients x CreateTasks({t.batch})",
            "",
            "",
            "",
        ),
        (
            "  end to end (first submit -> all COMPLETED)",
            _rate(t.end_to_end_tasks_per_s, "tasks/s"),
            f"{r.ratios['end_to_end_tasks_per_s / bare_stream_msgs_per_s']:.2f} x stream msgs/s",
            f">= {TARGET_TASKS_PER_S:,.0f}/s: "
            + _met(t.end_to_end_tasks_per_s >= TARGET_TASKS_PER_S),
        ),
        (
            "",
            f"in {t.end_to_end_seconds:.2f} s",
            f"{r.ratios['end_to_end_tasks_per_s / bare_unary_ops_per_s']:.2f} x unary ops/s",
            "",
        ),
        (
            "  submit only (all CreateTasks returned)",
            _rate(t.submit_tasks_per_s, "tasks/s"),
            f"in {t.submit_seconds:.2f} s",
            "",
        ),
        (
            "  completed / failed or cancelled",
            f"{t.completed} / {sum(t.not_completed.values())}",
            "",
            "",
        ),
    ]
    wall = t.end_to_end_seconds

    def cpu_row(label: str, cpu: float | None) -> tuple[str, str, str, str]:
        value = "n/a" if cpu is None else f"{cpu:.2f} s ({cpu / wall:.0%} of a core)"
        return (label, value, "", "")

    for name, cpu in t.cpu_seconds.items():
        rows.append(cpu_row(f"  CPU {name}", cpu))
        if name == "server":
            for thread, spent in t.server_threads_cpu_seconds.items():
                rows.append(cpu_row(f"    server, {thread}", spent))
    rows += [
        (f"latency: {s.count} sequential tasks, CreateTask -> COMPLETED", "", "", ""),
        (
            "  p50",
            _ms(s.p50_ms),
            f"{r.ratios['submit_to_completed_p50 / bare_unary_p50']:.1f} x bare unary p50",
            f"<= {TARGET_P50_MS} ms: {_met(s.p50_ms <= TARGET_P50_MS)}",
        ),
        (
            "  p99",
            _ms(s.p99_ms),
            f"{r.ratios['submit_to_completed_p99 / bare_unary_p99']:.1f} x bare unary p99",
            f"<= {TARGET_P99_MS:g} ms: {_met(s.p99_ms <= TARGET_P99_MS)}",
        ),
        ("  mean / max", f"{_ms(s.mean_ms)} / {_ms(s.max_ms)}", "", ""),
        (
            "  of which CreateTask call p50",
            _ms(lat.create_call.p50_ms),
            f"{r.ratios['create_call_p50 / bare_unary_p50']:.1f} x bare unary p50",
            "",
        ),
        (
            "  of which FollowTask until COMPLETED p50",
            _ms(lat.follow_until_completed.p50_ms),
            "",
            "",
        ),
    ]
    if lat.not_completed:
        rows.append(("  not completed", json.dumps(lat.not_completed), "", ""))
    if lat.follow_missed_end:
        rows.append(
            (
                "  FollowTask missed the end (left out above)",
                f"{lat.follow_missed_end} of {s.count + lat.follow_missed_end}",
                f"no terminal update within {r.setup['follow_timeout']:g} s",
                "",
            )
        )
    if r.failover is not None:
        f = r.failover
        rows += [
            ("failover: fault -> next attempt RUNNING elsewhere (default lease)", "", "", ""),
            (
                f"  kill -9 of the worker (n={len(f.kill_9_to_running_s)})",
                f.summary(f.kill_9_to_running_s),
                "",
                "<= 5 s: " + _met(max(f.kill_9_to_running_s, default=99) <= 5),
            ),
            (
                f"  silent network cut (n={len(f.silent_cut_to_running_s)})",
                f.summary(f.silent_cut_to_running_s),
                "",
                "<= 15 s: " + _met(max(f.silent_cut_to_running_s, default=99) <= 15),
            ),
        ]
    # A row with only its first cell is a section title: printed whole, not sized as a column.
    sized = [row for row in rows if any(row[1:])]
    widths = [max(len(row[i]) for row in sized) for i in range(4)]
    lines = list(head)
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("-" * (sum(widths) + 6))
    lines += [
        "",
        f"targets (issue): >= {TARGET_TASKS_PER_S:,.0f} echo tasks/s end to end; sequential p50 "
        f"<= {TARGET_P50_MS} ms, p99 <= {TARGET_P99_MS:g} ms, on a {TARGET_MACHINE}",
        f"completion detection: ListTasks(PENDING,RUNNING, page_size=1) every "
        f"{r.setup['poll_interval'] * 1000:g} ms after the last submit "
        f"({t.completion_polls} polls, {t.poll_round_trip_ms:.2f} ms each); "
        "end time late by <= one interval",
    ]
    return "\n".join(lines)


def report(r: Report, as_json: bool) -> None:
    """The only output on stdout."""
    text = json.dumps(asdict(r), indent=2) if as_json else render(r)
    sys.stdout.write(text + "\n")


# --- main --------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, tmp: Path) -> Report:
    machine = machine_info()
    pki = init_pki(tmp / "certs", workers=(*WORKER_IDS, *FAILOVER_WORKERS))
    started: list[Child] = []
    database: Any = None  # tests.postgres.PostgresServer with --store postgresql
    store_url, store_label = f"sqlite:{tmp / 'taskrun.db'}", "SQLite in a temp file"
    try:
        if args.store == "postgresql":
            database = start_postgres()
            store_url = database.url
            store_label = "PostgreSQL on loopback (fsync on)"
        async with asyncio.timeout(args.timeout):
            note("baseline: bare grpc.aio server")
            bare, port = await start_baseline(pki, tmp)
            started.append(bare)
            baseline = await measure_baseline(f"127.0.0.1:{port}", pki, args.unary, args.stream)
            await stop(bare)

            note(f"starting the control plane ({store_label}) and workers")
            plane = await start_control_plane(pki, tmp, args.capacity, started, store_url)
            note(f"throughput: {args.tasks} echo tasks")

            def profile(phase: str) -> contextlib.AbstractAsyncContextManager[None]:
                return profiled(args.profile, phase, plane, tmp)

            throughput = await measure_throughput(
                plane, pki, profile, args.tasks, args.clients, args.batch, args.poll_interval
            )
            note(f"latency: {args.latency_tasks} sequential tasks")
            latency = await measure_latency(
                plane, pki, profile, args.latency_tasks, args.warmup, args.follow_timeout
            )
            failover = None
            if args.failover_rounds > 0:
                note(f"failover: {args.failover_rounds} x kill -9, {args.failover_rounds} x cut")
                failover = await measure_failover(pki, tmp, args.failover_rounds, started)
    except TimeoutError:
        raise BenchError(
            f"the benchmark did not finish within --timeout {args.timeout:g}s"
        ) from None
    finally:
        # Workers first (they drain and say goodbye), then the server, then anything else.
        workers = [c for c in started if c.name in WORKER_IDS]
        await asyncio.gather(*(stop(c) for c in workers))
        for child in started:
            if child not in workers:
                await stop(child)
        if database is not None:
            database.destroy()
    return Report(
        machine=machine,
        setup={
            "workers": len(WORKER_IDS),
            "capacity": args.capacity,
            "store": store_label,
            "poll_interval": args.poll_interval,
            "warmup_tasks": args.warmup,
            "follow_timeout": args.follow_timeout,
        },
        baseline=baseline,
        throughput=throughput,
        latency=latency,
        ratios=ratios(baseline, throughput, latency),
        targets=targets(),
        method=METHOD,
        failover=failover,
    )


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
    report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
