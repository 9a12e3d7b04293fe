"""Worker health in dispatch: a circuit breaker per worker.

A worker whose runs fail fast (within `fast_failure` seconds of being assigned) several times in
a row is likely broken (no credentials, a missing tool, a full disk): it fails everything at
once, so it always looks least loaded and would swallow the queue. After `threshold` such
failures in a row the breaker opens: the worker gets no new runs for `base` seconds. When that
ends the worker is tried again (half-open): one more fast failure reopens it for twice as long
(up to `max_quarantine`); a success closes it and forgets the history. A failure that took
longer than `fast_failure` ends the streak (the worker did work), and so does a success. Only
failures that are the worker's fault are fed in: one the worker reports as the task's (input the
agent refuses, an output schema never met, a cost limit, a request the API refused) is left out,
so a healthy worker is not shut out by a run of bad tasks (see core.status.Fault).

State lives in memory only: a restarted control plane starts every worker healthy, which is
what a restart of the broken worker would do anyway. Times are monotonic (clock jumps do not
shorten or stretch a quarantine); the wall-clock end is kept for display.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from taskrun.core.ids import WorkerId


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    threshold: int = 5  # fast failures in a row that open the breaker; 0 = never
    fast_failure: float = 10.0  # seconds from assignment: a failure sooner than this is fast
    base: float = 30.0  # the first quarantine, seconds; doubled on each reopening
    max_quarantine: float = 600.0


@dataclass(slots=True)
class _Breaker:
    streak: int = 0  # fast failures in a row towards (re)opening
    failures: int = 0  # fast failures in a row, as shown
    trips: int = 0  # quarantines since the last success
    until: float = 0.0  # monotonic end of the current quarantine (0: none)
    until_wall: datetime | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Tripped:
    """A quarantine that has just begun."""

    seconds: float
    until: datetime
    reason: str


class WorkerHealth:
    def __init__(self, settings: BreakerSettings) -> None:
        self.settings = settings
        self._breakers: dict[WorkerId, _Breaker] = {}
        self.quarantines = 0  # since the start, for metrics

    def succeeded(self, worker_id: WorkerId) -> None:
        self._breakers.pop(worker_id, None)

    def failed(
        self, worker_id: WorkerId, elapsed: float, error: str, now: float, wall: datetime
    ) -> Tripped | None:
        """A run on the worker failed `elapsed` seconds after it was assigned. Returns the
        quarantine it starts, if any."""
        s = self.settings
        breaker = self._breakers.setdefault(worker_id, _Breaker())
        if elapsed >= s.fast_failure:
            breaker.streak = breaker.failures = 0
            return None
        breaker.streak += 1
        breaker.failures += 1
        if s.threshold <= 0 or breaker.streak < s.threshold or breaker.until > now:
            return None
        breaker.trips += 1
        seconds = min(s.max_quarantine, s.base * 2.0 ** (breaker.trips - 1))
        breaker.until = now + seconds
        breaker.until_wall = wall + timedelta(seconds=seconds)
        breaker.reason = (
            f"{breaker.failures} runs in a row failed within {s.fast_failure:g}s; last error: "
            f"{error or 'no reason given'}"
        )[:500]
        # half-open when it ends: the next fast failure reopens it at once, for longer
        breaker.streak = s.threshold - 1
        self.quarantines += 1
        return Tripped(seconds, breaker.until_wall, breaker.reason)

    def quarantined(self, worker_id: WorkerId, now: float) -> bool:
        breaker = self._breakers.get(worker_id)
        return breaker is not None and breaker.until > now

    def view(self, worker_id: WorkerId, now: float) -> tuple[int, datetime | None, str]:
        """(fast failures in a row, quarantine end, its reason) as shown to operators."""
        breaker = self._breakers.get(worker_id)
        if breaker is None:
            return 0, None, ""
        if breaker.until > now:
            return breaker.failures, breaker.until_wall, breaker.reason
        return breaker.failures, None, ""
