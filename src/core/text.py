"""Bounded echoes: what a caller sent is repeated in a message or a log line only in part."""

from __future__ import annotations

DEFAULT_LIMIT = 256
QUOTED_LIMIT = 64


def utf8_size(text: str) -> int:
    """Bytes of `text` as UTF-8 (a lone surrogate counted as it would be escaped, not refused),
    without encoding it when it is ASCII."""
    return len(text) if text.isascii() else len(text.encode(errors="surrogatepass"))


def clip(text: str, limit: int = DEFAULT_LIMIT) -> str:
    """`text` if it has at most `limit` characters, else its start and how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


def clip_bytes(text: str, limit: int) -> str:
    """`text` if it takes at most `limit` bytes as UTF-8, else as much of its start as does,
    and how long it was."""
    if utf8_size(text) <= limit:
        return text
    start = text.encode(errors="surrogatepass")[:limit].decode(errors="ignore")
    return f"{start}… ({len(text)} characters)"


def quoted(value: str, limit: int = QUOTED_LIMIT) -> str:
    """`repr(value)` for a message, of at most about `limit` characters of the value."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value)} characters)"
