"""Child processes, clients and waiting, shared by scripts/bench.py and its failover part."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskrun.cli.client import Client
from taskrun.controlplane.pki import PkiPaths

STOP_GRACE = 10.0  # seconds a child gets after SIGTERM before SIGKILL
READY_WITHIN = 30.0  # seconds for a child to come up


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc); None where unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def note(text: str) -> None:
    """Progress, on stderr (stdout holds only the report)."""
    sys.stderr.write(f"bench: {text}\n")
    sys.stderr.flush()


class BenchError(Exception):
    """The benchmark could not measure something (a child died, a deadline passed)."""


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    log: Path

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def check(self) -> None:
        if not self.alive:
            raise BenchError(
                f"{self.name} exited with {self.proc.returncode}:\n{tail(self.log)}".rstrip()
            )


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _open_log(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without TASKRUN_* settings, so only the flags given apply; plus
    `extra` (PYTHONPATH pointing at another commit's source, with --compare-ref).

    Without PYTHONDONTWRITEBYTECODE too: the processes run from bytecode caches, as an installed
    copy does, not compiling TaskRun's modules at every start (about 135 ms for the CLI's
    imports, measured; more for a server's), which the start and restart figures would count."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("TASKRUN_") and k != "PYTHONDONTWRITEBYTECODE"
    }
    env.update(extra or {})
    return env


async def spawn(
    name: str,
    argv: Sequence[str],
    log: Path,
    *,
    pipe_stdout: bool = False,
    env: dict[str, str] | None = None,
) -> Child:
    fd = _open_log(log)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if pipe_stdout else fd,
            stderr=fd,
            env=child_env(env),
            start_new_session=True,  # our SIGTERM decides the order of shutdown, not the tty's
        )
    finally:
        os.close(fd)
    return Child(name, proc, log)


async def stop(child: Child, grace: float = STOP_GRACE) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    if child.alive:
        with contextlib.suppress(ProcessLookupError):
            child.proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(grace):
            await child.proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            child.proc.kill()
        await child.proc.wait()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def taskrun_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "taskrun.cli.main", *args]


# The bench's clients are its instruments: one that found no server (a control plane still
# starting, or restarted) must try again within a fraction of a second, not after grpc's own
# reconnect backoff (1 s, growing 1.6 x per failure), which measured a restarted server as
# answering seconds after it did. The connect timeout stays grpc's (20 s).
PROMPT_RECONNECT = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 250),
)


def operator_client(address: str, pki: PkiPaths) -> Client:
    return Client(
        address,
        ca=pki.ca_cert.read_bytes(),
        cert=pki.operator_cert.read_bytes(),
        key=pki.operator_key.read_bytes(),
        options=PROMPT_RECONNECT,
    )


@contextlib.asynccontextmanager
async def clients(address: str, pki: PkiPaths, n: int) -> AsyncIterator[list[Client]]:
    """`n` connected clients, each with its own channel (own HTTP/2 connection)."""
    opened = [operator_client(address, pki) for _ in range(n)]
    try:
        async with asyncio.timeout(READY_WITHIN):
            await asyncio.gather(*(c.wait_ready() for c in opened))
        yield opened
    finally:
        for c in opened:
            with contextlib.suppress(Exception):
                await c.close()


async def until(
    probe: Any, check: Any, what: str, within: float = READY_WITHIN, every: float = 0.05
) -> None:
    deadline = time.monotonic() + within
    while not await probe():
        check()
        if time.monotonic() > deadline:
            raise BenchError(f"gave up waiting {within:g}s for {what}")
        await asyncio.sleep(every)
