"""Shared fixtures: a local PKI, a real control plane on loopback, real workers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from taskrun.controlplane.app import RunningServer, start_server
from taskrun.controlplane.config import ServerConfig
from taskrun.controlplane.pki import PkiPaths, init_pki
from taskrun.worker.agents import load_agents
from taskrun.worker.config import WorkerConfig
from taskrun.worker.daemon import WorkerDaemon
from tests import ports
from tests.postgres import (
    URL_VARIABLE,
    PostgresServer,
    drop_schema,
    new_schema,
    postgres_or_skip,
    schema_url,
)

if TYPE_CHECKING:
    from taskrun.cli.client import Client

WORKERS = tuple(f"worker-{n}" for n in range(1, 7))


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    return init_pki(tmp_path_factory.mktemp("pki") / "certs", workers=WORKERS)


@pytest.fixture(scope="session")
def cli_certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`taskrun certs init` run once: (the directory holding its `certs`, what it printed).
    Copied into the CLI tests' directories: they need a PKI the command made, not a new one
    each time (a test that needs a CA of its own runs the command itself)."""
    where = tmp_path_factory.mktemp("cli-certs")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKRUN_")}
    init = subprocess.run(
        [sys.executable, "-m", "taskrun.cli.main", "certs", "init"],
        cwd=where,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert init.returncode == 0, init.stderr
    return where, init.stdout


def copy_cli_certs(made: tuple[Path, str], into: Path) -> str:
    """Put `cli_certs`' files in `into/certs`; returns what `certs init` printed."""
    shutil.copytree(made[0] / "certs", into / "certs")
    return made[1]


@pytest.fixture
def reserve_port() -> Iterator[Callable[..., int]]:
    """`reserve_port(count=1)`: the first of `count` consecutive loopback ports for a server whose
    port must be known before it starts or kept across restarts (tests/ports.py); given back
    after the test. A server that can bind port 0 should do that instead."""
    taken: list[int] = []

    def reserve(count: int = 1) -> int:
        taken.append(ports.reserve(count))
        return taken[-1]

    yield reserve
    for port in taken:
        ports.release(port)


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """A PostgreSQL server for the whole run: $TASKRUN_TEST_POSTGRES_URL, or one started here
    (and stopped at the end). Without the binaries: fails on CI, skips elsewhere."""
    given = os.environ.get(URL_VARIABLE)
    if given:
        yield given
        return
    server = PostgresServer(postgres_or_skip())
    try:
        server.start()
        yield server.url
    finally:
        server.destroy()


@pytest.fixture
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    """A URL whose connections work in a new, empty schema of their own (dropped afterwards)."""
    schema = new_schema(postgres_server_url)
    try:
        yield schema_url(postgres_server_url, schema)
    finally:
        drop_schema(postgres_server_url, schema)


@dataclass
class Cluster:
    """A control plane and workers on loopback, torn down by the fixture."""

    pki: PkiPaths
    tmp: Path
    server: RunningServer | None = None
    port: int = 0  # reserved at the first start and kept across restarts (tests/ports.py)
    public_port: int = 0  # the TLS-only listener (Enroll, health, API tokens)
    reserved: int = 0  # the first port of the block reserved for the two listeners
    workers: dict[str, tuple[WorkerDaemon, asyncio.Task[int]]] = field(default_factory=dict)
    clients: list[object] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def public_address(self) -> str:
        return f"127.0.0.1:{self.public_port}"

    async def start_server(self, **overrides: object) -> RunningServer:
        if not self.reserved:  # a restart must find its ports free: bind(0) ones may be taken
            self.reserved = ports.reserve(2)
            self.port, self.public_port = self.reserved, self.reserved + 1
        settings: dict[str, object] = {
            "listen": f"127.0.0.1:{self.port}",
            "public_listen": f"127.0.0.1:{self.public_port}",
            "store": f"sqlite:{self.tmp / 'taskrun.db'}",
            "ca_cert": self.pki.ca_cert,
            "server_cert": self.pki.server_cert,
            "server_key": self.pki.server_key,
            "heartbeat_interval": 0.5,
            "lease_duration": 2.0,
            "lease_margin": 0.2,
            "retry_backoff_base": 0.05,
        }
        config = ServerConfig.model_validate({**settings, **overrides})
        self.server = await start_server(config)
        self.port = self.server.port
        self.public_port = self.server.public_port
        return self.server

    async def stop_server(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=0.5)
            self.server = None

    async def start_worker(
        self,
        worker_id: str = "worker-1",
        *,
        wait: bool = True,
        running: dict[str, Any] | None = None,
        **overrides: object,
    ) -> WorkerDaemon:
        """A worker daemon in this process; `running`: agent instances by name to run instead
        of the ones `agents` names (a test's own agent)."""
        settings: dict[str, object] = {
            "server": self.address,
            "worker_id": worker_id,
            "agents": ["echo"],
            "ca_cert": self.pki.ca_cert,
            "cert": self.pki.worker_cert(worker_id),
            "key": self.pki.worker_key(worker_id),
            "reconnect_max_wait": 0.5,
            "drain_timeout": 5.0,
            # beside tmp, not in it: some tests keep certificates or state right in tmp
            "workspace_root": self.tmp.with_name(f"{self.tmp.name}-ws") / worker_id,
        }
        config = WorkerConfig.model_validate({**settings, **overrides})
        daemon = WorkerDaemon(config, running or load_agents(config.agents))
        task = asyncio.create_task(daemon.run())
        self.workers[worker_id] = (daemon, task)
        if wait:
            await self.wait_registered(worker_id)
        return daemon

    async def wait_registered(self, worker_id: str) -> None:
        """Until the server has a session for the worker (not only the worker's view)."""
        assert self.server is not None
        async with asyncio.timeout(10):
            while worker_id not in self.server.engine.sessions:
                await asyncio.sleep(0.01)

    async def stop_worker(self, worker_id: str) -> int:
        daemon, task = self.workers.pop(worker_id)
        daemon.on_signal()
        async with asyncio.timeout(15):
            return await task

    def client(
        self, identity: str = "operator", *, options: Sequence[tuple[str, Any]] = ()
    ) -> Client:
        """A client of the control plane with `identity`'s certificate; `options`: the channel's."""
        from taskrun.cli.client import Client

        if identity == "operator":
            cert, key = self.pki.operator_cert, self.pki.operator_key
        else:
            cert, key = self.pki.worker_cert(identity), self.pki.worker_key(identity)
        client = Client(
            self.address,
            ca=self.pki.ca_cert.read_bytes(),
            cert=cert.read_bytes(),
            key=key.read_bytes(),
            options=options,
        )
        self.clients.append(client)
        return client

    async def close(self) -> None:
        for client in self.clients:
            with contextlib.suppress(Exception):
                await client.close()  # type: ignore[attr-defined]
        for _daemon, task in self.workers.values():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await self.stop_server()
        ports.release(self.reserved)


@pytest.fixture
async def cluster(pki: PkiPaths, tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(pki, tmp_path)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
def anyio_backend() -> Iterator[str]:
    yield "asyncio"
