"""Many workers at once, for scripts/bench --idle-workers N.

A fleet process holds COUNT worker sessions, each with its own certificate and its own
connection (a channel with the daemon's options and a local subchannel pool), speaking the worker
protocol the way the daemon does: a hello, a numbered heartbeat (each one renews its lease)
every `heartbeat_interval_ms` the server gave it while it held a run since the last one, else
after an idle wait drawn anew each time between 80 % and all of `idle_heartbeat_interval_ms`,
numbered 0 (asking for no renewal) when the lease would lapse before the next one anyway
(as the daemon does: sessions that connected together do not beat in one wave, which made a
dispatch window that caught the wave cost 20 stream messages more per 100 tasks than one that
did not); for every assignment an immediate COMPLETED status with the
input as the result (an echo agent that costs nothing, so dispatch is what is measured), once
its lease is fresh enough (else after the renewal of a heartbeat sent at once, as the daemon
waits for it). A session that ends is opened again as the daemon does (at once after one that
was up, else after a full-jitter backoff; with the daemon's connect timeout). It prints
`ready SECONDS` once every session got its SessionParams, then serves until SIGTERM; on SIGUSR1
it prints `messages RECEIVED SENT FAILED`, what its sessions read and wrote so far (the server
wrote and read as many) and the connection attempts that got no session.

scripts/bench.py (`fleet_many`) starts two fresh control planes: one with two fleet sessions (the
reference) and one with N sessions from --fleet-procs processes. With all N connected: the time
until they are, the server's CPU (% of one core) and resident memory over --idle-seconds of
idleness; then the dispatch rate of --fleet-tasks echo tasks on each plane, taking turns for
--fleet-rounds rounds (every session fits, so the planner sees N candidates); then kill -9 of the
N-session server and a new one on the same address and store: the time until all N are ONLINE
again, the connection attempts that failed meanwhile and the CPU both sides used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from benchprocs import READY_WITHIN, BenchError, Child, clients, spawn

from taskrun.controlplane.pki import PkiPaths
from taskrun.core.status import WorkerStatus
from taskrun.v1 import common_pb2 as pb
from taskrun.v1 import workers_pb2 as wpb
from taskrun.v1 import workers_pb2_grpc
from taskrun.worker import daemon as worker_daemon
from taskrun.worker.daemon import KEEPALIVE_OPTIONS

CONNECT_TIMEOUT_MS: int = getattr(worker_daemon, "CONNECT_TIMEOUT_MS", 0)

SCRIPT = Path(__file__).resolve()


def fleet_ids(n: int) -> list[str]:
    return [f"fleet-{i:05d}" for i in range(n)]


MESSAGES = [0, 0]  # read, written by this process's sessions since it started
FAILED_CONNECTS = [0]  # connection attempts that got no session, since it started


# --- the fleet process -------------------------------------------------------------------------


class FakeWorker:
    """One session: hello, heartbeats, and an instant COMPLETED for each assignment."""

    def __init__(self, worker_id: str, capacity: int) -> None:
        self.worker_id = worker_id
        self.capacity = capacity
        self.ready = asyncio.Event()  # the first session got its SessionParams
        self._reset()

    def _reset(self) -> None:
        """A new session starts from nothing (an idle worker has nothing to resend)."""
        self._up = False
        self._out: list[wpb.RunStatusUpdate] = []
        self._waiting: list[wpb.RunAssignment] = []  # until the lease is renewed
        self._heartbeat = False
        self._wake = asyncio.Event()
        self._beat_now = False  # the lease lapsed and a run waits: heartbeat at once
        self._nudge = asyncio.Event()  # a run came: the heartbeat pace may change
        self._seq = 0
        self._beat = 0
        self._sent: dict[int, float] = {}  # heartbeat seq -> when sent
        self._lease = 0.0
        self._expires = 0.0
        self._held = False  # held a run since the last heartbeat
        self._renewal_outlasts_idle = True  # set from the session params
        self._quiet = False  # the next heartbeat asks for no renewal

    async def run(self, address: str, pki: PkiPaths) -> None:
        """Sessions, one after the other, as the daemon holds them: after a session that was
        up, at once; after a failed attempt, a full-jitter backoff (0.2 s doubling, at most
        10 s). Failed attempts are counted (FAILED_CONNECTS)."""
        failures = 0
        while True:
            self._reset()
            try:
                await self._session(address, pki)
            except (grpc.aio.AioRpcError, BenchError) as exc:
                if not self._up:
                    failures += 1
                    FAILED_CONNECTS[0] += 1
                    sys.stderr.write(f"{self.worker_id}: {exc}\n")
                    await asyncio.sleep(random.uniform(0, min(10.0, 0.2 * 2**failures)))
                    continue
            failures = 0

    async def _session(self, address: str, pki: PkiPaths) -> None:
        creds = grpc.ssl_channel_credentials(
            root_certificates=pki.ca_cert.read_bytes(),
            private_key=pki.worker_key(self.worker_id).read_bytes(),
            certificate_chain=pki.worker_cert(self.worker_id).read_bytes(),
        )
        options = [*KEEPALIVE_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
        if CONNECT_TIMEOUT_MS:  # the daemon's connect timeout (a --compare-ref side may lack it)
            options.append(("grpc.min_reconnect_backoff_ms", CONNECT_TIMEOUT_MS))
        async with grpc.aio.secure_channel(address, creds, options=options) as channel:
            call = workers_pb2_grpc.RunServiceStub(channel).StreamConnect()
            hello = wpb.WorkerHello(
                worker_id=self.worker_id,
                hostname="bench",
                version="bench",
                agents=[pb.AgentSpec(name="echo")],
                max_concurrent_runs=self.capacity,
            )
            hello_sent = time.monotonic()
            await call.write(wpb.WorkerMessage(hello=hello))
            first = await call.read()
            if first is grpc.aio.EOF or not first.HasField("params"):
                raise BenchError(f"{self.worker_id}: no session params")
            params = first.params
            busy = params.heartbeat_interval_ms / 1000 or 1.0
            # getattr: a --compare-ref side's generated code may predate the field
            idle = max(busy, getattr(params, "idle_heartbeat_interval_ms", 0) / 1000)
            self._lease = params.lease_duration_ms / 1000
            # HeartbeatPace.asks_renewal: would a renewal keep it ready until the next idle beat?
            ready_window = self._lease - 2 * min(1.0, self._lease / 4)
            self._renewal_outlasts_idle = max(busy, 0.8 * idle) <= ready_window
            self._expires = hello_sent + self._lease
            self._up = True
            self.ready.set()
            tasks = [
                asyncio.create_task(self._beats(busy, idle)),
                asyncio.create_task(self._writes(call)),
            ]
            try:
                while True:
                    msg = await call.read()
                    if msg is grpc.aio.EOF:
                        return
                    MESSAGES[0] += 1
                    if msg.lease_seq:
                        self._granted(msg.lease_seq)
                    if msg.assignments:
                        if not self._held:
                            self._nudge.set()  # it was idle: heartbeat at the busy pace
                        self._held = True
                        self._waiting.extend(msg.assignments)
                        if not self._fresh():
                            self._beat_now = True
                            self._nudge.set()
                    if self._waiting and self._fresh():
                        for a in self._waiting:
                            self._out.append(
                                wpb.RunStatusUpdate(
                                    run_id=a.run_id,
                                    attempt=a.attempt,
                                    status=pb.RUN_STATUS_COMPLETED,
                                    result_json=a.input_json,
                                )
                            )
                        self._waiting = []
                        self._wake.set()
            finally:
                for t in tasks:
                    t.cancel()

    def _granted(self, seq: int) -> None:
        sent = self._sent.get(seq)
        for old in [s for s in self._sent if s <= seq]:
            del self._sent[old]
        if sent is not None:
            self._expires = max(self._expires, sent + self._lease)

    def _fresh(self) -> bool:
        """The daemon's Lease.ready_to_start (no lease at all: an old server, always fresh)."""
        lead = min(1.0, self._lease / 4)
        return not self._lease or self._expires - time.monotonic() > 2 * lead

    async def _beats(self, busy: float, idle: float) -> None:
        last, idle_wait = time.monotonic(), random.uniform(max(busy, 0.8 * idle), idle)
        while True:
            wait = last + (busy if self._held else idle_wait) - time.monotonic()
            if wait > 0 and not self._beat_now:
                self._nudge.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._nudge.wait()
                continue
            self._beat_now = False
            # asks for no renewal, like the daemon's (HeartbeatPace.asks_renewal)
            self._quiet = not (self._held or self._waiting or self._renewal_outlasts_idle)
            self._held = bool(self._waiting)
            last, idle_wait = time.monotonic(), random.uniform(max(busy, 0.8 * idle), idle)
            self._heartbeat = True
            self._wake.set()

    async def _writes(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            msg = wpb.WorkerMessage()
            if self._out:
                msg.statuses.extend(self._out)
                self._out = []
                self._seq += 1
                msg.message_seq = self._seq
            if self._heartbeat:
                self._heartbeat = False
                if self._quiet:
                    msg.heartbeat.seq = 0
                else:
                    self._beat += 1
                    msg.heartbeat.seq = self._beat
                    self._sent[self._beat] = time.monotonic()
                msg.heartbeat.time.GetCurrentTime()
            MESSAGES[1] += 1
            await call.write(msg)


async def serve_fleet(address: str, certs: Path, ids: Sequence[str], capacity: int) -> None:
    pki = PkiPaths.at(certs)
    workers = [FakeWorker(w, capacity) for w in ids]
    started = time.perf_counter()
    sessions = [asyncio.create_task(w.run(address, pki)) for w in workers]
    ready: asyncio.Future[Any] = asyncio.ensure_future(
        asyncio.gather(*(w.ready.wait() for w in workers))
    )
    waiting: list[asyncio.Future[Any]] = [ready, *sessions]
    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if ready not in done:  # sessions go on after any gRPC error: this is a bug of the fleet
        failed = next(s for s in sessions if s.done())
        raise BenchError(f"a session stopped before all were connected: {failed.exception()}")
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    loop.add_signal_handler(signal.SIGUSR1, _print_messages)  # before anyone may send it
    sys.stdout.write(f"ready {time.perf_counter() - started:.3f}\n")
    sys.stdout.flush()
    await stopping.wait()
    for s in sessions:
        s.cancel()
    await asyncio.gather(*sessions, return_exceptions=True)


def _print_messages() -> None:
    sys.stdout.write(f"messages {MESSAGES[0]} {MESSAGES[1]} {FAILED_CONNECTS[0]}\n")
    sys.stdout.flush()


# --- measuring ---------------------------------------------------------------------------------


@dataclass
class Fleet:
    workers: int
    processes: int
    connect_seconds: float  # the slowest process, from its start to its last SessionParams
    idle_seconds: float
    idle_cpu_percent: float  # of one core, the server process
    idle_rss_mb: float
    idle_rss_kb_per_worker: float
    tasks: int
    dispatch_tasks_per_s: float
    dispatch_two_workers_tasks_per_s: float
    # the server's CPU over each dispatch window, per task
    dispatch_cpu_ms_per_task: float = 0.0
    dispatch_two_workers_cpu_ms_per_task: float = 0.0
    # the fleet processes' own CPU over each window, per task (they share the machine's cores)
    dispatch_fleet_cpu_ms_per_task: float = 0.0
    dispatch_two_workers_fleet_cpu_ms_per_task: float = 0.0
    # stream messages over each window (both ways) per 100 tasks: assignments, reports, acks,
    # heartbeats and their lease replies
    dispatch_messages_per_100: float = 0.0
    dispatch_two_workers_messages_per_100: float = 0.0
    # the rate with all N against the rate with two, in each round of the turns they took
    dispatch_round_ratios: list[float] = field(default_factory=list)
    # kill -9 of the control plane with all N sessions connected and idle, and a new one on the
    # same address and store: the time from its start until all N are ONLINE again, and the
    # connection attempts that got no session meanwhile (refused, or given up after the
    # daemon's connect timeout)
    restart_answered_seconds: float = 0.0  # from its start until it answers a call
    restart_seconds: float = 0.0
    restart_failed_connects: int = 0
    restart_fleet_cpu_percent: float = 0.0  # the fleet processes' CPU over that window
    restart_server_cpu_percent: float = 0.0  # the new server's, from its start

    @property
    def dispatch_ratio(self) -> float:
        return self.dispatch_tasks_per_s / self.dispatch_two_workers_tasks_per_s

    @property
    def dispatch_cpu_ratio(self) -> float:
        return self.dispatch_cpu_ms_per_task / (self.dispatch_two_workers_cpu_ms_per_task or 1.0)

    @property
    def dispatch_cpu_net_ms_per_task(self) -> float:
        """CPU per task with all sessions, less what they cost idle (their heartbeats) over the
        same window: what dispatching itself cost."""
        idle_ms_per_s = self.idle_cpu_percent * 10
        return self.dispatch_cpu_ms_per_task - idle_ms_per_s / self.dispatch_tasks_per_s

    @property
    def dispatch_cpu_net_ratio(self) -> float:
        return self.dispatch_cpu_net_ms_per_task / (
            self.dispatch_two_workers_cpu_ms_per_task or 1.0
        )


async def fleet_messages(fleet: Sequence[Child]) -> int:
    """Stream messages the fleet processes' sessions read and wrote so far, all together."""
    return (await fleet_counts(fleet))[0]


async def fleet_counts(fleet: Sequence[Child]) -> tuple[int, int]:
    """The fleet processes' stream messages (read and written) and failed connection attempts
    so far, all together."""
    messages = failed = 0
    for child in fleet:
        assert child.proc.stdout is not None
        child.proc.send_signal(signal.SIGUSR1)
        async with asyncio.timeout(READY_WITHIN):
            line = (await child.proc.stdout.readline()).decode().split()
        if line[:1] != ["messages"]:
            raise BenchError(f"{child.name}: {' '.join(line)!r} instead of its message counts")
        messages += int(line[1]) + int(line[2])
        failed += int(line[3])
    return messages, failed


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def start_fleet(
    address: str,
    pki: PkiPaths,
    ids: Sequence[str],
    procs: int,
    capacity: int,
    tmp: Path,
    env: dict[str, str] | None,
) -> tuple[list[Child], float]:
    """Fleet processes holding `ids` between them; returns once every session is connected."""
    shares = [list(ids[i::procs]) for i in range(procs) if ids[i::procs]]
    children = []
    for i, share in enumerate(shares):
        argv = [
            sys.executable,
            str(SCRIPT),
            address,
            str(pki.directory),
            ",".join(share),
            str(capacity),
        ]
        children.append(
            await spawn(f"fleet-{i}", argv, tmp / f"fleet-{i}.log", pipe_stdout=True, env=env)
        )
    slowest = 0.0
    for child in children:
        assert child.proc.stdout is not None
        try:
            async with asyncio.timeout(READY_WITHIN * 2):
                line = (await child.proc.stdout.readline()).decode()
        except TimeoutError:
            raise BenchError(f"{child.name} did not connect its sessions in time") from None
        if not line.startswith("ready "):
            await child.proc.wait()
            child.check()
            raise BenchError(f"{child.name}: {line!r}")
        slowest = max(slowest, float(line.split()[1]))
    return children, slowest


async def wait_online(address: str, pki: PkiPaths, n: int) -> None:
    """Until `n` workers are ONLINE (a server still starting answers UNAVAILABLE: asked again)."""
    async with clients(address, pki, 1) as (client,):
        deadline = time.monotonic() + READY_WITHIN
        while True:
            try:
                if len(await client.list_workers([WorkerStatus.ONLINE])) >= n:
                    return
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            if time.monotonic() > deadline:
                raise BenchError(f"fewer than {n} workers ONLINE after {READY_WITHIN:g}s")
            await asyncio.sleep(0.1)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_fleet", description="hold fake worker sessions")
    p.add_argument("address")
    p.add_argument("certs", type=Path)
    p.add_argument("ids", help="comma-separated worker ids (their certificates are in CERTS)")
    p.add_argument("capacity", type=int)
    args = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_fleet(args.address, args.certs, args.ids.split(","), args.capacity))
    return 0


if __name__ == "__main__":
    sys.exit(main())
