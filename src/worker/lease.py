"""The worker's lease on its runs, counted on the worker's side.

The worker numbers its heartbeats and remembers when it sent each. When the control plane
answers one (it renews its own copy of the lease on receipt, so at or after the sending), the
worker's lease lasts `duration` from the *sending*: it always ends before the control plane's.
Without renewals the worker stops its runs itself shortly before the lease ends (`fence_at`), and
the child processes of its agents are killed by their supervisor when it ends (`LeaseFile`), so
the control plane, which retries them only after its own copy ran out plus a margin, never has
two attempts of a run alive at once. Clocks: both sides measure durations with monotonic clocks;
only their rates must agree (to well within the margin), not their readings.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


class Lease:
    def __init__(self) -> None:
        self.duration = 0.0
        self.expires: float | None = None  # time.monotonic(); None before the first session
        self._hello_sent = 0.0
        self._seq = 0
        self._sent: dict[int, float] = {}

    def hello_sent(self) -> None:
        """A new session starts: heartbeats are numbered afresh."""
        self._hello_sent = time.monotonic()
        self._seq = 0
        self._sent.clear()

    def session_granted(self, duration: float) -> None:
        """The server accepted the hello: the lease runs `duration` from its sending."""
        self.duration = duration
        self._extend(self._hello_sent + duration)

    def next_heartbeat(self) -> int:
        """Number a heartbeat about to be sent."""
        self._seq += 1
        self._sent[self._seq] = time.monotonic()
        return self._seq

    def granted(self, seq: int) -> None:
        """The server renewed the lease on heartbeat `seq`."""
        sent = self._sent.get(seq)
        for old in [s for s in self._sent if s <= seq]:
            del self._sent[old]
        if sent is not None and self.duration:
            self._extend(sent + self.duration)

    def _extend(self, expires: float) -> None:
        if self.expires is None or expires > self.expires:
            self.expires = expires

    def remaining(self) -> float:
        """Seconds left (negative once it ran out); infinite before the first session."""
        if self.expires is None:
            return float("inf")
        return self.expires - time.monotonic()

    def fence_lead(self) -> float:
        """How long before the end the worker starts stopping its runs."""
        return min(1.0, self.duration / 4)


class LeaseFile:
    """The lease's end (time.monotonic(), shared by every process on this machine) in a file,
    read by the supervisors of agents' child processes (see worker.supervise). 0 = ended."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._written: float | None = None

    def write(self, expires: float) -> None:
        if expires == self._written:
            return
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, f"{expires:.6f}".encode())
        finally:
            os.close(fd)
        tmp.replace(self.path)
        self._written = expires

    def end(self) -> None:
        """Every supervised process stops now."""
        self.write(0.0)
