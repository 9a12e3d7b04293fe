"""Typed identifiers. Task and run ids sort by creation time (ULID-like), so pages are stable."""

from __future__ import annotations

import random
import re
import time
from typing import NewType

TaskId = NewType("TaskId", str)
RunId = NewType("RunId", str)
WorkerId = NewType("WorkerId", str)
ConversationId = NewType("ConversationId", str)

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case
_WORKER_ID = re.compile(r"[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?")


# Two base-32 digits for every 10-bit value: an id is 13 lookups instead of an encoder's loop.
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]
# The time digits of the current millisecond (one tuple, replaced whole: safe across threads).
_clock: tuple[int, str] = (-1, "")


def _sortable(prefix: str) -> str:
    """prefix + 10 chars of millisecond time + 16 chars of randomness (80 bits).

    The 26 base-32 digits of the 130-bit number (time << 80 | random), most significant first.
    Ids need to be unique, not secret (every call is authorized on its own): the randomness is
    `random`'s, seeded from the system at start and again in a forked child, without a system
    call per id.
    """
    global _clock
    ms = time.time_ns() // 1_000_000
    at, digits = _clock
    if ms != at:
        digits = "".join(_PAIRS[(ms >> shift) & 1023] for shift in (40, 30, 20, 10, 0))
        _clock = (ms, digits)
    r, p = random.getrandbits(80), _PAIRS
    return (
        f"{prefix}{digits}{p[r >> 70]}{p[(r >> 60) & 1023]}{p[(r >> 50) & 1023]}"
        f"{p[(r >> 40) & 1023]}{p[(r >> 30) & 1023]}{p[(r >> 20) & 1023]}"
        f"{p[(r >> 10) & 1023]}{p[r & 1023]}"
    )


def new_task_id() -> TaskId:
    return TaskId(_sortable("tsk_"))


def new_run_id() -> RunId:
    return RunId(_sortable("run_"))


def new_conversation_id() -> ConversationId:
    return ConversationId(_sortable("cnv_"))


def is_valid_worker_id(value: str) -> bool:
    """Worker ids are DNS-label-like: lower case letters, digits, '.', '_' and '-', max 64."""
    return bool(_WORKER_ID.fullmatch(value))
