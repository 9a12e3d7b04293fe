"""Store implementations behind `taskrun.core.store.Store`, chosen by URL with `open_store`."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from taskrun.controlplane.store.memory import MemoryStore
from taskrun.controlplane.store.sqlite import SCHEMA_VERSION, SchemaVersionError, SqliteStore
from taskrun.core.store import Store
from taskrun.files import private_directory

__all__ = [
    "POSTGRES_SCHEMES",
    "SCHEMA_VERSION",
    "MemoryStore",
    "SchemaVersionError",
    "SqliteStore",
    "open_store",
    "redact",
]

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_store(url: str) -> Store:
    """A store for `url`: "memory", "sqlite:PATH" (parent directories are created), or a
    PostgreSQL URL "postgresql://USER:PASSWORD@HOST:PORT/DBNAME" (needs the `postgres` extra).

    The caller then awaits `store.open()`.
    """
    if url == "memory":
        return MemoryStore()
    if url.startswith("sqlite:"):
        path = url.removeprefix("sqlite:")
        if path and path != ":memory:":
            private_directory(Path(path).parent)
            return SqliteStore(path)
    if url.startswith(POSTGRES_SCHEMES) and len(url.split("://", 1)[1]) > 0:
        try:
            from taskrun.controlplane.store.postgres import PostgresStore
        except ImportError as exc:
            raise ValueError(
                f"the PostgreSQL store needs psycopg ({exc.name} is missing):"
                " pip install 'taskrun-agents[postgres]'"
            ) from exc
        return PostgresStore(url)
    raise ValueError(
        f"unsupported store url {url!r}: use 'memory', 'sqlite:PATH' or"
        " 'postgresql://USER@HOST:PORT/DBNAME'"
    )


def redact(url: str) -> str:
    """`url` fit for a log line: a PostgreSQL URL's password becomes "***"."""
    if not url.startswith(POSTGRES_SCHEMES):
        return url
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.netloc.rsplit("@", 1)[1]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return "postgresql://(a URL that could not be parsed)"
