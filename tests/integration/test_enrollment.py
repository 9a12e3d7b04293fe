"""Enrollment and renewal end to end: token -> `worker enroll` -> `worker run` from the state dir,
a certificate renewed mid-run without losing or repeating output, an expired one refused."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from structlog.testing import capture_logs

from taskrun.controlplane.pki import issue_client_cert
from taskrun.core.identity import Principal, PrincipalKind
from taskrun.core.ids import WorkerId
from taskrun.core.status import RunStatus, TaskStatus
from taskrun.v1 import security_pb2 as spb
from taskrun.v1 import security_pb2_grpc
from taskrun.worker.identity import StatePaths, enroll, load_identity
from tests.conftest import Cluster

CLI = [sys.executable, "-m", "taskrun.cli.main"]


async def wait_for(predicate, within: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(within):
        while not predicate():
            await asyncio.sleep(0.01)


async def create_token(
    cluster: Cluster, worker_id: str = "", labels: dict[str, str] | None = None
) -> spb.CreateBootstrapTokenResponse:
    client = cluster.client()
    stub = security_pb2_grpc.AccessServiceStub(client.channel)
    response: spb.CreateBootstrapTokenResponse = await stub.CreateBootstrapToken(
        spb.CreateBootstrapTokenRequest(ttl_seconds=600, worker_id=worker_id, labels=labels or {})
    )
    return response


async def start(cluster: Cluster, **overrides: object) -> None:
    await cluster.start_server(ca_key=cluster.pki.ca_key, public_listen="127.0.0.1:0", **overrides)


async def enrolled_worker(cluster: Cluster, state: Path, worker_id: str) -> str:
    token = await create_token(cluster, worker_id)
    enrolled = await enroll(cluster.public_address, token.token, token.ca_fingerprint, state)
    return enrolled.identity.worker_id


def serial_and_key(state: Path) -> tuple[int, bytes]:
    paths = StatePaths(state)
    return x509.load_pem_x509_certificate(paths.cert.read_bytes()).serial_number, (
        paths.key.read_bytes()
    )


def short_lived_files(
    cluster: Cluster, worker_id: str, lifetime: timedelta, directory: Path
) -> tuple[Path, Path, x509.Certificate]:
    """`<id>.pem` and `<id>-key.pem` in directory, as `taskrun certs` writes them, valid for
    lifetime from now (after the usual 5 minutes of clock-skew allowance)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert_pem, _ = issue_client_cert(
        cluster.pki,
        Principal(PrincipalKind.WORKER, worker_id),
        lifetime,
        public_key=key.public_key(),
    )
    cert_path, key_path = directory / f"{worker_id}.pem", directory / f"{worker_id}-key.pem"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path, x509.load_pem_x509_certificate(cert_pem)


async def test_an_enrolled_worker_runs_tasks_from_its_state_directory(
    cluster: Cluster, tmp_path: Path
) -> None:
    await start(cluster)
    state = tmp_path / "worker-state"
    token = await create_token(cluster, "edge-1", {"site": "lab"})

    enrolled = await enroll(cluster.public_address, token.token, token.ca_fingerprint, state)

    identity = load_identity(state)
    assert identity is not None and identity == enrolled.identity
    assert identity.worker_id == "edge-1"
    assert identity.server == cluster.address  # the host dialled + the session port
    assert identity.ca_fingerprint == token.ca_fingerprint
    assert enrolled.labels == {"site": "lab"}
    daemon = await cluster.start_worker("edge-1", state_dir=state, server=identity.server)
    assert daemon.config.cert_path() == StatePaths(state).cert
    client = cluster.client()
    task = await client.create_task("echo", {"text": "hello from an enrolled worker"})
    final = await client.wait(task.id)
    assert final.status is TaskStatus.COMPLETED
    _, runs = await client.get_task(task.id)
    assert [r.worker_id for r in runs] == ["edge-1"]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKRUN_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


async def test_the_cli_enrolls_a_worker_and_runs_it_from_the_state_directory(
    cluster: Cluster, tmp_path: Path
) -> None:
    await start(cluster)
    token = await create_token(cluster, "cli-1")
    state = tmp_path / "state"
    argv = ["worker", "enroll", "--server", cluster.public_address]
    argv += ["--ca-fingerprint", token.ca_fingerprint, "--state-dir", str(state)]
    enroll_proc = await asyncio.create_subprocess_exec(
        *CLI,
        *argv,
        env=cli_env(TASKRUN_TOKEN=token.token),  # the token stays out of the command line
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(enroll_proc.communicate(), 30)
    assert enroll_proc.returncode == 0, err.decode()
    assert "enrolled as worker cli-1" in out.decode()
    assert f"taskrun worker run --state-dir {state}" in out.decode()

    with (tmp_path / "worker.log").open("wb") as log_file:
        worker = await asyncio.create_subprocess_exec(
            *CLI,
            "worker",
            "run",
            "--state-dir",
            str(state),
            "--agents",
            "echo",
            env=cli_env(),
            stdout=log_file,
            stderr=log_file,
        )
        try:
            await asyncio.wait_for(cluster.wait_registered("cli-1"), 30)
            client = cluster.client()
            task = await client.create_task("echo", {"text": "via the cli"})
            assert (await client.wait(task.id)).status is TaskStatus.COMPLETED
            worker.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(worker.wait(), 20) == 0
        finally:
            if worker.returncode is None:
                worker.kill()
                await worker.wait()

    again = await asyncio.create_subprocess_exec(
        *CLI,
        *argv,
        "--token",
        token.token,
        env=cli_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(again.communicate(), 30)
    assert again.returncode == 2
    assert "refused the token" in err.decode()


async def test_a_worker_enrolled_in_one_directory_runs_from_another_via_the_state_dir(
    cluster: Cluster, tmp_path: Path
) -> None:
    await start(cluster)
    token = await create_token(cluster, "xdg-1")
    xdg, here, elsewhere = tmp_path / "xdg", tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    env = cli_env(XDG_STATE_HOME=str(xdg))
    enroll_proc = await asyncio.create_subprocess_exec(
        *CLI,
        "worker",
        "enroll",
        "--server",
        cluster.public_address,
        "--ca-fingerprint",
        token.ca_fingerprint,
        cwd=here,
        env={**env, "TASKRUN_TOKEN": token.token},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(enroll_proc.communicate(), 30)
    assert enroll_proc.returncode == 0, err.decode()
    assert load_identity(xdg / "taskrun" / "worker") is not None
    assert list(here.iterdir()) == []  # nothing relative to the current directory
    with (tmp_path / "worker.log").open("wb") as log_file:
        worker = await asyncio.create_subprocess_exec(
            *CLI, "worker", "run", "--agents", "echo",
            cwd=elsewhere, env=env, stdout=log_file, stderr=log_file,
        )  # fmt: skip
        try:
            await asyncio.wait_for(cluster.wait_registered("xdg-1"), 30)
            worker.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(worker.wait(), 20) == 0
        finally:
            if worker.returncode is None:
                worker.kill()
                await worker.wait()


async def test_a_worker_without_identity_says_where_it_looked(tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    proc = await asyncio.create_subprocess_exec(
        *CLI, "worker", "run",
        cwd=tmp_path, env=cli_env(XDG_STATE_HOME=str(xdg)),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    text = err.decode()
    assert text.startswith("error: CA certificate certs/ca.pem does not exist")
    assert f"no enrolled identity in {xdg / 'taskrun' / 'worker'} either" in text
    assert "taskrun worker enroll" in text


async def test_a_token_works_once(cluster: Cluster, tmp_path: Path) -> None:
    from taskrun.worker.identity import EnrollmentError

    await start(cluster)
    token = await create_token(cluster)
    await enroll(cluster.public_address, token.token, token.ca_fingerprint, tmp_path / "a")
    with pytest.raises(EnrollmentError, match="refused the token"):
        await enroll(cluster.public_address, token.token, token.ca_fingerprint, tmp_path / "b")
    assert load_identity(tmp_path / "b") is None


async def test_the_certificate_is_renewed_mid_run_without_losing_or_repeating_output(
    cluster: Cluster, tmp_path: Path
) -> None:
    lifetime = 4.0
    await start(cluster, worker_cert_lifetime=lifetime)
    state = tmp_path / "state"
    worker_id = await enrolled_worker(cluster, state, "renewing-1")
    first_serial, first_key = serial_and_key(state)
    text = "".join(f"<{i:03}>" for i in range(36))
    with capture_logs() as logs:
        daemon = await cluster.start_worker(worker_id, state_dir=state)
        client = cluster.client()
        # 36 chunks, 0.15 s apart: more than the certificate's lifetime
        task = await client.create_task("echo", {"text": text, "chunks": 36, "delay": 0.15})
        final = await asyncio.wait_for(client.wait(task.id), 30)

    assert final.status is TaskStatus.COMPLETED
    renewed = [e for e in logs if e["event"] == "certificate renewed"]
    assert renewed, "the certificate was never renewed"
    assert all(e["worker_id"] == worker_id and "expires_at" in e for e in renewed)
    moved = [e for e in logs if e["event"] == "moving the session to the renewed certificate"]
    assert moved
    serial, key = serial_and_key(state)
    assert serial != first_serial and key != first_key
    _, runs = await client.get_task(task.id)
    assert [(r.status, r.worker_id) for r in runs] == [(RunStatus.COMPLETED, worker_id)]
    # what the control plane stored, exactly once each, in order
    assert cluster.server is not None
    chunks = await cluster.server.engine.store.read_output([runs[0].id])
    assert "".join(c.data for c in chunks) == text
    assert [c.seq for c in chunks] == list(range(1, len(chunks) + 1))
    assert daemon.connected.is_set()


async def test_an_expired_certificate_stops_the_worker_with_the_command_to_enroll_again(
    cluster: Cluster, tmp_path: Path
) -> None:
    await start(cluster)
    state = tmp_path / "state"
    worker_id = await enrolled_worker(cluster, state, "late-1")
    identity = load_identity(state)
    assert identity is not None
    paths = StatePaths(state)
    key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    # the same identity, but a certificate that ended a minute ago
    expired_pem, _ = issue_client_cert(
        cluster.pki,
        Principal(PrincipalKind.WORKER, worker_id),
        timedelta(minutes=1),
        public_key=key.public_key(),
        now=datetime.now(UTC) - timedelta(minutes=2),
    )
    paths.cert.write_bytes(expired_pem)
    expired_at = x509.load_pem_x509_certificate(expired_pem).not_valid_after_utc

    with capture_logs() as logs:
        await cluster.start_worker(worker_id, state_dir=state, wait=False)
        _, runner = cluster.workers.pop(worker_id)
        assert await asyncio.wait_for(runner, 10) == 2

    (line,) = [e for e in logs if e["event"] == "certificate expired; enroll again"]
    assert line["expired_at"] == expired_at.isoformat()
    assert line["command"] == (
        f"taskrun worker enroll --server {cluster.public_address} --token NEW_TOKEN "
        f"--ca-fingerprint {identity.ca_fingerprint} --state-dir {state}"
    )
    assert line["worker_id"] == worker_id
    assert worker_id not in cluster.server.engine.sessions  # type: ignore[union-attr]


async def test_a_certificate_issued_by_taskrun_certs_is_renewed_in_place(
    cluster: Cluster, tmp_path: Path
) -> None:
    await start(cluster, worker_cert_lifetime=60)
    # already due for renewal: 2 s lifetime after 5 minutes of clock-skew allowance
    cert_path, key_path, first = short_lived_files(
        cluster, "worker-5", timedelta(seconds=2), tmp_path
    )

    await cluster.start_worker("worker-5", cert=cert_path, key=key_path)

    def renewed() -> bool:
        current = x509.load_pem_x509_certificate(cert_path.read_bytes())
        return current.serial_number != first.serial_number

    await wait_for(renewed)
    current = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert current.not_valid_after_utc > first.not_valid_after_utc + timedelta(seconds=30)
    assert current.public_key() != first.public_key()
    await cluster.wait_registered("worker-5")  # moved to the new certificate, still serving
    client = cluster.client()
    task = await client.create_task("echo", {"text": "still here"})
    assert (await client.wait(task.id)).status is TaskStatus.COMPLETED


async def test_a_live_session_ends_when_its_certificate_expires_and_the_worker_stops(
    cluster: Cluster, tmp_path: Path
) -> None:
    # No CA key on the server: the worker cannot renew, so its certificate runs out while its
    # stream is up. The server ends the stream at expiry; the worker then stops with exit 2.
    await cluster.start_server(ca_key=tmp_path / "no-ca-key.pem")
    cert_path, key_path, cert = short_lived_files(
        cluster, "worker-6", timedelta(seconds=3), tmp_path
    )
    expires = cert.not_valid_after_utc

    with capture_logs() as logs:
        await cluster.start_worker("worker-6", cert=cert_path, key=key_path)
        assert cluster.server is not None
        assert (
            cluster.server.engine.sessions[WorkerId("worker-6")].worker.certificate_expires_at
            == expires
        )
        _, runner = cluster.workers.pop("worker-6")
        assert await asyncio.wait_for(runner, 15) == 2

    assert datetime.now(UTC) >= expires
    assert any(
        e["event"] == "worker certificate expired" and e.get("worker_id") == "worker-6"
        for e in logs
    )
    assert any(e["event"] == "certificate expired; enroll again" for e in logs)
    assert "worker-6" not in cluster.server.engine.sessions
