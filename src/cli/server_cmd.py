"""`taskrun server`: run the control plane, configured by flags, TASKRUN_* variables and
defaults (`server_config`).

`register(subparsers)` adds it to the `taskrun` parser (src/cli/main.py) with main's helpers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path
from typing import Any

from taskrun.cli import agent_flags
from taskrun.cli import credentials as creds
from taskrun.cli.exits import EXIT_FAILED, EXIT_OK, CliError
from taskrun.cli.running import main_module as _cli

DEFAULT_METRICS_LISTEN = "127.0.0.1:9464"


def register(commands: Any) -> None:
    cli = _cli()
    p = cli._leaf(commands, "server", cmd_server, help="run the control plane")
    p.add_argument(
        "--listen",
        help="address to listen on (TASKRUN_LISTEN, default 127.0.0.1:50051; port 0 picks a free "
        "port, logged and written to --ready-file)",
    )
    p.add_argument(
        "--store",
        help="sqlite:PATH, postgresql://USER:PASSWORD@HOST:PORT/DBNAME or memory "
        "(TASKRUN_STORE, default sqlite:.taskrun/taskrun.db)",
    )
    p.add_argument("--db", metavar="PATH", help="shorthand for --store sqlite:PATH (TASKRUN_DB)")
    p.add_argument("--server-cert", help="default <certs-dir>/server.pem (TASKRUN_SERVER_CERT)")
    p.add_argument("--server-key", help="default <certs-dir>/server-key.pem (TASKRUN_SERVER_KEY)")
    p.add_argument(
        "--ca-key",
        help="CA key that signs worker certificates "
        "(TASKRUN_CA_KEY, default <certs-dir>/ca-key.pem)",
    )
    p.add_argument(
        "--public-listen",
        metavar="ADDR",
        help="TLS-only listener for enrollment, health and API tokens; empty disables "
        "(TASKRUN_PUBLIC_LISTEN, default: the --listen host, next port)",
    )
    p.add_argument(
        "--no-public-api",
        dest="public_operator_api",
        action="store_false",
        default=None,
        help="serve only enrollment and health on the public listener, not the operator "
        "services for API tokens (TASKRUN_PUBLIC_API=0)",
    )
    p.add_argument(
        "--worker-cert-lifetime",
        type=cli.positive_float,
        metavar="S",
        help="lifetime of enrolled and renewed worker certificates (default 86400 = 24 h)",
    )
    p.add_argument(
        "--operator-cert-lifetime",
        type=cli.positive_float,
        metavar="S",
        help="default and longest lifetime of `taskrun login` certificates "
        "(default 43200 = 12 h, at most 86400)",
    )
    p.add_argument(
        "--heartbeat-interval",
        type=cli.positive_float,
        metavar="S",
        help="how often workers renew their lease (default 1; at most a third of --lease)",
    )
    p.add_argument(
        "--idle-heartbeat-interval",
        type=cli.positive_float,
        metavar="S",
        help="how often a worker holding no runs renews it (default 10; 0 = every "
        "--heartbeat-interval): it renews before starting a run given to it then; a silent "
        "idle worker is shown offline after this plus --lease and --lease-margin",
    )
    p.add_argument(
        "--lease",
        type=cli.positive_float,
        metavar="S",
        help="the lease on a worker's runs (default 4; on PostgreSQL 3 x --leader-lease + 2, to "
        "outlast a takeover): a worker that cannot renew it stops its runs; the runs of a dead "
        "or cut-off worker are retried after it plus --lease-margin",
    )
    p.add_argument(
        "--lease-margin",
        type=cli.positive_float,
        metavar="S",
        help="wait this long after a lease ran out before retrying its runs (default 0.5)",
    )
    p.add_argument(
        "--leader-lease",
        type=cli.positive_float,
        metavar="S",
        help="with PostgreSQL, several servers share the database: one leads, the others stand "
        "by and take over once its lease (default 2) ran out (TASKRUN_LEADER_LEASE)",
    )
    p.add_argument(
        "--advertise",
        metavar="ADDR",
        help="host:port where workers and clients reach this server; standbys name the "
        "leader's (TASKRUN_ADVERTISE, default: --listen)",
    )
    p.add_argument(
        "--metrics-listen",
        metavar="ADDR",
        help="serve Prometheus /metrics on host:port; empty disables "
        "(TASKRUN_METRICS_LISTEN, default 127.0.0.1:9464)",
    )
    p.add_argument(
        "--ready-file",
        metavar="PATH",
        help='once listening, write the bound addresses to PATH as JSON ({"address": ..., '
        '"public_address": ..., "http_address": ..., "pid": ...}): with port 0 in '
        "--listen (any free port) it names the ports picked (TASKRUN_READY_FILE)",
    )
    p.add_argument(
        "--http-listen",
        metavar="ADDR",
        help="serve the HTTP API (JSON, server-sent events) and the MCP server (/mcp) on "
        "host:port, TLS with the server certificate, API tokens (TASKRUN_HTTP_LISTEN, "
        "default: not served)",
    )
    p.add_argument(
        "--mcp-url",
        metavar="URL",
        help="the MCP server's URL as runs that allow sub-tasks reach it (TASKRUN_MCP_URL, "
        "default https://<--http-listen host>:<port>/mcp; a wildcard host becomes the host "
        "each worker connects to)",
    )
    p.add_argument(
        "--max-subtask-depth",
        type=int,
        metavar="N",
        help="how many levels of sub-tasks may nest below a task (default 3)",
    )
    p.add_argument(
        "--webhook-allow-network",
        action="append",
        metavar="CIDR",
        help="let webhooks reach this loopback or private network, e.g. 10.0.0.0/8 (repeat; "
        "TASKRUN_WEBHOOK_ALLOW_NETWORKS, comma-separated; default: only public addresses)",
    )
    agent_flags.add_server_flags(p)


def server_config(args: argparse.Namespace) -> Any:
    """The ServerConfig described by flags, TASKRUN_* variables and defaults."""
    from pydantic import ValidationError

    from taskrun.controlplane.config import ServerConfig

    cli = _cli()
    directory = cli.certs_dir(args)
    values: dict[str, Any] = {
        "ca_cert": creds.resolve_ca(cli._arg(args, "ca"), directory),
        "server_cert": Path(
            cli._arg(args, "server_cert")
            or cli._env("TASKRUN_SERVER_CERT")
            or directory / "server.pem"
        ),
        "server_key": Path(
            cli._arg(args, "server_key")
            or cli._env("TASKRUN_SERVER_KEY")
            or directory / "server-key.pem"
        ),
        "ca_key": Path(
            cli._arg(args, "ca_key") or cli._env("TASKRUN_CA_KEY") or directory / "ca-key.pem"
        ),
    }
    listen = cli._arg(args, "listen") or cli._env("TASKRUN_LISTEN")
    public = cli._arg(args, "public_listen")
    if public is None:
        public = os.environ.get("TASKRUN_PUBLIC_LISTEN")  # set but empty disables it
    optional = {
        "listen": listen,
        "public_listen": public,
        "public_operator_api": _public_api(args),
        "worker_cert_lifetime": cli._arg(args, "worker_cert_lifetime"),
        "operator_cert_lifetime": cli._arg(args, "operator_cert_lifetime"),
        "store": cli.resolve_store(args),
        "heartbeat_interval": cli._arg(args, "heartbeat_interval"),
        "idle_heartbeat_interval": cli._arg(args, "idle_heartbeat_interval"),
        "lease_duration": cli._arg(args, "lease"),
        "lease_margin": cli._arg(args, "lease_margin"),
        "leader_lease": cli._arg(args, "leader_lease") or cli._env("TASKRUN_LEADER_LEASE"),
        "advertise": cli._arg(args, "advertise") or cli._env("TASKRUN_ADVERTISE"),
        "metrics_listen": metrics_listen(args, DEFAULT_METRICS_LISTEN),
        "metrics_optional": metrics_listen(args, "") == "",
        "http_listen": cli._arg(args, "http_listen") or cli._env("TASKRUN_HTTP_LISTEN"),
        "ready_file": cli._arg(args, "ready_file") or cli._env("TASKRUN_READY_FILE"),
        "mcp_url": cli._arg(args, "mcp_url") or cli._env("TASKRUN_MCP_URL"),
        "max_subtask_depth": cli._arg(args, "max_subtask_depth"),
        "webhook_allow_networks": cli._arg(args, "webhook_allow_network")
        or [
            n.strip()
            for n in (cli._env("TASKRUN_WEBHOOK_ALLOW_NETWORKS") or "").split(",")
            if n.strip()
        ]
        or None,
    }
    values.update({k: v for k, v in optional.items() if v is not None})
    try:
        values.update(agent_flags.server_values(args))
    except ValueError as exc:
        raise CliError(str(exc)) from None
    try:
        return ServerConfig(**values)
    except ValidationError as exc:
        raise CliError(validation_message(exc)) from None


def _public_api(args: argparse.Namespace) -> bool | None:
    """--no-public-api, else TASKRUN_PUBLIC_API (0/false/no turns it off), else the default."""
    cli = _cli()
    flag = cli._arg(args, "public_operator_api")
    if flag is not None:
        return bool(flag)
    value = cli._env("TASKRUN_PUBLIC_API")
    if value is None:
        return None
    return value.strip().lower() not in {"0", "false", "no", "off"}


def metrics_listen(args: argparse.Namespace, default: str) -> str:
    """--metrics-listen, else TASKRUN_METRICS_LISTEN (set but empty disables), else default."""
    cli = _cli()
    flag = cli._arg(args, "metrics_listen")
    if flag is not None:
        return str(flag)
    return os.environ.get("TASKRUN_METRICS_LISTEN", default)


def validation_message(exc: Any) -> str:
    parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
    return "; ".join(parts)


def cmd_server(args: argparse.Namespace) -> int:
    cli = _cli()
    config = server_config(args)
    cli._require_files(
        (config.ca_cert, "CA certificate"),
        (config.server_cert, "server certificate"),
        (config.server_key, "server key"),
    )
    cli._setup_logging(args, daemon=True)
    from taskrun.controlplane.app import run_server

    try:
        asyncio.run(run_server(config))
    except RuntimeError as exc:
        if "bind" not in str(exc):
            raise
        raise CliError(
            f"could not listen on {config.listen}: is another server using it?", EXIT_FAILED
        ) from None
    except OSError as exc:
        raise CliError(f"could not start the server: {exc}", EXIT_FAILED) from None
    return EXIT_OK
