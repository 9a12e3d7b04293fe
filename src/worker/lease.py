"""The worker's lease on its runs, counted on the worker's side.

The worker numbers its heartbeats and remembers when it sent each. When the control plane
answers one (it renews its own copy of the lease on receipt, so at or after the sending), the
worker's lease lasts `duration` from the *sending*: it always ends before the control plane's.
Without renewals the worker stops its runs itself shortly before the lease ends (`fence_at`), and
the child processes of its agents are killed by their supervisor when it ends (`LeaseFile`), so
the control plane, which retries them only after its own copy ran out plus a margin, never has
two attempts of a run alive at once. Clocks: both sides measure durations with monotonic clocks;
only their rates must agree (to well within the margin), not their readings.

A worker that holds no runs heartbeats less often (`idle_heartbeat_interval_ms`), so its lease
may lapse between heartbeats: it has nothing to stop. A run given to it then waits for the
renewal of a heartbeat sent at once (`ready_to_start`). When the lease would lapse before the
next idle heartbeat anyway, an idle heartbeat asks for no renewal (number 0): the control plane
renews its own copy and writes nothing back (`HeartbeatPace.asks_renewal`). The session is then
judged alive by whether the server answers the numbered heartbeats (`overdue`) and, between
them, by gRPC keepalive pings on the connection, not by the lease.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path

# How much shorter than the idle heartbeat interval an idle wait may be drawn (a fraction).
IDLE_SPREAD = 0.2


class Lease:
    def __init__(self) -> None:
        self.duration = 0.0
        self.expires: float | None = None  # time.monotonic(); None before the first session
        self._hello_sent = 0.0
        self._seq = 0
        self._sent: dict[int, float] = {}
        self.last_sent = 0.0  # time.monotonic() of the newest heartbeat (or hello)

    def hello_sent(self) -> None:
        """A new session starts: heartbeats are numbered afresh."""
        self._hello_sent = self.last_sent = time.monotonic()
        self._seq = 0
        self._sent.clear()

    def session_granted(self, duration: float) -> None:
        """The server accepted the hello: the lease runs `duration` from its sending."""
        self.duration = duration
        self._extend(self._hello_sent + duration)

    def next_heartbeat(self) -> int:
        """Number a heartbeat about to be sent."""
        self._seq += 1
        self._sent[self._seq] = self.last_sent = time.monotonic()
        return self._seq

    def quiet_heartbeat(self) -> int:
        """A heartbeat about to be sent that asks for no renewal: its number is 0."""
        self.last_sent = time.monotonic()
        return 0

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

    def ready_to_start(self) -> bool:
        """Whether a run may start now: the lease has more than twice the fence lead left (a
        heartbeat's renewal can then arrive before the run would have to stop)."""
        return self.remaining() > 2 * self.fence_lead()

    def ready_window(self) -> float:
        """How long after a heartbeat is sent its renewal lets a run start at once."""
        return self.duration - 2 * self.fence_lead()

    def overdue(self) -> bool:
        """Whether a heartbeat sent a whole lease ago is still unanswered (the session is dead
        even if the worker, holding no runs, lets its lease lapse)."""
        if not self._sent or not self.duration:
            return False
        return time.monotonic() - min(self._sent.values()) >= self.duration


class HeartbeatPace:
    """When the next heartbeat is due: every `busy` seconds while the worker holds runs or held
    one since its last heartbeat, else after an idle wait (counted from the last one sent).

    Each idle wait is drawn anew between (1 - `spread`) * `idle` and `idle` (never below `busy`):
    workers that connected together, as after a control-plane restart, drift apart instead of
    heartbeating in one burst every interval. Never longer than `idle`, so the control plane's
    reckoning of a silent idle worker (idle interval plus lease and margin) still holds.
    """

    def __init__(
        self,
        busy: float,
        idle: float,
        spread: float = IDLE_SPREAD,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.busy = busy
        self.idle = max(busy, idle)
        self.spread = spread
        self._draw = draw
        self.idle_wait = self._next_idle_wait()
        self.held_since_last = False

    def _next_idle_wait(self) -> float:
        return max(self.busy, self.idle * (1.0 - self.spread * self._draw()))

    def sent(self, holding: bool) -> None:
        """A heartbeat went out; `holding`: the worker holds runs now."""
        self.held_since_last = holding
        self.idle_wait = self._next_idle_wait()

    def started(self) -> None:
        """A run started (or waits for a renewal to start)."""
        self.held_since_last = True

    def asks_renewal(self, holding: bool, ready_window: float) -> bool:
        """Whether the heartbeat about to be sent should ask for a renewal of the lease.

        Yes while the worker holds runs or held one since its last heartbeat. An idle heartbeat
        asks only if its renewal would still let a run start at once when the next idle
        heartbeat is sent (`ready_window`, see Lease): otherwise the lease lapses in between
        anyway, a run given meanwhile waits for a heartbeat sent at once, and the answer (a
        message written by the control plane for each idle worker every interval) buys nothing.
        """
        if holding or self.held_since_last:
            return True
        return max(self.busy, self.idle * (1.0 - self.spread)) <= ready_window

    def due_in(self, last_sent: float, now: float, holding: bool) -> float:
        """Seconds until the next heartbeat (0 or less: now)."""
        busy = holding or self.held_since_last
        return last_sent + (self.busy if busy else self.idle_wait) - now


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
