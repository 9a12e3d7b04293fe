"""A real PostgreSQL server for tests: initdb + pg_ctl in a temporary directory on a reserved
loopback port (tests/ports.py), run as the `postgres` user when the tests run as root (PostgreSQL
refuses root).

The server dies with the test process, even on SIGKILL: a watchdog process (tests/pg_watchdog.py)
stops it and removes its directory once the test process is gone. A cluster left behind anyway
(the watchdog killed too) is stopped and removed by the next run that starts one: each cluster's
directory names the process that owns it.

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
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from tests import ports
from tests.pg_watchdog import stop_cluster

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


PREFIX = "taskrun-pg-"
OWNER_FILE = "owner"  # "<pid> <start time>" of the test process that owns the cluster
UNOWNED_STALE_AFTER = 3600.0  # seconds untouched, for a directory that names no owner


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks after boot), which tells it from a later process
    that got the same pid; None when it is gone."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else fields[19]


def _owner_alive(directory: Path) -> bool:
    try:
        pid, started = (directory / OWNER_FILE).read_text().split()
    except (OSError, ValueError):  # an older layout, or not written yet: judge by its age
        newest = max(
            (p.stat().st_mtime for p in (directory, directory / "log") if p.exists()), default=0
        )
        return time.time() - newest < UNOWNED_STALE_AFTER
    return _start_time(int(pid)) == started


def clean_stale(bin_dir: Path, temp: Path | None = None) -> list[Path]:
    """Stop and remove the clusters whose test process is gone; returns their directories."""
    temp = Path(tempfile.gettempdir()) if temp is None else temp
    cleaned = []
    for directory in sorted(temp.glob(f"{PREFIX}*")):
        if directory.is_dir() and not _owner_alive(directory):
            stop_cluster(directory, bin_dir, os.geteuid() == 0)
            cleaned.append(directory)
    return cleaned


class PostgresServer:
    """One throwaway PostgreSQL cluster. `start()`, `stop()` (and `start()` again), `destroy()`."""

    def __init__(self, bin_dir: Path, *, fsync: bool = False) -> None:
        self.bin_dir = bin_dir
        self.fsync = fsync  # off by default: a test cluster need not survive a power cut
        clean_stale(bin_dir)
        self.dir = Path(tempfile.mkdtemp(prefix=PREFIX))
        me = os.getpid()
        (self.dir / OWNER_FILE).write_text(f"{me} {_start_time(me)}\n")
        self.data = self.dir / "data"
        self.log = self.dir / "log"
        self.port = ports.reserve()
        self._started = False
        self._as_postgres = os.geteuid() == 0
        # before the server exists: a test process killed at any moment from now on takes it
        # down (the watchdog's stdin is a pipe whose writing end only this process holds)
        reading, self._lifeline = os.pipe()
        try:
            self._watchdog = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("pg_watchdog.py")), str(self.dir),
                 str(bin_dir), "1" if self._as_postgres else "0"],
                stdin=reading,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        finally:
            os.close(reading)
        if self._as_postgres:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                self.destroy()
                raise RuntimeError(
                    "PostgreSQL refuses to run as root and there is no `postgres` user to run it"
                    f" as: create one, or set {URL_VARIABLE}"
                ) from None
            os.chown(self.dir, user.pw_uid, user.pw_gid)
        try:
            self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8")
        except BaseException:
            self.destroy()
            raise

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
                ports.release(self.port)
                self.port = ports.reserve()
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
        ports.release(self.port)
        if self._lifeline >= 0:  # the watchdog wakes, finds nothing left, and exits
            os.close(self._lifeline)
            self._lifeline = -1
            try:
                self._watchdog.wait(10)
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
                self._watchdog.wait()


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
