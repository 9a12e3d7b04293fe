"""Rate-limited logging of refused worker reports: every refusal is counted, a few are logged.

A worker that keeps sending something the server refuses (stale attempts, an enum value from a
newer version) must not flood the log: per worker, at most `burst` lines per `window` seconds,
then one line saying how many were left out.
"""

from __future__ import annotations

import time
from typing import Any

import structlog

log = structlog.get_logger(__name__)

MAX_VALUE_CHARS = 200  # values from the wire are cut to this in log lines


def clip(value: object, limit: int = MAX_VALUE_CHARS) -> str:
    """`value` as text of at most `limit` characters (values from the wire can be huge)."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


class RejectionLog:
    def __init__(self, *, burst: int = 10, window: float = 10.0) -> None:
        self.burst = burst
        self.window = window
        self.total = 0
        self._windows: dict[str, tuple[float, int]] = {}  # worker -> (window start, lines)

    def reject(self, worker_id: str, what: str, reason: str, **fields: Any) -> None:
        self.total += 1
        now = time.monotonic()
        start, lines = self._windows.get(worker_id, (now, 0))
        if now - start >= self.window:
            if lines > self.burst:
                log.warning(
                    "more reports rejected",
                    worker_id=worker_id,
                    not_logged=lines - self.burst,
                    window_s=self.window,
                )
            start, lines = now, 0
        lines += 1
        self._windows[worker_id] = (start, lines)
        if lines <= self.burst:
            log.warning(
                "report rejected",
                what=what,
                worker_id=worker_id,
                reason=clip(reason),
                **{k: clip(v) if isinstance(v, str) else v for k, v in fields.items()},
            )
