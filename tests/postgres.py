"""A real PostgreSQL server for tests: initdb + pg_ctl in a temporary directory on a free loopback
port, run as the `postgres` user when the tests run as root (PostgreSQL refuses root).

`TASKRUN_TEST_POSTGRES_URL` points the tests at a server of your own instead. Without the server
binaries the PostgreSQL tests fail on CI (CI=true) and are skipped elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

__all__ = [
    "PostgresServer",
    "find_pg_bin",
    "new_schema",
    "postgres_or_skip",
    "schema_url",
]

URL_VARIABLE = "TASKRUN_TEST_POSTGRES_URL"
_SEARCH = ("/usr/lib/postgresql/17/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/15/bin")


def find_pg_bin() -> Path | None:
    """The directory holding initdb and pg_ctl: $PG_BIN, Debian's layout, or PATH."""
    candidates = [os.environ.get("PG_BIN", ""), *_SEARCH]
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").is_file():
            return Path(candidate)
    return None


def postgres_or_skip() -> Path:
    """The server binaries, or: fail on CI, skip elsewhere, saying what is missing."""
    found = find_pg_bin()
    if found is None:
        message = (
            "the PostgreSQL tests need the server binaries (initdb, pg_ctl): install the Debian"
            " package postgresql (apt-get install postgresql), set PG_BIN to their directory, or"
            f" set {URL_VARIABLE} to a server of your own"
        )
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PostgresServer:
    """One throwaway PostgreSQL cluster. `start()`, `stop()` (and `start()` again), `destroy()`."""

    def __init__(self, bin_dir: Path, *, fsync: bool = False) -> None:
        self.bin_dir = bin_dir
        self.fsync = fsync  # off by default: a test cluster need not survive a power cut
        self.dir = Path(tempfile.mkdtemp(prefix="taskrun-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "log"
        self.port = _free_port()
        self._started = False
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError(
                    "PostgreSQL refuses to run as root and there is no `postgres` user to run it"
                    f" as: create one, or set {URL_VARIABLE}"
                ) from None
            os.chown(self.dir, user.pw_uid, user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *args: str, check: bool = True) -> None:
        argv = [str(self.bin_dir / program), *args]
        if self._as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(
                f"{program} failed ({done.returncode}): {done.stderr.strip() or done.stdout}"
            )

    def start(self) -> None:
        """Start the server; the first start moves to another free port if its port was taken
        meanwhile (later starts keep the port: URLs handed out name it)."""
        for last in (False, False, True) if not self._started else (True,):
            options = (
                f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=200"
            )
            if not self.fsync:
                options += " -c fsync=off -c full_page_writes=off"
            try:
                data, log = str(self.data), str(self.log)
                self._run("pg_ctl", "-D", data, "-o", options, "-l", log, "-w", "start")
                break
            except RuntimeError:
                if last:
                    raise
                self.port = _free_port()
        self._started = True
        self._wait_accepting()

    def _wait_accepting(self, within: float = 15.0) -> None:
        deadline = time.monotonic() + within
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"PostgreSQL did not accept connections: see {self.log}"
                    ) from None
                time.sleep(0.05)

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def running_server() -> Iterator[PostgresServer]:
    """A started server for the block (binaries required: see `postgres_or_skip`)."""
    server = PostgresServer(postgres_or_skip())
    try:
        server.start()
        yield server
    finally:
        server.destroy()


def schema_url(base: str, schema: str) -> str:
    """`base` with every connection's search_path set to `schema`."""
    options = quote(f"-c search_path={schema}", safe="")
    return f"{base}{'&' if '?' in base else '?'}options={options}"


def new_schema(base: str) -> str:
    """Create an empty schema on the server at `base`; returns its name."""
    import psycopg

    name = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    return name


def drop_schema(base: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
