"""The supervisor of agents' child processes, with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from taskrun.worker.lease import LeaseFile
from taskrun.worker.supervise import command
from tests.processes import alive, descendants


def lease(tmp_path: Path, seconds: float) -> LeaseFile:
    f = LeaseFile(tmp_path / "lease")
    f.write(time.monotonic() + seconds)
    return f


def wait_gone(pids: list[int], within: float) -> float:
    start = time.monotonic()
    while any(alive(p) for p in pids):
        assert time.monotonic() - start < within, f"still alive after {within}s: {pids}"
        time.sleep(0.01)
    return time.monotonic() - start


def test_passes_the_exit_status_and_the_output_through(tmp_path: Path) -> None:
    f = lease(tmp_path, 60)
    argv = command(sys.executable, f.path, ["sh", "-c", "echo hello; exit 7"])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    assert (done.returncode, done.stdout) == (7, "hello\n")


def test_kills_the_whole_process_group_when_the_lease_ends(tmp_path: Path) -> None:
    f = lease(tmp_path, 60)
    argv = command(sys.executable, f.path, ["sh", "-c", "sleep 60 & sleep 60"])
    proc = subprocess.Popen(argv)
    try:
        time.sleep(0.5)
        group = descendants(proc.pid, "sleep")
        assert len(group) == 2
        f.end()
        assert wait_gone(group, within=1.0) < 0.5
        assert proc.wait(5) == 128 + signal.SIGKILL
    finally:
        proc.kill()


def test_a_stop_request_gets_sigterm_then_sigkill_after_the_grace(tmp_path: Path) -> None:
    f = lease(tmp_path, 60)
    stubborn = "trap '' TERM; sleep 60 & wait"
    argv = command(sys.executable, f.path, ["sh", "-c", stubborn], grace=0.3)
    proc = subprocess.Popen(argv)
    try:
        time.sleep(0.5)
        group = descendants(proc.pid)
        proc.terminate()
        took = wait_gone(group, within=2.0)
        assert 0.25 < took < 1.5
    finally:
        proc.kill()


def test_the_program_dies_within_a_second_of_a_kill_9_of_the_worker(tmp_path: Path) -> None:
    f = lease(tmp_path, 60)
    # a stand-in worker: starts the supervised program, then waits
    inner = command(sys.executable, f.path, ["sleep", "60"])
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import subprocess, time; subprocess.Popen({inner!r}); time.sleep(60)",
        ]
    )
    try:
        deadline = time.monotonic() + 5
        while not descendants(worker.pid, "sleep"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        [program] = descendants(worker.pid, "sleep")
        os.kill(worker.pid, signal.SIGKILL)
        assert wait_gone([program], within=1.0) < 1.0
    finally:
        worker.kill()


def test_refuses_to_start_once_the_lease_has_ended(tmp_path: Path) -> None:
    f = LeaseFile(tmp_path / "lease")
    f.end()
    done = subprocess.run(command(sys.executable, f.path, ["true"]), timeout=10)
    assert done.returncode == 1
