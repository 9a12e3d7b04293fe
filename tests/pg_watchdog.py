"""Stops a test PostgreSQL cluster once the test process that started it is gone.

`pg_ctl start` detaches the server from the tests: killed with SIGKILL, pytest would leave it
running. This small process is started by tests/postgres.py with a pipe as its standard input
whose other end only the test process holds; the kernel closes that end when the test process
exits, however it exits, and this one then stops the server and removes its directory. It runs
in a session of its own, so the Ctrl-C or SIGHUP that stops the tests does not stop it first.

Usage: python pg_watchdog.py DIRECTORY BIN_DIR AS_POSTGRES(0|1)   (no imports from tests/)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def postmaster_pid(data: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((data / "postmaster.pid").read_text().split()[0])
    return None


def running(pid: int) -> bool:
    """The process is alive and is a PostgreSQL server (not another one that got its pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    name, state = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2]
    return name in ("postgres", "postmaster") and state != "Z"


def stop_cluster(directory: Path, bin_dir: Path, as_postgres: bool) -> None:
    """Stop the cluster in `directory` (immediate shutdown) and remove the directory."""
    data = directory / "data"
    pid = postmaster_pid(data)
    if pid is not None and running(pid):
        argv = [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]
        if as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(argv, capture_output=True, timeout=30, check=False)
        deadline = time.monotonic() + 10
        while running(pid) and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGQUIT)  # the postmaster's immediate shutdown
            time.sleep(0.1)
    shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    directory, bin_dir, as_postgres = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    sys.stdin.buffer.read()  # returns at end of file: the test process closed it or is gone
    stop_cluster(directory, bin_dir, as_postgres)


if __name__ == "__main__":
    main()
