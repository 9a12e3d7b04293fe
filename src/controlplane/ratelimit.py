"""Per-key rate limits for things a remote party can make us repeat (audit rows, warnings).

`RateLimit.allow(key)` says whether the key is still within `limit` events per `window` seconds.
`LogLimiter` logs a warning at most `limit` times per window per key and, when the next window
opens, one line saying how many were suppressed. Use it wherever a caller (a worker's reports,
an anonymous peer) can trigger a log line at will.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

MAX_KEYS = 10_000
OVERFLOW_KEY = "(other sources)"


class RateLimit:
    """At most `limit` events per `window` seconds for each key (memory bounded by max_keys)."""

    def __init__(
        self,
        limit: int,
        window: float,
        *,
        max_keys: int = MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._clock = clock
        self._windows: dict[str, tuple[float, int]] = {}  # key -> (window start, count)

    def allow(self, key: str) -> bool:
        now = self._clock()
        if key not in self._windows and len(self._windows) >= self.max_keys:
            self._forget_ended(now)
            if len(self._windows) >= self.max_keys:
                key = OVERFLOW_KEY  # too many live sources: the rest share one budget
        start, count = self._windows.get(key, (now, 0))
        if now - start >= self.window:
            start, count = now, 0
        self._windows[key] = (start, count + 1)
        return count < self.limit

    def suppressed(self, key: str) -> int:
        """How many events of `key` were refused in its current window."""
        start, count = self._windows.get(key, (0.0, 0))
        if self._clock() - start >= self.window:
            return 0
        return max(0, count - self.limit)

    def _forget_ended(self, now: float) -> None:
        ended = [k for k, (start, _) in self._windows.items() if now - start >= self.window]
        for k in ended:
            del self._windows[k]


class LogLimiter:
    """Log a repeated warning at most `limit` times per `window` seconds per key.

    Example (one worker flooding stale reports)::

        limiter = LogLimiter(log, limit=10, window=10.0)
        limiter.warning(worker_id, "report rejected", worker_id=worker_id, run_id=run_id)
    """

    def __init__(
        self,
        logger: Any,
        *,
        limit: int = 10,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._limit = RateLimit(limit, window, clock=clock)
        self._pending: dict[str, int] = {}  # key -> suppressed in the window that ended

    def warning(self, key: str, event: str, **fields: Any) -> bool:
        """Log `event` as a warning unless `key` is over its budget; True when it was logged."""
        return self._emit("warning", key, event, fields)

    def info(self, key: str, event: str, **fields: Any) -> bool:
        """Like warning, at info level."""
        return self._emit("info", key, event, fields)

    def error(self, key: str, event: str, **fields: Any) -> bool:
        """Like warning, at error level."""
        return self._emit("error", key, event, fields)

    def _emit(self, level: str, key: str, event: str, fields: dict[str, Any]) -> bool:
        before = self._limit.suppressed(key)
        if self._limit.allow(key):
            missed = self._pending.pop(key, 0)
            if missed:
                self._log.warning("similar warnings suppressed", key=key, suppressed=missed)
            getattr(self._log, level)(event, **fields)
            return True
        self._pending[key] = before + 1
        if len(self._pending) > MAX_KEYS:
            self._pending.clear()
        return False
