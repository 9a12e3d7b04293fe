"""Loopback ports for tests (and scripts: no pytest here).

A port picked by binding port 0 and closing the socket is free only for a moment: the kernel may
hand it to any process's next bind(0) or outgoing connection (both come from the ephemeral range),
and a parallel test run picks the same way. A server that binds it a second later, or again after
a restart, then fails with "port ... is already in use". So:

- a server that can report its port binds port 0 and the test reads the bound port;
- a server whose port must be known before it starts, or kept across restarts, gets a port from
  `reserve()`: below (or above) the kernel's ephemeral range, which the kernel never hands out
  by itself, and locked with flock(2) for this process, so that no other test run reserves it
  too. The lock dies with the process, also on SIGKILL;
- a port where nobody listens (connections refused) is a socket that is bound and never
  listening (`refusing_port()`): nothing else can take it while the socket is open.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["ephemeral_range", "refusing_port", "release", "reserve", "reserved_ports"]

LOCK_DIR = Path(tempfile.gettempdir()) / "taskrun-test-ports"
_held: dict[int, list[int]] = {}  # first port of a block -> lock file descriptors


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for bind(0) and outgoing connections (both ends included)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _candidates(count: int) -> Iterator[int]:
    """First ports of blocks outside the ephemeral range, at random (parallel runs start at
    different places); the ephemeral range itself only when there is no room outside it."""
    low, high = ephemeral_range()
    spans = [
        (start, stop)
        for start, stop in ((max(1024, low - 16384), low - count + 1), (high + 1, 65536 - count))
        if stop - start > 0
    ]
    sizes = [stop - start for start, stop in spans]
    if sum(sizes) < 1000:
        spans, sizes = [(low, high - count + 2)], [high - low - count + 2]
    for _ in range(5000):
        start, stop = random.choices(spans, weights=sizes)[0]
        yield random.randrange(start, stop)


def _open_lock_file(port: int) -> int:
    """The port's lock file in the directory every user's test runs share (like /tmp); in one
    of this user's own when another user's directory does not let us in."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
    for directory in (LOCK_DIR, LOCK_DIR.with_name(f"{LOCK_DIR.name}-{os.getuid()}")):
        try:
            directory.mkdir(exist_ok=True)
            with contextlib.suppress(OSError):
                directory.chmod(0o1777)
            return os.open(directory / f"{port}.lock", flags, 0o666)
        except PermissionError:
            continue
    raise PermissionError(f"cannot create a lock file for port {port} under {LOCK_DIR.parent}")


def _lock(port: int) -> int | None:
    fd = _open_lock_file(port)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _bindable(port: int, host: str) -> bool:
    """Nobody listens on or holds the port now (with SO_REUSEADDR, as servers bind: a port
    whose old connections wait in TIME_WAIT counts as free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def reserve(count: int = 1, host: str = "127.0.0.1") -> int:
    """The first of `count` consecutive free ports, held for this process until `release()`
    (a `taskrun server` on port P also listens on P + 1 unless told otherwise: reserve 2)."""
    for first in _candidates(count):
        fds: list[int] = []
        for port in range(first, first + count):
            fd = _lock(port)
            if fd is None or not _bindable(port, host):
                break
            fds.append(fd)
        if len(fds) == count:
            _held[first] = fds
            return first
        for fd in fds:
            os.close(fd)
    raise OSError(errno.EADDRNOTAVAIL, f"no {count} consecutive free ports to reserve")


def release(first: int) -> None:
    """Give back the block that `reserve()` returned (nothing happens for another port)."""
    for fd in _held.pop(first, []):
        os.close(fd)


def reserved_ports() -> list[int]:
    """Every port this process holds (for tests of this module)."""
    return sorted(first + n for first, fds in _held.items() for n in range(len(fds)))


@contextlib.contextmanager
def refusing_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port where connections are refused for the block: bound, never listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        yield int(sock.getsockname()[1])
