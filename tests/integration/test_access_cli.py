"""`taskrun token`, `taskrun api-token`, `taskrun audit` and `taskrun certs server` as processes
against a real control plane on loopback, the way an operator uses them."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from taskrun.cli.access_cmd import parse_duration
from taskrun.controlplane.pki import PkiPaths
from tests.conftest import Cluster

CLI = [sys.executable, "-m", "taskrun.cli.main"]


async def run_cli(
    cluster: Cluster, *args: str, server: str | None = None, **env: str
) -> tuple[int, str, str]:
    """Run `taskrun ARGS` with the operator's certificates; (exit code, stdout, stderr)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TASKRUN_")}
    environ.update(
        TASKRUN_SERVER=server or cluster.address,
        TASKRUN_CERTS_DIR=str(cluster.pki.directory),
        **env,
    )
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def json_of(cluster: Cluster, *args: str, **env: str) -> Any:
    code, out, err = await run_cli(cluster, *args, "--output", "json", **env)
    assert code == 0, err
    return json.loads(out)


async def test_token_create_prints_the_token_once_with_the_fingerprint_and_enroll_command(
    cluster: Cluster,
) -> None:
    await cluster.start_server()
    code, out, err = await run_cli(
        cluster, "token", "create", "--ttl", "30m", "--worker-id", "edge-1", "--label", "zone=eu"
    )
    assert code == 0, err
    token_line = next(line for line in out.splitlines() if line.startswith("token:"))
    token = token_line.split()[1]
    assert token.startswith("trb_")
    assert "sha256:" in out
    assert (
        f"taskrun worker enroll --server 127.0.0.1:{cluster.public_port} --token {token} "
        "--ca-fingerprint sha256:"
    ) in out
    assert "(valid for 30m, single use)" in out
    listed = (await json_of(cluster, "token", "list"))["tokens"]
    assert [(t["worker_id"], t["state"], t["labels"]) for t in listed] == [
        ("edge-1", "active", {"zone": "eu"})
    ]
    assert token not in json.dumps(listed)  # the secret is never listed


async def test_token_revoke_makes_it_unusable_and_list_all_shows_it(cluster: Cluster) -> None:
    await cluster.start_server()
    created = await json_of(cluster, "token", "create", "--worker-id", "edge-2")
    revoked = await json_of(cluster, "token", "revoke", created["token_id"])
    assert revoked["state"] == "revoked"
    assert await json_of(cluster, "token", "list") == {"tokens": []}
    revoked_too = (await json_of(cluster, "token", "list", "--all"))["tokens"]
    assert [t["state"] for t in revoked_too] == ["revoked"]
    code, _, err = await run_cli(cluster, "token", "revoke", created["token_id"])
    assert code != 0
    assert "FAILED_PRECONDITION" in err
    assert f"token {created['token_id']} is revoked" in err


async def test_an_api_token_with_read_scope_lists_but_cannot_submit(cluster: Cluster) -> None:
    await cluster.start_server()
    created = await json_of(cluster, "api-token", "create", "ci", "--scope", "read")
    assert created["scopes"] == ["read"]
    as_program = {"TASKRUN_API_TOKEN": created["token"]}
    code, _, err = await run_cli(
        cluster, "task", "list", server=cluster.public_address, **as_program
    )
    assert code == 0, err
    code, _, err = await run_cli(
        cluster,
        "task",
        "create",
        "echo",
        "--input",
        "{}",
        server=cluster.public_address,
        **as_program,
    )
    assert code != 0
    assert "PERMISSION_DENIED" in err and "submit" in err
    tokens = (await json_of(cluster, "api-token", "list"))["api_tokens"]
    assert [t["name"] for t in tokens] == ["ci"]
    await json_of(cluster, "api-token", "revoke", created["token_id"])
    code, _, err = await run_cli(
        cluster, "task", "list", server=cluster.public_address, **as_program
    )
    assert code != 0
    assert "UNAUTHENTICATED" in err and "revoked" in err


async def test_audit_lists_security_events_newest_first_filtered_by_kind(
    cluster: Cluster,
) -> None:
    await cluster.start_server()
    await json_of(cluster, "token", "create", "--worker-id", "edge-3")
    await json_of(cluster, "api-token", "create", "bot", "--scope", "submit")
    events = (await json_of(cluster, "audit"))["events"]
    assert [e["kind"] for e in events] == ["api_token_created", "bootstrap_token_created"]
    assert events[0]["id"] > events[1]["id"]
    only = (await json_of(cluster, "audit", "--kind", "bootstrap_token_created"))["events"]
    assert [e["subject"] for e in only] == [events[1]["subject"]]
    code, out, _ = await run_cli(cluster, "audit")
    assert code == 0 and "api_token_created" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("token", "create", "--ttl", "soon"), "is not a duration"),
        (("api-token", "create", "ci", "--scope", "root"), "unknown scope 'root'"),
        (("audit", "--kind", "everything"), "unknown kind 'everything'"),
    ],
)
async def test_bad_flags_are_usage_errors_that_name_the_value(
    cluster: Cluster, args: tuple[str, ...], message: str
) -> None:
    code, _, err = await run_cli(cluster, *args)
    assert code == 2
    assert message in err


async def test_a_worker_id_the_server_refuses_is_invalid_argument(cluster: Cluster) -> None:
    await cluster.start_server()
    code, _, err = await run_cli(cluster, "token", "create", "--worker-id", "Not Valid")
    assert code != 0
    assert "INVALID_ARGUMENT" in err and "worker_id" in err
    assert await json_of(cluster, "token", "list", "--all") == {"tokens": []}


async def test_certs_server_rotates_the_certificate_a_running_server_serves(
    cluster: Cluster, tmp_path: Path
) -> None:
    pki_dir = tmp_path / "pki"
    shutil.copytree(cluster.pki.directory, pki_dir)
    paths = PkiPaths.at(pki_dir)
    server = await cluster.start_server(
        ca_cert=paths.ca_cert, server_cert=paths.server_cert, server_key=paths.server_key
    )
    before = server.tls_sources[0].serial
    code, out, err = await run_cli(cluster, "certs", "server", "--dir", str(pki_dir))
    assert code == 0, err
    assert "wrote" in out
    rotated = x509.load_pem_x509_certificate(paths.server_cert.read_bytes()).serial_number
    assert rotated != before
    # a new connection (a new handshake) gets the new certificate, served without a restart
    assert await json_of(cluster, "workers", "list") == {"workers": []}
    assert server.tls_sources[0].serial == rotated


def test_durations_read_seconds_minutes_hours_and_days() -> None:
    assert [parse_duration(t) for t in ("90", "90s", "30m", "1h", "2d", "1.5h")] == [
        90,
        90,
        1800,
        3600,
        172800,
        5400,
    ]


async def test_a_token_lifetime_over_the_limit_is_refused_in_days_not_seconds(
    cluster: Cluster,
) -> None:
    await cluster.start_server()
    code, _, err = await run_cli(cluster, "token", "create", "--ttl", "30d")
    assert code == 2
    assert "ttl_seconds: must be at most 7d, not 30d" in err


async def test_the_cli_with_a_certificate_on_the_public_port_is_told_which_port_takes_it(
    cluster: Cluster,
) -> None:
    await cluster.start_server()
    code, _, err = await run_cli(cluster, "task", "list", server=cluster.public_address)
    assert code == 2
    assert "this is the public (TLS-only) port" in err
    assert f"operator certificates are accepted on port {cluster.port}" in err
