"""Leadership of several control planes on one PostgreSQL database: a lease row with a fencing
epoch.

The row `taskrun_leader` (one row, migration 5 of postgres.py) names the control plane that
leads, since when, until when its lease runs (the database's clock), and the epoch of its term.

- **Takeover** is one UPDATE that succeeds only when the lease has run out (or was released):
  it adds one to the epoch. The database's clock decides expiry, so the control planes' clocks
  need not agree with each other (only tick at the rate the database's does, see `hold`).
- **Renewal** is an UPDATE that succeeds only while the epoch is still ours.
- **Fencing**: every write transaction of the active control plane starts with
  ``SELECT epoch FROM taskrun_leader WHERE id = 1 FOR SHARE`` (`guard`, installed as the store's
  `write_guard`) and refuses to go on when the epoch is not its own. The share lock is held to
  COMMIT and conflicts with the takeover's UPDATE, so a takeover and a write are serialized: the
  write either commits before the takeover (and the new leader, which loads its state after
  the takeover, sees it) or finds the new epoch and writes nothing. A deposed leader (paused by
  GC or SIGSTOP past its lease) therefore cannot write a single row after the takeover.
  A leader stopped in the middle of a write transaction would hold that lock forever: the
  store's connections set `idle_in_transaction_session_timeout`, so PostgreSQL ends such a
  session (and releases its lock) after `IDLE_IN_TRANSACTION`.

Advisory locks were the other candidate: a session-level lock is held as long as the
connection lives, which after a network partition can be minutes (TCP keepalives) and gives
writes on other connections nothing to check; a lease row with an epoch bounds the handover by
the lease and lets the database refuse stale writes.

Each control plane also keeps a row in `taskrun_control_planes` (its address, when it started and
was last seen, the workers connected to it) for `taskrun status`.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import psycopg
import structlog
from psycopg.rows import DictRow, dict_row

from taskrun.controlplane.store.postgres import CONNECTION_DEFAULTS, describe
from taskrun.core.errors import StoreUnavailable

log = structlog.get_logger(__name__)

Connection = psycopg.AsyncConnection[DictRow]

# The database's clock in microseconds since the epoch (clock_timestamp: now, not the start of
# the transaction).
_NOW: Final = "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint"
# A session idle inside a transaction this long is ended by PostgreSQL (a leader stopped in the
# middle of a write must not block the takeover with the lock it holds).
IDLE_IN_TRANSACTION: Final = "5s"
# A takeover or renewal waits at most this long for a row lock held by a write in flight.
_LOCK_TIMEOUT: Final = "2s"
# Control planes not seen for this long are dropped from the list.
_FORGET_AFTER_US: Final = 3600 * 1_000_000

_ACQUIRE: Final = f"""
    UPDATE taskrun_leader
       SET epoch = epoch + 1, holder = %(id)s, address = %(address)s,
           public_address = %(public_address)s,
           since = {_NOW}, expires_at = {_NOW} + %(lease)s
     WHERE id = 1 AND (holder = '' OR expires_at <= {_NOW})
 RETURNING epoch, since, expires_at"""
_RENEW: Final = f"""
    UPDATE taskrun_leader SET expires_at = {_NOW} + %(lease)s
     WHERE id = 1 AND epoch = %(epoch)s AND holder = %(id)s
 RETURNING expires_at"""
_RELEASE: Final = """
    UPDATE taskrun_leader SET holder = '', expires_at = 0
     WHERE id = 1 AND epoch = %(epoch)s AND holder = %(id)s"""
_LEADER: Final = (
    "SELECT epoch, holder, address, public_address, since, expires_at,"
    f" {_NOW} AS now FROM taskrun_leader"
)
_CHECK: Final = "SELECT epoch, holder, address FROM taskrun_leader WHERE id = 1 FOR SHARE"
_SEEN: Final = f"""
    INSERT INTO taskrun_control_planes
           (id, address, hostname, pid, version, started_at, seen_at, workers)
    VALUES (%(id)s, %(address)s, %(hostname)s, %(pid)s, %(version)s, {_NOW}, {_NOW},
            %(workers)s::jsonb)
    ON CONFLICT (id) DO UPDATE
       SET address = excluded.address, seen_at = excluded.seen_at, workers = excluded.workers"""
_FORGET: Final = f"DELETE FROM taskrun_control_planes WHERE seen_at < {_NOW} - %(age)s"
_CONTROL_PLANES: Final = (
    f"SELECT id, address, hostname, pid, version, started_at, seen_at, workers, {_NOW} AS now"
    " FROM taskrun_control_planes ORDER BY started_at, id"
)


class Deposed(StoreUnavailable):
    """This control plane no longer leads: another one took over (a newer epoch)."""

    def __init__(self, epoch: int, leader: str, address: str) -> None:
        where = f" at {address}" if address else ""
        super().__init__(
            f"this control plane no longer leads: {leader or 'no control plane'}{where} took"
            f" over with epoch {epoch}"
        )
        self.epoch = epoch
        self.leader = leader
        self.address = address


@dataclass(frozen=True, slots=True)
class LeaderInfo:
    epoch: int
    holder: str  # '' when no control plane leads
    address: str  # its mTLS listener, as it advertises it
    public_address: str  # its TLS-only listener (API tokens), '' when it has none
    since: datetime | None
    expires_in: float  # seconds by the database's clock; <= 0 once it ran out


@dataclass(frozen=True, slots=True)
class ControlPlaneRow:
    id: str
    address: str
    hostname: str
    pid: int
    version: str
    started_at: datetime
    seen_ago: float  # seconds, by the database's clock
    workers: list[str]


def _time(value: int) -> datetime | None:
    return datetime.fromtimestamp(value / 1e6, UTC) if value else None


def new_control_plane_id() -> str:
    return f"cp-{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


class LeaderLease:
    """One control plane's side of the lease, on a connection of its own.

    `epoch` is the term this process holds (0: none). `guard` is the store's write guard.
    """

    def __init__(
        self,
        url: str,
        control_plane_id: str,
        address: str,
        *,
        duration: float,
        version: str,
        public_address: str = "",
    ) -> None:
        """`duration`: seconds a term lasts without renewal."""
        self.url = url
        self.where = describe(url)
        self.id = control_plane_id
        self.address = address
        self.public_address = public_address
        self.duration = duration
        self.version = version
        self.epoch = 0
        self.since: datetime | None = None
        self.leader = LeaderInfo(0, "", "", "", None, 0.0)  # as last read
        self.deposed_by: Deposed | None = None  # set by `guard` when a write found a newer epoch
        self._conn: Connection | None = None
        options: dict[str, Any] = {"autocommit": True, "row_factory": dict_row}
        given = psycopg.conninfo.conninfo_to_dict(url)
        options.update({k: v for k, v in CONNECTION_DEFAULTS.items() if k not in given})
        self._options = options

    # --- connection ----------------------------------------------------------------------------

    async def _connection(self) -> Connection:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                await self.close()
            conn = await psycopg.AsyncConnection.connect(self.url, **self._options)
            await conn.execute(f"SET lock_timeout = '{_LOCK_TIMEOUT}'")
            await conn.execute(f"SET statement_timeout = '{_LOCK_TIMEOUT}'")
            self._conn = conn
        return conn

    async def _fetch(self, sql: str, params: dict[str, Any] | None = None) -> list[DictRow]:
        """One statement; StoreUnavailable when the database cannot be reached."""
        try:
            conn = await self._connection()
            cur = await conn.execute(sql, params)
            return await cur.fetchall() if cur.description else []
        except psycopg.Error as exc:
            if self._conn is not None and (self._conn.broken or self._conn.closed):
                self._conn = None
            raise StoreUnavailable(
                f"the leadership lease at {self.where} cannot be read or written:"
                f" {' '.join(str(exc).split())}"
            ) from exc

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close()
            except psycopg.Error as exc:
                log.warning("closing the lease connection failed", error=str(exc))

    # --- the lease -----------------------------------------------------------------------------

    async def try_acquire(self) -> bool:
        """Take the lease if it ran out or was released: a new epoch. True when this process
        leads now."""
        rows = await self._fetch(
            _ACQUIRE,
            {
                "id": self.id,
                "address": self.address,
                "public_address": self.public_address,
                "lease": self._lease_us(),
            },
        )
        if not rows:
            await self.read_leader()
            return False
        self.epoch = int(rows[0]["epoch"])
        self.since = _time(int(rows[0]["since"]))
        self.deposed_by = None
        self.leader = LeaderInfo(
            self.epoch, self.id, self.address, self.public_address, self.since, self.duration
        )
        log.info("leadership acquired", epoch=self.epoch, control_plane=self.id)
        return True

    async def renew(self) -> bool:
        """Extend the lease; False when another control plane took over (a newer epoch)."""
        rows = await self._fetch(
            _RENEW, {"id": self.id, "epoch": self.epoch, "lease": self._lease_us()}
        )
        return bool(rows)

    async def release(self) -> None:
        """Give the lease up (a clean stop): a standby takes over at its next poll."""
        if self.epoch:
            await self._fetch(_RELEASE, {"id": self.id, "epoch": self.epoch})
            log.info("leadership released", epoch=self.epoch, control_plane=self.id)
        self.epoch = 0

    async def read_leader(self) -> LeaderInfo:
        rows = await self._fetch(_LEADER)
        row = rows[0]
        self.leader = LeaderInfo(
            epoch=int(row["epoch"]),
            holder=str(row["holder"]),
            address=str(row["address"]),
            public_address=str(row["public_address"]),
            since=_time(int(row["since"])),
            expires_in=(int(row["expires_at"]) - int(row["now"])) / 1e6,
        )
        return self.leader

    async def guard(self, conn: Connection) -> None:
        """The store's write guard: the first statement of every write transaction."""
        cur = await conn.execute(_CHECK)
        row = await cur.fetchone()
        if row is None or int(row["epoch"]) != self.epoch or str(row["holder"]) != self.id:
            epoch = int(row["epoch"]) if row else 0
            holder = str(row["holder"]) if row else ""
            address = str(row["address"]) if row else ""
            self.deposed_by = Deposed(epoch, holder, address)
            raise self.deposed_by

    def _lease_us(self) -> int:
        return int(self.duration * 1_000_000)

    def install(self, store: Any) -> None:
        """Make `store` (a PostgresStore) write only while this process leads."""
        store.write_guard = self.guard
        store.session_settings = {"idle_in_transaction_session_timeout": IDLE_IN_TRANSACTION}

    # --- the list of control planes ------------------------------------------------------------

    async def seen(self, workers: Sequence[str] = ()) -> None:
        """Record that this control plane is alive, with the workers connected to it."""
        await self._fetch(
            _SEEN,
            {
                "id": self.id,
                "address": self.address,
                "hostname": socket.gethostname(),
                "pid": os.getpid(),
                "version": self.version,
                "workers": json.dumps(sorted(workers)),
            },
        )

    async def forget_old(self) -> None:
        await self._fetch(_FORGET, {"age": _FORGET_AFTER_US})

    async def leave(self) -> None:
        """Remove this control plane from the list (a clean stop)."""
        await self._fetch("DELETE FROM taskrun_control_planes WHERE id = %(id)s", {"id": self.id})

    async def control_planes(self) -> list[ControlPlaneRow]:
        rows = await self._fetch(_CONTROL_PLANES)
        out = []
        for row in rows:
            workers = row["workers"]
            if isinstance(workers, str):
                workers = json.loads(workers)
            out.append(
                ControlPlaneRow(
                    id=str(row["id"]),
                    address=str(row["address"]),
                    hostname=str(row["hostname"]),
                    pid=int(row["pid"]),
                    version=str(row["version"]),
                    started_at=_time(int(row["started_at"])) or datetime.fromtimestamp(0, UTC),
                    seen_ago=(int(row["now"]) - int(row["seen_at"])) / 1e6,
                    workers=[str(w) for w in workers],
                )
            )
        return out
