"""Spans of time as people write them: `30d`, `1h30m`, `90s` (the CLI's --ttl reads the same)."""

from __future__ import annotations

_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def human_duration(seconds: float) -> str:
    """`2592000` -> `30d`, `5400` -> `1h30m`, `90` -> `1m30s`, `0.5` -> `0.5s` (two units)."""
    if seconds < 1:
        return f"{seconds:g}s"
    left = round(seconds)
    parts: list[str] = []
    for name, size in _UNITS:
        if left >= size:
            parts.append(f"{left // size}{name}")
            left %= size
        if len(parts) == 2:
            break
    return "".join(parts)
