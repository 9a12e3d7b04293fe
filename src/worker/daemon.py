"""The worker daemon: one StreamConnect session at a time, runs executed concurrently.

Top to bottom: connect (with exponential backoff and jitter), say hello, then read assignments
and cancellations while one writer task sends batched output, status and heartbeats. When the
stream breaks, runs keep going and their reports wait in the outbox for the next session. On
SIGTERM/SIGINT the worker drains: it takes no new runs, finishes what it has (up to a deadline),
reports it and exits; a second signal stops the runs at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import signal
import socket
import time
from typing import cast

import grpc
import structlog
from tenacity import AsyncRetrying, retry_if_exception, wait_random_exponential

from taskrun import __version__, convert
from taskrun.core.agent import Agent
from taskrun.core.ids import RunId, TaskId
from taskrun.metrics_http import MetricsServer  # issue 6
from taskrun.v1 import common_pb2 as pb
from taskrun.v1 import workers_pb2 as wpb
from taskrun.v1 import workers_pb2_grpc
from taskrun.worker.agents import load_agents
from taskrun.worker.config import WorkerConfig
from taskrun.worker.executor import ActiveRun, RunContext, execute
from taskrun.worker.metrics import WorkerMetrics  # issue 6
from taskrun.worker.outbox import Outbox

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


class FatalSessionError(Exception):
    """The server refused this worker in a way retrying cannot fix."""


class SessionLost(Exception):
    """An established session ended; reconnecting starts a fresh backoff."""


class WorkerDaemon:
    def __init__(self, config: WorkerConfig, agents: dict[str, Agent]) -> None:
        self.config = config
        self.agents = agents
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
        self._last_write = time.monotonic()
        self._signals = 0
        self._drainer: asyncio.Task[None] | None = None
        self.log = log.bind(worker_id=config.worker_id)
        self.metrics = WorkerMetrics(lambda: len(self.runs))  # issue 6

    # --- top level ---------------------------------------------------------------------------

    async def run(self) -> int:
        """Hold a session until the daemon is told to exit; 0 on a clean exit."""
        while not self._exit.is_set():
            try:
                async for attempt in AsyncRetrying(
                    # full jitter: sleep uniformly in [0, min(max, 0.2 * 2^n)]
                    wait=wait_random_exponential(
                        multiplier=0.2, max=self.config.reconnect_max_wait
                    ),
                    retry=retry_if_exception(_retryable),
                    sleep=self._sleep,
                    before_sleep=self._log_retry,
                    reraise=True,
                ):
                    with attempt:
                        if self._exit.is_set():
                            break
                        await self._session()
            except SessionLost as exc:
                # it was up: reconnect at once, then back off from the start again
                self.log.warning("lost the control plane; reconnecting", error=str(exc))
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
                f"{exc.filename} is missing: run `taskrun certs init` or `taskrun certs worker "
                f"{cfg.worker_id}`"
            ) from None
        options: list[tuple[str, str | int]] = [
            *KEEPALIVE_OPTIONS,
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ]
        host = cfg.server.rsplit(":", 1)[0].strip("[]")
        name = cfg.server_name or ("localhost" if _is_ip(host) else "")
        if name:
            options.append(("grpc.ssl_target_name_override", name))
        return grpc.aio.secure_channel(cfg.server, creds, options=options)

    def _hello(self) -> wpb.WorkerHello:
        cfg = self.config
        hello = wpb.WorkerHello(
            worker_id=cfg.worker_id,
            hostname=socket.gethostname(),
            version=__version__,
            agents=[convert.agent_to_pb(a.spec) for a in self.agents.values()],
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
        async with self._channel() as channel:
            call = workers_pb2_grpc.RunServiceStub(channel).StreamConnect()
            try:
                await call.write(wpb.WorkerMessage(hello=self._hello()))
                first = await call.read()
                if first is grpc.aio.EOF or not first.HasField("params"):
                    code, details = await call.code(), await call.details()
                    if code in FATAL_CODES:
                        raise FatalSessionError(f"{code.name}: {details}")
                    raise ConnectionError(f"session refused: {code.name}: {details}")
                self._params = first.params
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
        writer = asyncio.create_task(self._write_loop(call))
        heartbeat = asyncio.create_task(self._heartbeat_loop())
        try:
            while True:
                reader = asyncio.ensure_future(call.read())
                done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
                if writer in done:
                    writer.result()  # raises if the writer failed
                    # Every report is out and we half-closed: the server ends the stream once
                    # it has read them all. Cancelling the call earlier could drop them.
                    await self._await_end(call, reader)
                    return
                msg = reader.result()
                if msg is grpc.aio.EOF:
                    code = await call.code()
                    if code in FATAL_CODES:
                        raise FatalSessionError(f"{code.name}: {await call.details()}")
                    if self._exit.is_set():
                        return
                    raise ConnectionError(f"stream ended: {code.name}: {await call.details()}")
                self._handle(msg)
        finally:
            for t in (writer, heartbeat):
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t

    async def _await_end(
        self, call: grpc.aio.StreamStreamCall, reader: asyncio.Future[object]
    ) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10.0):
                msg = await reader
                while msg is not grpc.aio.EOF:
                    msg = await call.read()

    async def _write_loop(self, call: grpc.aio.StreamStreamCall) -> None:
        outbox = self.outbox
        while True:
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
            if self._heartbeat_due:
                self._heartbeat_due = False
                msg.heartbeat.active_runs = len(self.runs)
                msg.heartbeat.time.GetCurrentTime()
            if msg.ByteSize():
                await call.write(msg)
                self._last_write = time.monotonic()

    async def _heartbeat_loop(self) -> None:
        interval = max(0.05, self._params.heartbeat_interval_ms / 1000 or 5.0)
        while True:
            await asyncio.sleep(interval / 2)
            if time.monotonic() - self._last_write >= interval / 2:
                self._heartbeat_due = True
                self.outbox.poke()

    # --- messages from the server ------------------------------------------------------------

    def _handle(self, msg: wpb.ServerMessage) -> None:
        if msg.ack_seq:
            self.outbox.ack(msg.ack_seq)
        for assignment in msg.assignments:
            self._start(assignment)
        for cancel in msg.cancels:
            self._cancel(cancel.run_id, cancel.attempt, cancel.reason or "cancelled")
        for run_id in msg.forget_run_ids:
            self._cancel(run_id, None, "the control plane no longer knows this run")
        if msg.drain:
            self.begin_drain()

    def _start(self, a: wpb.RunAssignment) -> None:
        run_id = RunId(a.run_id)
        if run_id in self.runs:
            return
        bound = self.log.bind(task_id=a.task_id, run_id=a.run_id, attempt=a.attempt)
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
        )
        if agent is None:
            self.outbox.put_nowait(_failed(a, f"agent {a.agent!r} is not offered by this worker"))
            return
        try:
            ctx.input = json.loads(a.input_json or "{}")
        except ValueError as exc:
            self.outbox.put_nowait(_failed(a, f"input is not valid JSON: {exc}"))
            return
        active = ActiveRun(a, ctx, worker_id=self.config.worker_id)
        active.task = asyncio.create_task(execute(agent, active))
        self.runs[run_id] = active
        self._runs_idle.clear()
        active.task.add_done_callback(lambda _: self._run_done(run_id))
        bound.debug("run started", agent=a.agent)

    def _run_done(self, run_id: RunId) -> None:
        active = self.runs.pop(run_id, None)
        if active is not None:  # issue 6 (metrics)
            self.metrics.run_ended(active.status)
        if not self.runs:
            self._runs_idle.set()

    def _cancel(self, run_id: str, attempt: int | None, reason: str) -> None:
        active = self.runs.get(RunId(run_id))
        if active is None or (attempt is not None and active.assignment.attempt != attempt):
            # Already finished: confirm so the server frees the slot.
            if attempt is not None:
                self.outbox.put_nowait(wpb.CancelAck(run_id=run_id, attempt=attempt))
            return
        active.cancel_reason = reason
        active.task.cancel()

    def _stop_all_runs(self, reason: str) -> None:
        for active in list(self.runs.values()):
            if not active.task.done():
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


def _failed(a: wpb.RunAssignment, error: str) -> wpb.RunStatusUpdate:
    return wpb.RunStatusUpdate(
        run_id=a.run_id, attempt=a.attempt, status=pb.RUN_STATUS_FAILED, error=error
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}" if exc else ""


async def run_worker(config: WorkerConfig) -> int:
    """Run a worker daemon until it is signalled and drained; returns the exit code."""
    try:
        agents = load_agents(config.agents)
    except (ValueError, TypeError) as exc:
        log.error("cannot load agents", error=str(exc))
        return 2
    daemon = WorkerDaemon(config, agents)
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
    metrics_server = None  # issue 6
    if config.metrics_listen:
        try:
            metrics_server = await MetricsServer(
                daemon.metrics.registry, config.metrics_listen
            ).start()
        except (OSError, ValueError) as exc:
            log.error("cannot serve metrics", address=config.metrics_listen, error=str(exc))
            return 2
    try:
        return await daemon.run()
    finally:
        if metrics_server is not None:
            await metrics_server.close()
