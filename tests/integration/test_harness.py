"""The test harness itself: ports that stay free for the servers the tests start, and a PostgreSQL
server that dies with the test process, however that process ends."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import ports
from tests.pg_watchdog import running
from tests.postgres import OWNER_FILE, PREFIX, clean_stale, postgres_or_skip

ROOT = Path(__file__).resolve().parents[2]


def in_another_process(code: str) -> subprocess.Popen[str]:
    """A Python process running `code` with the repository importable (as pytest has it)."""
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )


# --- ports -------------------------------------------------------------------------------------


def test_reserved_ports_are_outside_the_range_the_kernel_hands_out() -> None:
    """bind(0) and outgoing connections take their ports from the ephemeral range: a reserved
    port is never one of them, so it is still free when a server binds it, or binds it again
    after a restart."""
    low, high = ports.ephemeral_range()
    first = ports.reserve(3)
    try:
        assert {first, first + 1, first + 2} <= set(ports.reserved_ports())
        assert all(not low <= port <= high for port in range(first, first + 3))
        for _ in range(200):  # what the kernel hands out meanwhile is never ours
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                assert not first <= sock.getsockname()[1] < first + 3
        with socket.socket() as server:  # and the server binds it, again and again
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(("127.0.0.1", first))
            server.listen()
    finally:
        ports.release(first)
    assert first not in ports.reserved_ports()


def test_a_port_reserved_here_is_not_reserved_by_a_parallel_test_run() -> None:
    mine = sorted(ports.reserve() for _ in range(5))
    spare = ports.reserve()
    ports.release(spare)
    try:
        other = in_another_process(  # it tries ours first
            "from tests import ports\n"
            f"ports._candidates = lambda count: {[*mine, spare]}\n"
            "print(ports.reserve())\n"
        )  # fmt: skip
        out, _ = other.communicate(timeout=60)
        assert other.returncode == 0
        assert int(out) == spare
    finally:
        for port in mine:
            ports.release(port)


def test_a_port_that_is_in_use_is_not_reserved(monkeypatch: pytest.MonkeyPatch) -> None:
    busy, free = ports.reserve(), ports.reserve()
    ports.release(busy)
    ports.release(free)
    monkeypatch.setattr(ports, "_candidates", lambda count: [busy, free])
    with socket.socket() as foreign:  # not a test run's: a server that just listens there
        foreign.bind(("127.0.0.1", busy))
        foreign.listen()
        assert ports.reserve() == free
    ports.release(free)


def test_a_refusing_port_refuses_connections_for_as_long_as_it_is_held() -> None:
    with ports.refusing_port() as port:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))  # nobody can start listening there


# --- PostgreSQL --------------------------------------------------------------------------------

START_AND_HANG = """
import time
from tests.postgres import PostgresServer, find_pg_bin
server = PostgresServer(find_pg_bin())
server.start()
print(server.dir, server._watchdog.pid, flush=True)
time.sleep(600)
"""


def postmaster(directory: Path) -> int:
    return int((directory / "data" / "postmaster.pid").read_text().split()[0])


def wait_gone(pid: int, directory: Path, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while running(pid) or directory.exists():
        assert time.monotonic() < deadline, f"postgres {pid} or {directory} outlived its tests"
        time.sleep(0.05)


def test_postgresql_stops_when_the_test_process_is_killed_with_sigkill() -> None:
    postgres_or_skip()
    tests = in_another_process(START_AND_HANG)
    try:
        assert tests.stdout is not None
        directory = Path(tests.stdout.readline().split()[0])
        pid = postmaster(directory)
        assert running(pid)
    finally:
        tests.kill()
        tests.wait()
    wait_gone(pid, directory)


def test_a_cluster_whose_test_process_and_watchdog_are_gone_is_stopped_by_the_next_run() -> None:
    bin_dir = postgres_or_skip()
    tests = in_another_process(START_AND_HANG)
    try:
        assert tests.stdout is not None
        words = tests.stdout.readline().split()
        directory, watchdog = Path(words[0]), int(words[1])
        pid = postmaster(directory)
        os.kill(watchdog, signal.SIGKILL)  # as if the whole machine's processes were killed
    finally:
        tests.kill()
        tests.wait()
    assert running(pid) and directory.exists()  # left behind
    assert clean_stale(bin_dir) == [directory]  # the next run's first server cleans it
    wait_gone(pid, directory, within=5)


def test_a_cluster_whose_test_process_lives_is_left_alone(tmp_path: Path) -> None:
    bin_dir = postgres_or_skip()
    mine = tmp_path / f"{PREFIX}mine"
    mine.mkdir()
    stat = Path("/proc/self/stat").read_text()
    (mine / OWNER_FILE).write_text(f"{os.getpid()} {stat[stat.rindex(')') + 2 :].split()[19]}\n")
    gone = tmp_path / f"{PREFIX}gone"
    gone.mkdir()
    (gone / OWNER_FILE).write_text(f"{os.getpid()} 1\n")  # our pid, but another process's start
    unowned_old, unowned_new = tmp_path / f"{PREFIX}old", tmp_path / f"{PREFIX}new"
    unowned_old.mkdir()
    unowned_new.mkdir()
    os.utime(unowned_old, (time.time() - 7200, time.time() - 7200))
    assert clean_stale(bin_dir, tmp_path) == [gone, unowned_old]
    assert mine.exists() and unowned_new.exists()
