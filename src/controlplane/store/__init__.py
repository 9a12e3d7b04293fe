"""Store implementations behind `taskrun.core.store.Store`, chosen by URL with `open_store`."""

from __future__ import annotations

from pathlib import Path

from taskrun.controlplane.store.memory import MemoryStore
from taskrun.controlplane.store.sqlite import SCHEMA_VERSION, SchemaVersionError, SqliteStore
from taskrun.core.store import Store
from taskrun.files import private_directory

__all__ = ["SCHEMA_VERSION", "MemoryStore", "SchemaVersionError", "SqliteStore", "open_store"]


def open_store(url: str) -> Store:
    """A store for `url`: "memory", or "sqlite:PATH" (parent directories are created).

    The caller then awaits `store.open()`.
    """
    if url == "memory":
        return MemoryStore()
    if url.startswith("sqlite:"):
        path = url.removeprefix("sqlite:")
        if path and path != ":memory:":
            private_directory(Path(path).parent)
            return SqliteStore(path)
    raise ValueError(f"unsupported store url {url!r}: use 'memory' or 'sqlite:PATH'")
