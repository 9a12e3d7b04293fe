"""`taskrun dev`: certificates, a server and N workers on this machine, in one command.

The server and the workers are child processes (`python -m taskrun.cli.main ...`) in their own
sessions, so a Ctrl-C in the terminal reaches only `dev`, which then stops them in order:
workers first (SIGTERM, they drain), then the server. SIGTERM and SIGHUP do the same. A child
that dies on its own stops everything and makes `dev` exit 1. Children's log lines are copied to
stderr with a name prefix; stdout carries only the ready message.

Children never outlive `dev`: each asks the kernel for SIGTERM when `dev` dies, however it dies
(`PR_SET_PDEATHSIG`, even after `kill -9`), and a broken pipe on `dev`'s output (`dev | tee log`
whose reader is gone) stops everything in order instead of ending `dev` with an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import json
import os
import shlex
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import structlog

from taskrun.cli.client import Client
from taskrun.cli.credentials import resolve_settings
from taskrun.controlplane.store import redact
from taskrun.core.status import WorkerStatus
from taskrun.logging import wants_color
from taskrun.ports import AddressUnavailable, check_listen_address, split_host_port

log = structlog.get_logger(__name__)

READY_TIMEOUT = 30.0
WORKER_DRAIN_TIMEOUT = 10.0
STOP_GRACE = 15.0  # after SIGTERM, how long a child may take before it is killed
POLL_INTERVAL = 0.1
# Reconnect quickly while the server is starting (gRPC's default backoff starts at 1 s). Not
# grpc.min_reconnect_backoff_ms: grpc takes it as the connect timeout too, and a handshake with a
# server busy starting on a loaded machine may take longer than a fraction of a second.
FAST_RECONNECT = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
)
READY_LINE = "taskrun dev is ready"
PARENT_ENV = "TASKRUN_DEV_PARENT_PID"  # set for children: the pid of the `dev` they die with
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PREFIX_COLORS = (36, 35, 34, 33, 32, 96)  # ANSI foreground colours of the name prefixes


@dataclass(frozen=True)
class DevOptions:
    directory: Path
    workers: int = 2
    agents: str = "echo"
    listen: str = "127.0.0.1:50051"
    store: str | None = None  # default sqlite:<directory>/taskrun.db
    log_level: str = "info"
    ready_timeout: float = READY_TIMEOUT


@dataclass
class Child:
    """One supervised process and the task copying its output."""

    name: str
    process: asyncio.subprocess.Process
    pump: asyncio.Task[None]
    stopping: bool = False

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def signal(self, sig: signal.Signals) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)


class ChildDied(Exception):
    """A child process exited while it should have been running."""

    def __init__(self, child: Child) -> None:
        super().__init__(f"{child.name} exited unexpectedly with code {child.returncode}")
        self.child = child


# --- addresses -------------------------------------------------------------------------------


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def resolve_listen(listen: str) -> tuple[str, str]:
    """(address the server listens on, address clients connect to). With port 0 the server
    picks free ports itself and names them in its ready file (a port picked here could be taken
    by another process before the server binds it)."""
    host, port = split_host_port(listen)
    connect_host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return join_host_port(host, port), join_host_port(connect_host, port)


def ready_message(server: str, certs: Path, worker_ids: Sequence[str], agents: str) -> str:
    """What `dev` prints on stdout once the server answers and the workers are connected."""
    env = f"TASKRUN_SERVER={shlex.quote(server)} TASKRUN_CERTS_DIR={shlex.quote(str(certs))}"
    names = [a.strip() for a in agents.split(",") if a.strip()]
    agent = "echo" if "echo" in names or not names else names[0]
    payload = '{"text": "hello from taskrun"}' if agent == "echo" else "{}"
    create = f"taskrun task create {agent} --input {shlex.quote(payload)} --follow"
    return (
        f"{READY_LINE}: server {server}, workers {', '.join(worker_ids)} "
        f"(agents: {', '.join(names) or 'all'})\n"
        "\n"
        "Talk to it from another shell:\n"
        f"  export {env}\n"
        f"  {create}\n"
        "  taskrun task list\n"
        "  taskrun workers list\n"
        "  taskrun token create --worker-id edge-1   # enroll a worker on another machine\n"
        "\n"
        "or in one line:\n"
        f"  {env} {create}\n"
        "\n"
        "Ctrl-C stops the workers, then the server.\n"
    )


# --- lifetime of children and of our output --------------------------------------------------


def die_with_parent() -> None:
    """In a child of `dev` (PARENT_ENV set): be sent SIGTERM when `dev` dies, however it dies.

    Called first thing by `taskrun`'s main. The variable is removed so that processes this one
    starts (agents) are not tied to `dev` by mistake.
    """
    parent = os.environ.pop(PARENT_ENV, None)
    if parent is None or not parent.isdigit():
        return
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed", errno=ctypes.get_errno())
    if os.getppid() != int(parent):  # `dev` died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


class GuardedOutput:
    """A text stream whose broken pipe (or hung-up terminal) becomes a callback, not an error.

    After the first failed write the file descriptor is pointed at /dev/null, so later writes
    (ours, the logger's, the interpreter's last flush) succeed and go nowhere.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.broken = False
        self.on_broken: list[Callable[[], None]] = []

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                self.stream.write(text)
            except OSError:
                self._break()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except OSError:
                self._break()

    def isatty(self) -> bool:
        return not self.broken and self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    def _break(self) -> None:
        self.broken = True
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
        for callback in self.on_broken:
            callback()


def guard_output() -> tuple[GuardedOutput, GuardedOutput]:
    """Replace sys.stdout and sys.stderr with guarded streams (before logging is configured)."""
    out = sys.stdout if isinstance(sys.stdout, GuardedOutput) else GuardedOutput(sys.stdout)
    err = sys.stderr if isinstance(sys.stderr, GuardedOutput) else GuardedOutput(sys.stderr)
    sys.stdout, sys.stderr = out, err
    return out, err


# --- the supervisor --------------------------------------------------------------------------


def _child_env() -> dict[str, str]:
    """Our environment without TASKRUN_* (children get every setting as a flag), plus our pid
    so that each child dies with us (see die_with_parent)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKRUN_")}
    env["PYTHONUNBUFFERED"] = "1"
    env[PARENT_ENV] = str(os.getpid())
    return env


class Dev:
    """Starts, watches and stops the server and workers of one `taskrun dev`."""

    def __init__(self, options: DevOptions, listen: str, connect: str) -> None:
        self.options = options
        self.listen, self.connect = listen, connect
        self.directory = options.directory.resolve()
        self.certs = self.directory / "certs"
        self.worker_ids = [f"worker-{i}" for i in range(1, options.workers + 1)]
        self.store = options.store or f"sqlite:{self.directory / 'taskrun.db'}"
        self.children: list[Child] = []
        self.stop = asyncio.Event()
        self.kill = asyncio.Event()
        self.width = max(len("server"), *(len(w) for w in self.worker_ids))
        self.color = wants_color(sys.stderr)

    def _on_signal(self) -> None:
        if self.stop.is_set():
            self.kill.set()  # a second Ctrl-C: no more waiting
        self.stop.set()

    def _on_output_broken(self) -> None:
        """Nobody reads our output any more (`dev | tee` after Ctrl-C): stop in order."""
        self.stop.set()

    def _base_argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "taskrun.cli.main",
            "--certs-dir",
            str(self.certs),
            "--log-format",
            "console",
            "--log-level",
            self.options.log_level,
        ]

    async def _spawn(self, name: str, argv: list[str]) -> Child:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=_child_env(),
            start_new_session=True,
        )
        index = len(self.children)
        child = Child(name, process, asyncio.create_task(self._pump(name, process, index)))
        self.children.append(child)
        return child

    async def _pump(self, name: str, process: asyncio.subprocess.Process, index: int) -> None:
        """Copy a child's output lines to stderr, prefixed with its name."""
        assert process.stdout is not None
        prefix = f"{name:<{self.width}} | "
        if self.color:
            prefix = f"\x1b[{PREFIX_COLORS[index % len(PREFIX_COLORS)]}m{prefix}\x1b[0m"
        while line := await process.stdout.readline():
            sys.stderr.write(prefix + line.decode(errors="replace").rstrip("\n") + "\n")
            sys.stderr.flush()

    def _check_children(self) -> None:
        for child in self.children:
            if child.returncode is not None and not child.stopping:
                raise ChildDied(child)

    async def _until(self, check: Callable[[], Awaitable[bool]], what: str) -> bool:
        """Poll `check` until it is true; False if a stop was requested first.

        Raises ChildDied when a child exits, TimeoutError after `ready_timeout`.
        """
        seconds = self.options.ready_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not self.stop.is_set():
            self._check_children()
            with contextlib.suppress(Exception):
                if await check():
                    return True
            if loop.time() >= deadline:
                raise TimeoutError(f"{what} within {seconds:.0f} s")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_INTERVAL):
                    await self.stop.wait()
        return False

    @staticmethod
    async def _server_ready(client: Client) -> bool:
        async with asyncio.timeout(0.5):
            await client.wait_ready()
        return True

    async def _workers_online(self, client: Client) -> bool:
        workers = await client.list_workers([WorkerStatus.ONLINE])
        online = {w.id for w, _ in workers}
        return all(w in online for w in self.worker_ids)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, self._on_signal)
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, GuardedOutput):
                stream.on_broken.append(self._on_output_broken)
                if stream.broken:
                    self.stop.set()
        code = 0
        try:
            if await self._start_server():
                async with self._client() as client:
                    await self._start(client)
                    if not self.stop.is_set():
                        sys.stdout.write(
                            ready_message(
                                self.connect, self.certs, self.worker_ids, self.options.agents
                            )
                        )
                        sys.stdout.flush()
                        await self._watch()
        except ChildDied as exc:
            log.error(
                "child exited unexpectedly; stopping everything",
                child=exc.child.name,
                code=exc.child.returncode,
            )
            code = 1
        except TimeoutError as exc:
            log.error(f"not ready: {exc}; stopping everything")
            code = 1
        finally:
            clean = await self._shutdown()
        return code if code else (0 if clean else 1)

    def _client(self) -> Client:
        settings = resolve_settings(server=self.connect, certs_dir=str(self.certs), env={})
        return Client.from_settings(settings, options=FAST_RECONNECT, timeout=2.0)

    async def _start_server(self) -> bool:
        """Start the server and wait until it listens; learn its address from its ready file
        (the ports it picked, with port 0). False if a stop was requested first."""
        ready = self.directory / "server-ready.json"
        ready.unlink(missing_ok=True)
        argv = [*self._base_argv(), "server", "--listen", self.listen, "--store", self.store]
        server = await self._spawn("server", [*argv, "--ready-file", str(ready)])
        log.info(
            "starting server", address=self.listen, store=redact(self.store), pid=server.process.pid
        )

        async def listening() -> bool:
            return ready.exists()

        if not await self._until(listening, "the server did not start listening"):
            return False
        _, port = split_host_port(json.loads(ready.read_text())["address"])
        host = split_host_port(self.connect)[0]
        self.connect = join_host_port(host, port)
        return True

    async def _start(self, client: Client) -> None:
        ready = functools.partial(self._server_ready, client)
        if not await self._until(ready, "the server accepted no connection"):
            return
        for worker_id in self.worker_ids:
            argv = [
                *self._base_argv(),
                "--server",
                self.connect,
                "worker",
                "run",
                "--id",
                worker_id,
                "--drain-timeout",
                str(WORKER_DRAIN_TIMEOUT),
            ]
            if self.options.agents:
                argv += ["--agents", self.options.agents]
            await self._spawn(worker_id, argv)
        online = functools.partial(self._workers_online, client)
        await self._until(online, "the workers did not all connect")

    async def _watch(self) -> None:
        """Wait for a stop request or for a child to exit on its own."""
        stop = asyncio.create_task(self.stop.wait())
        exits = [asyncio.create_task(c.process.wait()) for c in self.children]
        try:
            await asyncio.wait([stop, *exits], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (stop, *exits):
                t.cancel()
        self._check_children()

    async def _stop(self, children: Sequence[Child]) -> None:
        """SIGTERM, wait up to STOP_GRACE (or a second Ctrl-C), then SIGKILL."""
        for child in children:
            child.stopping = True
            child.signal(signal.SIGTERM)
        waits = [asyncio.create_task(c.process.wait()) for c in children]
        if not waits:
            return
        kill = asyncio.create_task(self.kill.wait())
        racing: list[asyncio.Future[Any]] = [asyncio.gather(*waits), kill]
        await asyncio.wait(racing, timeout=STOP_GRACE, return_when=asyncio.FIRST_COMPLETED)
        kill.cancel()
        for child in children:
            if child.returncode is None:
                log.warning("killing child that did not stop", child=child.name)
                child.signal(signal.SIGKILL)
        await asyncio.gather(*waits)

    async def _shutdown(self) -> bool:
        """Stop workers, then the server. True when every child exited with status 0."""
        for child in self.children:
            if child.returncode is not None:
                child.stopping = True
        workers = [c for c in self.children if c.name != "server"]
        servers = [c for c in self.children if c.name == "server"]
        if workers:
            log.info("stopping workers")
        await self._stop(workers)
        if servers:
            log.info("stopping server")
        await self._stop(servers)
        await asyncio.gather(*(c.pump for c in self.children), return_exceptions=True)
        clean = True
        for child in self.children:
            if child.returncode != 0:
                clean = False
                log.warning("child exited with an error", child=child.name, code=child.returncode)
        log.info("stopped")
        return clean


def run_dev(options: DevOptions) -> int:
    """Run `taskrun dev` until Ctrl-C or SIGTERM; 0 after a clean stop, 1 otherwise."""
    from taskrun.controlplane.pki import init_pki

    try:
        listen, connect = resolve_listen(options.listen)
    except (ValueError, OSError) as exc:
        log.error(f"bad --listen: {exc}")
        return 2
    host, port = split_host_port(listen)
    try:  # the server's two listeners: --listen and the public one on the next port
        check_listen_address(listen)
        if port:
            check_listen_address(join_host_port(host, port + 1))
    except AddressUnavailable as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    workers = [f"worker-{i}" for i in range(1, options.workers + 1)]
    init_pki(options.directory / "certs", workers=workers)
    return asyncio.run(Dev(options, listen, connect).run())
