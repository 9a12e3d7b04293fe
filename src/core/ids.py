"""Typed identifiers. Task and run ids sort by creation time (ULID-like), so pages are stable."""

from __future__ import annotations

import base64
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


# base64's base32 alphabet, digit for digit, to ours: b32encode does the bit shuffling in C
_FROM_RFC4648 = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _ALPHABET.encode())


def _sortable(prefix: str) -> str:
    """prefix + 10 chars of millisecond time + 16 chars of randomness (80 bits).

    The 26 base-32 digits of the 130-bit number (time << 80 | random), most significant first;
    shifted up 6 bits into 17 bytes, the first 26 digits base32 gives are exactly those.
    Ids need to be unique, not secret (every call is authorized on its own): the randomness is
    `random`'s, seeded from the system at start and again in a forked child, without a system
    call per id.
    """
    value = (time.time_ns() // 1_000_000) << 80 | random.getrandbits(80)
    digits = base64.b32encode((value << 6).to_bytes(17, "big"))[:26]
    return prefix + digits.translate(_FROM_RFC4648).decode()


def new_task_id() -> TaskId:
    return TaskId(_sortable("tsk_"))


def new_run_id() -> RunId:
    return RunId(_sortable("run_"))


def new_conversation_id() -> ConversationId:
    return ConversationId(_sortable("cnv_"))


def is_valid_worker_id(value: str) -> bool:
    """Worker ids are DNS-label-like: lower case letters, digits, '.', '_' and '-', max 64."""
    return bool(_WORKER_ID.fullmatch(value))
