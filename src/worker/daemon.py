"""The worker daemon: one StreamConnect session at a time, runs executed concurrently.

Top to bottom: connect (with exponential backoff and jitter), say hello, then read assignments
and cancellations while one writer task sends batched output, status and heartbeats. When the
stream breaks, runs keep going and their reports wait in the outbox for the next session, for
as long as the worker's lease on them lasts (see worker.lease): a worker that cannot renew it
stops them itself, and the supervisor of every child process kills it when the lease ends. On
SIGTERM/SIGINT the worker drains: it takes no new runs, finishes what it has (up to a deadline),
reports it and exits; a second signal stops the runs at once.

Why one module: the session loop, the lease, certificate handover and drain all act on the
daemon's one stream and its runs and outbox; the parts that stand alone are already apart
(lease.py, renewal.py, outbox.py, executor.py, supervise.py). The session loop is the next
thing to move out if it grows.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import grpc
import structlog
from cryptography import x509
from tenacity import AsyncRetrying, retry_if_exception, wait_random_exponential

from taskrun import __version__, convert
from taskrun.core.agent import Agent, SubtaskAccess
from taskrun.core.ids import RunId, TaskId
from taskrun.core.status import Fault
from taskrun.metrics_http import MetricsServer
from taskrun.runtime import settle_garbage_collector
from taskrun.servers import ServerList, leader_of
from taskrun.v1 import common_pb2 as pb
from taskrun.v1 import workers_pb2 as wpb
from taskrun.v1 import workers_pb2_grpc
from taskrun.worker.agents import load_agents
from taskrun.worker.config import WorkerConfig
from taskrun.worker.executor import ActiveRun, RunContext, execute
from taskrun.worker.identity import enroll_command, fingerprint_of, load_identity
from taskrun.worker.lease import HeartbeatPace, Lease, LeaseFile
from taskrun.worker.metrics import WorkerMetrics
from taskrun.worker.outbox import Outbox
from taskrun.worker.readiness import announce
from taskrun.worker.renewal import RenewalError, RenewalRefused, renew, renewal_time
from taskrun.worker.supervise import command as supervised_command

log = structlog.get_logger(__name__)

FATAL_CODES = frozenset(
    {
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)

KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.ping_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

# After a renewal: how long the old session may wait for the server to acknowledge what it sent.
HANDOVER_SETTLE = 1.5
RENEW_RETRY_MIN = 1.0
RENEW_RETRY_MAX = 60.0
# A control plane that froze (SIGSTOP, a hung machine) still completes TCP handshakes in its
# kernel and never answers the TLS one; grpc waits 20 s for it by default, longer than a lease, so
# a worker with several addresses reached the new leader only after its runs were lost.
CONNECT_TIMEOUT_MS = 3_000


class FatalSessionError(Exception):
    """The server refused this worker in a way retrying cannot fix."""


class CertificateExpired(FatalSessionError):
    """The worker's certificate expired: it cannot connect or renew, only enroll again."""

    def __init__(self, expired_at: datetime, command: str) -> None:
        super().__init__(f"the worker certificate expired at {expired_at.isoformat()}")
        self.expired_at = expired_at
        self.command = command


class SessionLost(Exception):
    """An established session ended; reconnecting starts a fresh backoff."""


class SessionMoved(SessionLost):
    """The session ended on purpose, to go on over a channel with the renewed certificate."""


@dataclasses.dataclass
class _Handover:
    """How a session ends: handing over to a renewed certificate by `settle_by` (loop time), or
    `closing` (everything sent and committed, the stream half-closed: only its end is awaited)."""

    settle_by: float | None = None
    closing: bool = False


class WorkerDaemon:
    def __init__(self, config: WorkerConfig, agents: dict[str, Agent]) -> None:
        config = config.with_identity()
        self.config = config
        # several control planes: the one in use, following the leader (see taskrun.servers)
        self.servers = ServerList(config.server, config.server_name or None)
        self.workspaces = config.workspaces()  # ValueError for a root among the worker's keys
        self.agents = agents
        self.announced = announce(agents)  # the specs with what can run here now
        self._agents_due = False  # the announcement changed: send it on the session
        self.outbox = Outbox()
        self.runs: dict[RunId, ActiveRun] = {}
        self.draining = False
        self.connected = asyncio.Event()
        self._params = wpb.SessionParams(
            heartbeat_interval_ms=5000,
            max_chunks_per_message=512,
            max_chunk_bytes=64 * 1024,
            max_message_bytes=4 * 1024 * 1024,
        )
        self._exit = asyncio.Event()
        self._runs_idle = asyncio.Event()
        self._runs_idle.set()
        self._draining_unsent = False
        self._heartbeat_due = False
        self._pace = HeartbeatPace(1.0, 1.0)  # set per session from its SessionParams
        self._pace_changed = asyncio.Event()  # a run started: the heartbeat pace may be faster
        self._beat_asked = 0.0  # time.monotonic() when a heartbeat was last asked for
        # Assignments that came while the lease had lapsed (an idle worker): they start once a
        # heartbeat sent for them renewed it, and are dropped with the session otherwise (the
        # server sends them again to a new session, or retries them elsewhere).
        self._waiting: list[wpb.RunAssignment] = []
        self._signals = 0
        self._drainer: asyncio.Task[None] | None = None
        self.log = log.bind(worker_id=config.worker_id)
        self.metrics = WorkerMetrics(lambda: len(self.runs))
        self._move = asyncio.Event()  # renewed (or refused): end the session, reconnect at once
        self._writes_open = asyncio.Event()  # cleared while a session hands over
        self._fatal: FatalSessionError | None = None  # set by the renewal loop
        self.lease = Lease()
        self._lease_lost = asyncio.Event()  # the lease ran out: drop the session, reconnect
        self._fenced_expiry: float | None = None  # the lease end whose runs were stopped
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="taskrun-worker-"))
        self.lease_file = LeaseFile(self.runtime_dir / "lease")
        self.lease_file.end()
        # the lease file and the supervised wrappers are the worker's, not the agents'
        self.workspaces = dataclasses.replace(
            self.workspaces, protected=(*self.workspaces.protected, self.runtime_dir.resolve())
        )
        self._programs: dict[str, str] = {}  # program -> its supervised wrapper

    # --- top level ---------------------------------------------------------------------------

    async def run(self) -> int:
        """Hold a session until the daemon is told to exit; 0 on a clean exit.

        Meanwhile the certificate is renewed before it expires, and the session moved to it.
        """
        renewer = asyncio.create_task(self._renewal_loop())
        watcher = asyncio.create_task(self._lease_watch())
        checker = asyncio.create_task(self._readiness_loop())
        try:
            return await self._hold_sessions()
        finally:
            for task in (renewer, watcher, checker):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            self.lease_file.end()
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    async def _hold_sessions(self) -> int:
        while not self._exit.is_set():
            try:
                async for attempt in AsyncRetrying(
                    wait=self._reconnect_wait,
                    retry=retry_if_exception(_retryable),
                    sleep=self._sleep,
                    before_sleep=self._log_retry,
                    reraise=True,
                ):
                    with attempt:
                        if self._exit.is_set():
                            break
                        await self._session()
            except SessionMoved:
                self.log.info("moving the session to the renewed certificate")
            except SessionLost as exc:
                # it was up: reconnect at once, then back off from the start again
                self.log.warning("lost the control plane; reconnecting", error=str(exc))
            except CertificateExpired as exc:
                self.log.error(
                    "certificate expired; enroll again",
                    expired_at=exc.expired_at.isoformat(),
                    command=exc.command,
                    reason=f"{exc}; enroll again with: {exc.command}",
                )
                self._stop_all_runs("the worker certificate expired")
                return 2
            except FatalSessionError as exc:
                self.log.error("server refused this worker", reason=str(exc))
                self._stop_all_runs("the server refused this worker")
                return 2
            except asyncio.CancelledError:
                self._stop_all_runs("worker interrupted")
                raise
        await self._wait_runs(5.0)
        self.log.info("worker stopped")
        return 0

    def _reconnect_wait(self, state: Any) -> float:
        """Full jitter: uniformly in [0, min(max, 0.2 * 2^n)]; while the worker holds runs or
        reports about them, at most an eighth of the lease, so that it comes back before the
        lease runs out (the control plane then retries the runs, and their reports are late)."""
        wait = float(
            wait_random_exponential(multiplier=0.2, max=self.config.reconnect_max_wait)(state)
        )
        holding = self.runs or len(self.outbox) or self.outbox.unacknowledged
        if holding and self.lease.duration:
            wait = min(wait, self.lease.duration / 8)
        return wait

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._exit.wait()

    def _log_retry(self, state: object) -> None:
        outcome = getattr(state, "outcome", None)
        exc = outcome.exception() if outcome is not None else None
        self.log.warning(
            "connection to control plane failed; retrying",
            server=self.config.server,
            error=_describe(exc),
            wait_s=round(getattr(getattr(state, "next_action", None), "sleep", 0.0), 2),
        )

    def on_signal(self) -> None:
        """First signal: drain. Second: stop runs now."""
        self._signals += 1
        if self._signals == 1:
            self.log.info("signal received: draining (send again to stop runs now)")
            self.begin_drain()
        else:
            self.log.warning("second signal: stopping runs now")
            self._stop_all_runs("worker interrupted")
            self._exit_soon()

    # --- the session -------------------------------------------------------------------------

    def _channel(self) -> grpc.aio.Channel:
        cfg = self.config
        try:
            creds = grpc.ssl_channel_credentials(
                root_certificates=cfg.ca_cert.read_bytes(),
                private_key=cfg.key_path().read_bytes(),
                certificate_chain=cfg.cert_path().read_bytes(),
            )
        except FileNotFoundError as exc:
            raise FatalSessionError(
                f"{exc.filename} is missing: enroll this machine (`taskrun worker enroll`) or "
                f"create the files with `taskrun certs init` / "
                f"`taskrun certs worker {cfg.worker_id}`"
            ) from None
        options: list[tuple[str, str | int]] = [
            *KEEPALIVE_OPTIONS,
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.min_reconnect_backoff_ms", CONNECT_TIMEOUT_MS),  # also the connect timeout
        ]
        endpoint = self.servers.current
        if endpoint.tls_name:
            options.append(("grpc.ssl_target_name_override", endpoint.tls_name))
        return grpc.aio.secure_channel(endpoint.target, creds, options=options)

    def _check_not_expired(self) -> None:
        """CertificateExpired when the certificate in use is past its end (a missing or
        unreadable file is reported by `_channel`)."""
        cert = self._current_cert()
        if cert is not None and cert.not_valid_after_utc <= _utcnow():
            raise CertificateExpired(cert.not_valid_after_utc, self._enroll_again())

    def _current_cert(self) -> x509.Certificate | None:
        try:
            return x509.load_pem_x509_certificate(self.config.cert_path().read_bytes())
        except (OSError, ValueError):
            return None

    def _enroll_again(self) -> str:
        """The command that gives this worker a new identity, filled in as far as known."""
        cfg = self.config
        identity = None
        if cfg.state_dir is not None:
            with contextlib.suppress(ValueError):
                identity = load_identity(cfg.state_dir)
        if identity is not None:
            return enroll_command(
                enroll_server=identity.enroll_server,
                ca_fingerprint=identity.ca_fingerprint,
                state_dir=cfg.state_dir,
            )
        fingerprint = ""
        with contextlib.suppress(OSError, ValueError):
            fingerprint = fingerprint_of(x509.load_pem_x509_certificate(cfg.ca_cert.read_bytes()))
        return enroll_command(ca_fingerprint=fingerprint, state_dir=cfg.state_dir)

    # --- certificate renewal -----------------------------------------------------------------

    async def _renewal_loop(self) -> None:
        """Renew at a jittered 70 to 90 % of each certificate's lifetime, then move the session.

        Ends when the certificate cannot be read or expired (connecting then stops the worker),
        or when the control plane refuses this identity (fatal, like a revoked stream).
        """
        while True:
            cert = self._current_cert()
            if cert is None or cert.not_valid_after_utc <= _utcnow():
                return
            at = renewal_time(cert)
            self.log.debug(
                "certificate renewal scheduled",
                at=at.isoformat(),
                expires_at=cert.not_valid_after_utc.isoformat(),
            )
            await asyncio.sleep(max(0.0, (at - _utcnow()).total_seconds()))
            if not await self._renew_before(cert.not_valid_after_utc):
                return

    async def _renew_before(self, expires_at: datetime) -> bool:
        """Try to renew until expires_at, backing off between failures; True once renewed."""
        cfg = self.config
        backoff = RENEW_RETRY_MIN
        while True:
            remaining = (expires_at - _utcnow()).total_seconds()
            if remaining <= 0:
                self.log.error(
                    "certificate expired before it could be renewed",
                    expired_at=expires_at.isoformat(),
                    command=self._enroll_again(),
                )
                return False
            try:
                renewed = await renew(
                    server=self.servers.current.target,
                    server_name=self.servers.current.tls_name or "",
                    ca_cert=cfg.ca_cert,
                    cert=cfg.cert_path(),
                    key=cfg.key_path(),
                )
            except RenewalRefused as exc:
                self.log.error("certificate renewal refused", reason=str(exc))
                self._fatal = FatalSessionError(f"PERMISSION_DENIED: {exc}")
                self._move.set()
                self.outbox.poke()
                return False
            except RenewalError as exc:
                wait = min(backoff, remaining) * random.uniform(0.5, 1.0)
                self.log.warning(
                    "certificate renewal failed; retrying",
                    error=str(exc),
                    retry_in_s=round(wait, 2),
                    expires_at=expires_at.isoformat(),
                )
                await asyncio.sleep(wait)
                backoff = min(backoff * 2, RENEW_RETRY_MAX)
                continue
            self.log.info(
                "certificate renewed",
                expires_at=renewed.not_valid_after_utc.isoformat(),
                serial=format(renewed.serial_number, "x"),
            )
            self._move.set()
            return True

    def _hello(self) -> wpb.WorkerHello:
        cfg = self.config
        hello = wpb.WorkerHello(
            worker_id=cfg.worker_id,
            hostname=socket.gethostname(),
            version=__version__,
            agents=[convert.agent_to_pb(a) for a in self.announced],
            labels=cfg.labels,
            max_concurrent_runs=cfg.capacity,
            draining=self.draining,
        )
        held: dict[str, wpb.HeldRun] = {}
        for run_id, active in self.runs.items():
            a = active.assignment
            held[run_id] = wpb.HeldRun(
                run_id=run_id,
                attempt=a.attempt,
                status=cast(pb.RunStatus, int(active.status)),
                last_seq=active.ctx.seq,
            )
        for queued_id, update in self.outbox.pending_statuses().items():
            held.setdefault(
                queued_id,
                wpb.HeldRun(
                    run_id=queued_id,
                    attempt=update.attempt,
                    status=update.status,
                    last_seq=update.last_seq,
                ),
            )
        hello.held_runs.extend(held.values())
        return hello

    async def _session(self) -> None:
        for first in (True, False):
            try:
                await self._session_on(self.servers.current.target)
                return
            except (ConnectionError, grpc.aio.AioRpcError) as exc:
                before = self.servers.current.target
                self.servers.failed(exc)  # a standby named the leader, or try the next address
                if self.servers.current.target == before:
                    raise
                self.log.info("moving to another control plane", server=self.servers.current.target)
                named = isinstance(exc, grpc.aio.AioRpcError) and leader_of(exc)
                if not (first and named):
                    raise  # the next attempt comes after the usual backoff
                # a standby named the leader: go there at once

    async def _session_on(self, target: str) -> None:
        if self._fatal is not None:
            raise self._fatal
        self._check_not_expired()
        self._fence_if_expired()  # runs past their lease never reach a new session as held
        self._move.clear()  # the channel made now uses the newest certificate
        async with self._channel() as channel:
            call = workers_pb2_grpc.RunServiceStub(channel).StreamConnect()
            try:
                self.lease.hello_sent()
                await write(call, wpb.WorkerMessage(hello=self._hello()))
                first = await call.read()
                if first is grpc.aio.EOF or not first.HasField("params"):
                    code, details = await call.code(), await call.details()
                    if code in FATAL_CODES:
                        raise FatalSessionError(f"{code.name}: {details}")
                    raise grpc.aio.AioRpcError(
                        code,
                        await call.initial_metadata(),
                        await call.trailing_metadata(),
                        f"session refused by {target}: {details}",
                    )
                self._params = first.params
                if first.params.lease_duration_ms > 0:
                    self.lease.session_granted(first.params.lease_duration_ms / 1000)
                    self._lease_changed()
                try:
                    await self._serve(call)
                except (ConnectionError, grpc.aio.AioRpcError) as exc:
                    if isinstance(exc, grpc.aio.AioRpcError) and exc.code() in FATAL_CODES:
                        raise
                    raise SessionLost(_describe(exc)) from exc
            except grpc.aio.AioRpcError as exc:
                if exc.code() in FATAL_CODES:
                    raise FatalSessionError(f"{exc.code().name}: {exc.details()}") from None
                raise
            finally:
                self.connected.clear()
                call.cancel()

    async def _serve(self, call: grpc.aio.StreamStreamCall) -> None:
        self.connected.set()
        self.log.info(
            "connected",
            server=self.config.server,
            session_id=self._params.session_id,
            runs=len(self.runs),
        )
        self._draining_unsent = False
        resent = self.outbox.requeue_unacknowledged()
        if resent:
            self.log.info("resending reports the server did not acknowledge", items=resent)
        self._writes_open.set()
        self._lease_lost.clear()
        p = self._params
        busy = max(0.05, p.heartbeat_interval_ms / 1000 or 1.0)
        self._pace = HeartbeatPace(busy, p.idle_heartbeat_interval_ms / 1000)
        writer = asyncio.create_task(self._write_loop(call))
        heartbeat = asyncio.create_task(self._heartbeat_loop())
        lease_lost = asyncio.create_task(self._lease_lost.wait())
        moving: asyncio.Task[Any] | None = asyncio.create_task(self._move.wait())
        # One task reads and handles every message: a message costs one wakeup, not a task
        # and a wait over all of these futures. It ends at the stream's end, or once a session
        # that hands over has nothing left unacknowledged.
        handover = _Handover()
        reader = asyncio.create_task(self._read_loop(call, handover))
        loop = asyncio.get_running_loop()
        try:
            while True:
                waiting: set[asyncio.Future[Any]] = {reader, writer, lease_lost}
                if moving is not None:
                    waiting.add(moving)
                settle_by = handover.settle_by
                timeout = None if settle_by is None else max(0.0, settle_by - loop.time())
                done, _ = await asyncio.wait(
                    waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if lease_lost in done:
                    raise ConnectionError(
                        "the lease ran out: the control plane answered no heartbeat for "
                        f"{self.lease.duration:g}s"
                    )
                if writer in done:
                    writer.result()  # raises if the writer failed
                    # Every report is out and we half-closed: the server ends the stream once
                    # it has read them all. Cancelling the call earlier could drop them.
                    handover.closing = True
                    with contextlib.suppress(Exception, TimeoutError):
                        async with asyncio.timeout(10.0):
                            await asyncio.shield(reader)
                    return
                if moving is not None and moving in done:
                    moving = None
                    if self._fatal is not None:
                        raise self._fatal
                    if not self._exit.is_set():  # an exiting worker finishes on this channel
                        # Send nothing more here; keep reading acks until the server has
                        # committed what it got (or briefly), then reconnect with the new files.
                        self._writes_open.clear()
                        handover.settle_by = loop.time() + HANDOVER_SETTLE
                        if not self.outbox.unacknowledged:
                            raise SessionMoved("the certificate was renewed")
                if reader in done:
                    if reader.result() is not grpc.aio.EOF:  # handed over
                        raise SessionMoved("the certificate was renewed")
                    code = await call.code()
                    if code in FATAL_CODES:
                        raise FatalSessionError(f"{code.name}: {await call.details()}")
                    if self._exit.is_set():
                        return
                    raise ConnectionError(f"stream ended: {code.name}: {await call.details()}")
                if handover.settle_by is not None and loop.time() >= handover.settle_by:
                    raise SessionMoved("the certificate was renewed")
        finally:
            self._waiting.clear()  # never started: not held, so a new session gets them again
            for t in (writer, heartbeat, moving, reader, lease_lost):
                if t is None:
                    continue
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t

    async def _read_loop(self, call: grpc.aio.StreamStreamCall, handover: _Handover) -> object:
        """Read and handle the server's messages; returns EOF at the stream's end, or None once
        a session handing over has had every report acknowledged."""
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                return msg
            if handover.closing:
                continue  # an exiting worker starts nothing more; the server retries it
            self._handle(msg)
            if handover.settle_by is not None and not self.outbox.unacknowledged:
                return None

    async def _write_loop(self, call: grpc.aio.StreamStreamCall) -> None:
        outbox = self.outbox
        while True:
            await self._writes_open.wait()  # closed while the session hands over
            if self._exit.is_set() and not len(outbox):
                # Half-close only once the server has committed everything we sent.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(10.0):
                        await outbox.wait_settled()
                await call.done_writing()
                return
            await outbox.wait_ready()
            p = self._params
            msg = outbox.take(p.max_chunks_per_message, p.max_message_bytes - 64 * 1024)
            if msg is None:
                msg = wpb.WorkerMessage()
            if self.draining and not self._draining_unsent:
                msg.draining = True
                self._draining_unsent = True  # sent once per session
            if self._agents_due:
                self._agents_due = False
                msg.agents.agents.extend(convert.agent_to_pb(a) for a in self.announced)
            if self._heartbeat_due:
                self._heartbeat_due = False
                msg.heartbeat.active_runs = len(self.runs)
                convert.now_to_pb(msg.heartbeat.time)
                holding = self._holding()
                if self._pace.asks_renewal(holding, self.lease.ready_window()):
                    msg.heartbeat.seq = self.lease.next_heartbeat()
                else:
                    msg.heartbeat.seq = self.lease.quiet_heartbeat()
                self._pace.sent(holding)
            if msg.ByteSize():
                await write(call, msg)

    async def _heartbeat_loop(self) -> None:
        """A numbered heartbeat (each renews the lease) every interval while the worker holds
        runs or held one since the last, else every idle interval (see worker.lease)."""
        pace = self._pace
        while True:
            last = max(self.lease.last_sent, self._beat_asked)
            wait = pace.due_in(last, time.monotonic(), self._holding())
            if wait > 0:
                self._pace_changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._pace_changed.wait()
                continue
            self._heartbeat_now()

    def _heartbeat_now(self) -> None:
        self._beat_asked = time.monotonic()
        self._heartbeat_due = True
        self.outbox.poke()

    def _holding(self) -> bool:
        return bool(self.runs or self._waiting)

    async def _readiness_loop(self) -> None:
        """Check what the agents can run now; announce a change on the live session (a new
        session's hello carries the newest anyway)."""
        while True:
            await asyncio.sleep(self.config.agent_check_interval)
            announced = await asyncio.to_thread(announce, self.agents)
            if announced != self.announced:
                self.announced = announced
                self.log.info(
                    "agent availability changed",
                    unavailable={
                        a.name: a.unavailable_reason for a in announced if not a.available
                    },
                )
                self._agents_due = True
                self.outbox.poke()

    # --- the lease ---------------------------------------------------------------------------

    async def _lease_watch(self) -> None:
        """Stop the runs shortly before the lease runs out without a renewal; the supervisors of
        their child processes kill what is left when it does."""
        while True:
            await asyncio.sleep(0.05)
            self._fence_if_expired()

    def _fence_if_expired(self) -> None:
        lease = self.lease
        if not self.runs:
            # Nothing to stop: an idle worker's lease lapses between its heartbeats. The
            # session is dead only if the server stopped answering them.
            if lease.overdue():
                self._lease_lost.set()
            return
        if lease.expires is None or lease.remaining() > lease.fence_lead():
            return
        if self._fenced_expiry == lease.expires:
            return
        self._fenced_expiry = lease.expires
        self._lease_lost.set()
        if self.runs:
            silent = lease.duration - lease.remaining()
            self.log.warning(
                "lease running out: stopping runs",
                runs=len(self.runs),
                since_last_renewal_s=round(silent, 2),
            )
            self._stop_all_runs(
                f"the worker's lease ran out (no renewal from the control plane for "
                f"{silent:.1f}s); the control plane retries the run elsewhere"
            )

    def _lease_changed(self) -> None:
        if self.lease.expires is not None:
            self.lease_file.write(self.lease.expires)

    def supervised_program(self, program: str) -> str:
        """An executable that runs `program` (with its arguments) under the supervisor, so it
        dies with the worker and when the lease ends; cached per program."""
        wrapper = self._programs.get(program)
        if wrapper is None:
            argv = supervised_command(sys.executable, self.lease_file.path, [program])
            path = self.runtime_dir / f"supervised-{len(self._programs) + 1}"
            path.write_text(f'#!/bin/sh\nexec {shlex.join(argv)} "$@"\n')
            path.chmod(0o700)
            wrapper = self._programs[program] = str(path)
        return wrapper

    # --- messages from the server ------------------------------------------------------------

    def _handle(self, msg: wpb.ServerMessage) -> None:
        if msg.lease_seq:
            self.lease.granted(msg.lease_seq)
            self._lease_changed()
        if msg.ack_seq:
            self.outbox.ack(msg.ack_seq)
        if msg.assignments:
            if not (self._holding() or self._pace.held_since_last):
                self._pace_changed.set()  # it was idle: heartbeat at the busy pace from now
            self._waiting.extend(msg.assignments)
            self._pace.started()
            if not self.lease.ready_to_start():
                # An idle worker's lease lapsed: renew before starting (see worker.lease).
                self.log.debug("renewing the lease before starting", runs=len(self._waiting))
                self._heartbeat_now()
        if self._waiting and self.lease.ready_to_start():
            waiting, self._waiting = self._waiting, []
            for assignment in waiting:
                self._start(assignment)
        for cancel in msg.cancels:
            self._cancel(cancel.run_id, cancel.attempt, cancel.reason or "cancelled")
        for run_id in msg.forget_run_ids:
            self._cancel(run_id, None, "the control plane no longer knows this run")
        if msg.drain:
            self.begin_drain()

    def _subtask_access(self, a: wpb.RunAssignment) -> SubtaskAccess | None:
        """The MCP server for a run that may create sub-tasks. A wildcard host in its URL (the
        control plane listens on every address) becomes the host this worker connects to; the
        server's certificate chains to the CA the worker trusts."""
        if not (a.mcp_url and a.mcp_token):
            return None
        url = urlsplit(a.mcp_url)
        if url.hostname in ("0.0.0.0", "::", ""):
            host = self.config.server.rpartition(":")[0] or "127.0.0.1"
            url = url._replace(netloc=f"{host}:{url.port}" if url.port else host)
        return SubtaskAccess(urlunsplit(url), a.mcp_token, self.config.ca_cert)

    def _start(self, a: wpb.RunAssignment) -> None:
        run_id = RunId(a.run_id)
        if run_id in self.runs:
            return
        agent = self.agents.get(a.agent)
        ctx = RunContext(
            task_id=TaskId(a.task_id),
            run_id=run_id,
            attempt=a.attempt,
            input={},
            resume_session_id=a.resume_session_id,
            prompt=a.prompt,
            outbox=self.outbox,
            max_chunk_bytes=self._params.max_chunk_bytes or 64 * 1024,
            fencing_token=a.fencing_token or a.attempt,
            model=a.required_model,
            supervisor=self.supervised_program,
            workspaces=self.workspaces,
            conversation=(
                convert.turn_context_from_pb(a.conversation) if a.HasField("conversation") else None
            ),
            subtasks=self._subtask_access(a),
            options=convert.run_options_from_pb(a),
        )
        if agent is None:
            self.outbox.put_nowait(_failed(a, f"agent {a.agent!r} is not offered by this worker"))
            return
        spec = next((s for s in self.announced if s.name == a.agent), None)
        if spec is not None and not spec.available:  # assigned before our update arrived
            reason = f"agent {a.agent!r} cannot run on this worker now: {spec.unavailable_reason}"
            self.outbox.put_nowait(_failed(a, reason))
            return
        try:
            ctx.input = json.loads(a.input_json or "{}")
        except ValueError as exc:
            self.outbox.put_nowait(_failed(a, f"input is not valid JSON: {exc}", Fault.TASK))
            return
        if ctx.conversation is not None and ctx.resume_session_id:
            # for agents written against a session's resume_session_id + prompt
            ctx.prompt = str(ctx.input.get("prompt", ""))
        active = ActiveRun(a, ctx, worker_id=self.config.worker_id)
        active.task = asyncio.create_task(execute(agent, active))
        self.runs[run_id] = active
        self._runs_idle.clear()
        active.task.add_done_callback(lambda _: self._run_done(run_id))
        self.log.debug(  # `execute` binds the run's logger; this line needs none of its own
            "run started", task_id=a.task_id, run_id=a.run_id, attempt=a.attempt, agent=a.agent
        )

    def _run_done(self, run_id: RunId) -> None:
        active = self.runs.pop(run_id, None)
        if active is not None:
            self.metrics.run_ended(active.status)
            workspace = active.ctx.opened_workspace
            if workspace is not None:  # removed off the event loop: a workspace can be large
                asyncio.get_running_loop().run_in_executor(None, self.workspaces.close, workspace)
        if not self.runs:
            self._runs_idle.set()

    def _cancel(self, run_id: str, attempt: int | None, reason: str) -> None:
        self._waiting = [
            a
            for a in self._waiting
            if not (a.run_id == run_id and (attempt is None or a.attempt == attempt))
        ]
        active = self.runs.get(RunId(run_id))
        if active is None or (attempt is not None and active.assignment.attempt != attempt):
            # Already finished: confirm so the server frees the slot.
            if attempt is not None:
                self.outbox.put_nowait(wpb.CancelAck(run_id=run_id, attempt=attempt))
            return
        active.cancel_reason = reason
        active.task.cancel()

    def _stop_all_runs(self, reason: str) -> None:
        self._waiting.clear()
        for active in list(self.runs.values()):
            if not active.task.done():
                active.stop_reason = active.stop_reason or reason
                active.task.cancel()
        if self.runs:
            self.log.info("stopping runs", count=len(self.runs), reason=reason)

    # --- drain -------------------------------------------------------------------------------

    def begin_drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        self.outbox.poke()
        self._drainer = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        deadline = self.config.drain_timeout
        self.log.info("draining", runs=len(self.runs), deadline_s=deadline)
        if not await self._wait_runs(deadline):
            self.log.warning("drain deadline passed; stopping remaining runs", runs=len(self.runs))
            self._stop_all_runs("worker shutting down (drain deadline)")
            await self._wait_runs(self.config.cancel_grace)
        self._exit_soon()

    def _exit_soon(self) -> None:
        self._exit.set()
        self.outbox.poke()

    async def _wait_runs(self, within: float) -> bool:
        try:
            async with asyncio.timeout(within):
                await self._runs_idle.wait()
            return True
        except TimeoutError:
            return False


def _retryable(exc: BaseException) -> bool:
    """Connection trouble is retried; refusals and cancellation are not."""
    return isinstance(exc, Exception) and not isinstance(exc, FatalSessionError | SessionLost)


def _failed(a: wpb.RunAssignment, error: str, fault: Fault = Fault.WORKER) -> wpb.RunStatusUpdate:
    """A run refused before its agent started: by default because of this worker (it does not
    offer the agent, or cannot run it now), which counts towards its quarantine."""
    return wpb.RunStatusUpdate(
        run_id=a.run_id,
        attempt=a.attempt,
        status=pb.RUN_STATUS_FAILED,
        error=error,
        fault=cast(pb.RunFault, int(fault)),
    )


def _utcnow() -> datetime:
    return datetime.now(UTC)


async def write(call: grpc.aio.StreamStreamCall, message: wpb.WorkerMessage) -> None:
    """Write to the session's call, or raise the status it already ended with: grpc raises
    InvalidStateError on a write to an ended call, which says nothing of why it ended (a
    control plane that refused the session before reading it, stopping)."""
    try:
        await call.write(message)
    except asyncio.InvalidStateError:
        raise grpc.aio.AioRpcError(
            await call.code(),
            await call.initial_metadata(),
            await call.trailing_metadata(),
            await call.details(),
        ) from None


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}" if exc else ""


async def run_worker(config: WorkerConfig) -> int:
    """Run a worker daemon until it is signalled and drained; returns the exit code."""
    try:
        config = config.with_identity()
    except ValueError as exc:
        log.error("cannot use the enrolled identity", error=str(exc))
        return 2
    try:
        agents = load_agents(config.agents)
    except (ValueError, TypeError) as exc:
        log.error("cannot load agents", error=str(exc))
        return 2
    try:
        daemon = WorkerDaemon(config, agents)
    except ValueError as exc:  # a workspace root among the worker's keys
        log.error("cannot use the workspace settings", error=str(exc))
        return 2
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, daemon.on_signal)
    log.info(
        "worker starting",
        worker_id=config.worker_id,
        server=config.server,
        agents=sorted(agents),
        capacity=config.capacity,
    )
    for spec in daemon.announced:
        if not spec.available:
            log.warning("agent unavailable", agent=spec.name, reason=spec.unavailable_reason)
    metrics_server = None
    if config.metrics_listen:
        try:
            metrics_server = await MetricsServer(
                daemon.metrics.registry, config.metrics_listen
            ).start()
        except (OSError, ValueError) as exc:
            log.error("cannot serve metrics", address=config.metrics_listen, error=str(exc))
            return 2
    settle_garbage_collector()
    try:
        return await daemon.run()
    finally:
        if metrics_server is not None:
            await metrics_server.close()
