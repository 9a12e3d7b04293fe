"""Supervisor for an agent's child processes: `python -m taskrun.worker.supervise`.

    python -m taskrun.worker.supervise --lease-file PATH [--grace S] -- PROGRAM [ARG ...]

Runs PROGRAM in a process group of its own, with stdin, stdout and stderr passed straight
through, and kills that whole group (SIGTERM, then SIGKILL after --grace seconds):
- when the worker's lease ends (the time in --lease-file passes, or the file is gone or says 0):
  a worker that is cut off, frozen (SIGSTOP) or dead cannot renew it;
- when the worker dies, `kill -9` included (a parent-death signal, and the parent id changing);
- when the supervisor itself is told to stop (SIGTERM, SIGINT, SIGHUP).
Exits with PROGRAM's exit status (128 + signal number when a signal ended it).

Only the standard library is imported: it starts in a few tens of milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

PR_SET_PDEATHSIG = 1
PARENT_DIED = signal.SIGUSR1  # the parent-death signal: distinct from a request to stop
POLL = 0.05


def set_parent_death_signal(sig: signal.Signals) -> None:
    """Ask Linux to send `sig` to this process when its parent dies (a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def lease_end(path: Path) -> float:
    """The lease's end in time.monotonic(); 0 when it ended or the file is gone."""
    try:
        return float(path.read_text() or 0)
    except (OSError, ValueError):
        return 0.0


def command(python: str, lease_file: Path, argv: Sequence[str], grace: float = 1.0) -> list[str]:
    """The command line that runs `argv` under this supervisor."""
    return [
        python,
        "-m",
        "taskrun.worker.supervise",
        "--lease-file",
        str(lease_file),
        "--grace",
        f"{grace:g}",
        "--",
        *argv,
    ]


def _child_setup() -> None:  # runs in the child between fork and exec
    set_parent_death_signal(signal.SIGKILL)  # the supervisor died: go too


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def supervise(argv: Sequence[str], lease_file: Path, grace: float) -> int:
    parent = os.getppid()
    stop_requested: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop_requested.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, PARENT_DIED):
        signal.signal(sig, on_signal)
    set_parent_death_signal(PARENT_DIED)
    if os.getppid() != parent or lease_end(lease_file) <= time.monotonic():
        return 1  # the worker died, or the lease ended, before we could start
    try:
        child = subprocess.Popen(list(argv), start_new_session=True, preexec_fn=_child_setup)
    except OSError as exc:
        sys.stderr.write(f"supervise: cannot start {argv[0]}: {exc.strerror}\n")
        return 127
    stopping_since: float | None = None
    reason = ""
    while True:
        try:
            code = child.wait(timeout=POLL)
            break
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if stopping_since is None:
            if PARENT_DIED in stop_requested or os.getppid() != parent:
                reason = "the worker died"
            elif stop_requested:
                reason = "stop requested"
            elif lease_end(lease_file) <= now:
                reason = "the worker's lease ended"
            if reason:
                stopping_since = now
                # A lease that ended must stop everything at once; a stop request gets the grace.
                first = signal.SIGKILL if reason.startswith("the worker") else signal.SIGTERM
                _kill_group(child.pid, first)
        elif now - stopping_since >= grace:
            _kill_group(child.pid, signal.SIGKILL)
    _kill_group(child.pid, signal.SIGKILL)  # whatever the program left in its group
    if reason.startswith("the worker"):
        sys.stderr.write(f"supervise: stopped {argv[0]}: {reason}\n")
    return 128 - code if code < 0 else code


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m taskrun.worker.supervise")
    parser.add_argument("--lease-file", type=Path, required=True)
    parser.add_argument("--grace", type=float, default=1.0)
    parser.add_argument("program", nargs="+")
    ns = parser.parse_args(args)
    return supervise(ns.program, ns.lease_file, ns.grace)


if __name__ == "__main__":
    sys.exit(main())
