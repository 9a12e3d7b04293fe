"""Typed identifiers. Task and run ids sort by creation time (ULID-like), so pages are stable."""

from __future__ import annotations

import random
import re
import threading
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
# The last id's millisecond, its time digits and its random part (see _sortable).
_last: tuple[int, str, int] = (-1, "", 0)
_lock = threading.Lock()


def _sortable(prefix: str) -> str:
    """prefix + 10 chars of millisecond time + 16 chars of randomness (80 bits).

    The 26 base-32 digits of the 130-bit number (time << 80 | random), most significant first.
    Ids made by one process increase in the order they were made: within one millisecond (or
    when the clock steps back) the random part of the next id is the last one's plus a random
    step, so tasks created together list in their order and a page boundary never reorders
    them. Ids need to be unique, not secret (every call is authorized on its own): the
    randomness is `random`'s, seeded from the system at start and again in a forked child,
    without a system call per id.
    """
    global _last
    now = time.time_ns() // 1_000_000
    with _lock:
        ms, digits, r = _last
        if now > ms:
            ms, r = now, random.getrandbits(80)
            digits = "".join(_PAIRS[(ms >> shift) & 1023] for shift in (40, 30, 20, 10, 0))
        else:
            r += 1 + random.getrandbits(20)  # a step of at most 2**20
            if r >> 80:  # the millisecond is used up: go on in the next one
                ms, r = ms + 1, random.getrandbits(79)
                digits = "".join(_PAIRS[(ms >> shift) & 1023] for shift in (40, 30, 20, 10, 0))
        _last = (ms, digits, r)
    p = _PAIRS
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
