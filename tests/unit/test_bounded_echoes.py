"""What a caller sent is echoed only in part, and repeated warnings are rate-limited per source."""

from __future__ import annotations

from typing import Any

import pytest

from taskrun.controlplane.ratelimit import OVERFLOW_KEY, LogLimiter, RateLimit
from taskrun.core.errors import MAX_MESSAGE_BYTES, InvalidArgument, NotFound
from taskrun.core.text import clip, clip_bytes, quoted
from taskrun.core.validation import validate_labels


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))


def test_clip_and_quoted_keep_the_start_and_say_how_long_it_was() -> None:
    assert clip("short") == "short"
    assert clip("x" * 1000, 10) == "xxxxxxxxxx… (1000 characters)"
    assert quoted("abc") == "'abc'"
    assert quoted("y" * 100_000) == repr("y" * 64) + "… (100000 characters)"


def test_an_error_message_is_kept_to_what_a_status_trailer_carries() -> None:
    assert clip_bytes("short", 10) == "short"
    cut = clip_bytes("漢字" * 1000, 100)  # three bytes a character: never half of one
    assert cut == "漢字" * 16 + "漢… (2000 characters)"
    long = NotFound("no workflow 'x' (workflows: " + "w, " * 5000 + ")", field="name")
    assert len(long.message.encode()) <= MAX_MESSAGE_BYTES + 40
    assert str(long).startswith("name: no workflow 'x'") and str(long).endswith("characters)")
    wide = InvalidArgument("é" * 5000, field="f" * 500)
    assert len(wide.message.encode()) <= MAX_MESSAGE_BYTES + 40 and len(wide.field or "") < 250


def test_a_huge_label_value_is_not_repeated_in_the_error() -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_labels({"team": "v" * 100_000 + "!"})
    assert len(str(err.value)) < 400 and "(100001 characters)" in str(err.value)


def test_the_limit_is_per_key_and_a_new_window_starts_afresh() -> None:
    clock = Clock()
    limit = RateLimit(3, 10.0, clock=clock)
    assert [limit.allow("a") for _ in range(5)] == [True, True, True, False, False]
    assert limit.allow("b")  # another source has its own budget
    assert limit.suppressed("a") == 2
    clock.now = 10.0
    assert limit.allow("a") and limit.suppressed("a") == 0


def test_past_max_keys_new_sources_share_one_budget_until_old_windows_end() -> None:
    clock = Clock()
    limit = RateLimit(1, 10.0, max_keys=2, clock=clock)
    assert limit.allow("a") and limit.allow("b")
    assert limit.allow("c")  # counted under OVERFLOW_KEY
    assert not limit.allow("d") and limit.suppressed(OVERFLOW_KEY) == 1
    clock.now = 11.0
    assert limit.allow("e")  # the ended windows were forgotten


def test_a_flood_of_one_warning_logs_the_limit_then_one_summary() -> None:
    clock = Clock()
    logger = Recorder()
    limiter = LogLimiter(logger, limit=10, window=10.0, clock=clock)
    for i in range(10_000):
        limiter.warning("worker-1", "report rejected", run_id=f"run_{i}")
    assert len(logger.lines) == 10
    limiter.warning("worker-2", "report rejected", run_id="x")  # another worker is not hidden
    assert logger.lines[-1] == ("report rejected", {"run_id": "x"})
    clock.now = 10.0
    limiter.warning("worker-1", "report rejected", run_id="later")
    assert logger.lines[-2] == (
        "similar warnings suppressed",
        {"key": "worker-1", "suppressed": 9990},
    )
    assert logger.lines[-1] == ("report rejected", {"run_id": "later"})
