"""`taskrun`: the command line of TaskRun (certificates, server, worker, tasks, workers, dev).

Every global flag has a TASKRUN_* environment fallback; flags win over the environment.
Exit codes: 0 success; 1 a followed task FAILED or an unexpected server error; 2 a usage,
validation, not-found, precondition or permission error; 3 the server is unreachable;
130 a followed task was CANCELLED, or Ctrl-C.

Why one module, for now: the parser, the global settings and the worker, server and certificate
commands; other command groups have their own modules (task_cmd, schedule_cmd, access_cmd,
webhook_cmd, conversation_cmd, workflow_cmd, ...), exit codes and errors are in exits, and the
worker and server commands are the next to move out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import Any, TypeVar

import grpc

from taskrun import __version__
from taskrun.cli import (
    access_cmd,
    agent_flags,
    conversation_cmd,
    events_cmd,
    maintenance_cmd,
    output,
    schedule_cmd,
    status_cmd,
    store_cmd,
    task_cmd,
    usage_cmd,
    webhook_cmd,
    workflow_cmd,
)
from taskrun.cli import credentials as creds
from taskrun.cli.client import Client
from taskrun.cli.exits import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    FOLLOW_EXIT_HELP,
    CliError,
    describe_rpc_error,
    exit_code_for_status,
)
from taskrun.core.errors import TaskRunError
from taskrun.core.models import DEFAULT_MAX_ATTEMPTS
from taskrun.core.status import WorkerStatus
from taskrun.core.validation import parse_label_args

E = TypeVar("E", bound=IntEnum)
T = TypeVar("T")

# --- argument types --------------------------------------------------------------------------


def enum_arg(kind: type[E]) -> Callable[[str], list[E]]:
    """An argparse type reading one or more comma-separated lower-case enum names."""
    names = ", ".join(m.name.lower() for m in kind)

    def parse(text: str) -> list[E]:
        values = []
        for part in text.split(","):
            try:
                values.append(kind[part.strip().upper()])
            except KeyError:
                raise argparse.ArgumentTypeError(
                    f"unknown status {part.strip()!r} (choose from {names})"
                ) from None
        return values

    return parse


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value < 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def attempts_arg(text: str) -> int:
    """--max-attempts: a whole number >= 1 (leaving the flag out asks for the server's default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"{value} is too small: a task needs at least 1 attempt "
            f"(leave the flag out for the server's default, {DEFAULT_MAX_ATTEMPTS})"
        )
    return value


def flatten(groups: Sequence[list[E]] | None) -> list[E]:
    return [v for group in groups or () for v in group]


# --- parser ----------------------------------------------------------------------------------


def _add_global_options(parser: argparse.ArgumentParser, *, top: bool, cert: bool = True) -> None:
    """Connection and logging flags. On subcommands they default to SUPPRESS, so a flag given
    before the subcommand is not overwritten, and either position works."""

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    group = parser.add_argument_group("connection (flags win over TASKRUN_* variables)")
    group.add_argument(
        "--server",
        default=default(None),
        help="control plane address host:port; several comma separated (or a DNS name with "
        "several addresses): calls follow the leader among them "
        f"(TASKRUN_SERVER, default {creds.DEFAULT_SERVER})",
    )
    group.add_argument(
        "--certs-dir",
        default=default(None),
        help="directory of the PKI files (TASKRUN_CERTS_DIR, default certs)",
    )
    group.add_argument(
        "--ca",
        default=default(None),
        help="CA certificate (TASKRUN_CA, default <certs-dir>/ca.pem)",
    )
    if cert:
        group.add_argument(
            "--cert",
            default=default(None),
            help="operator certificate (TASKRUN_CERT, default <certs-dir>/operator.pem)",
        )
        group.add_argument(
            "--key",
            default=default(None),
            help="operator key (TASKRUN_KEY, default <certs-dir>/operator-key.pem)",
        )
    group.add_argument(
        "--api-token",
        default=default(None),
        metavar="TOKEN",
        help="authenticate with an API token instead of a certificate (TASKRUN_API_TOKEN; "
        "prefer the variable, a flag shows in the process list)",
    )
    group.add_argument(
        "--server-name",
        default=default(None),
        help="TLS name to verify in the server certificate (TASKRUN_SERVER_NAME; "
        "default localhost when --server is an IP address)",
    )
    group.add_argument(
        "--log-level",
        default=default(None),
        choices=("debug", "info", "warning", "error"),
        help="log level (TASKRUN_LOG_LEVEL, default info)",
    )
    group.add_argument(
        "--log-format",
        default=default(None),
        choices=("json", "console"),
        help="log format (TASKRUN_LOG_FORMAT; default json for server and worker, "
        "console otherwise)",
    )


def _add_output(parser: argparse.ArgumentParser, *, stream: bool = False) -> None:
    """--output: table or one JSON document; where a command streams, also jsonl (one JSON
    object per line as it happens)."""
    if stream:
        parser.add_argument(
            "--output",
            "-o",
            choices=("table", "json", "jsonl"),
            default="table",
            help="table for people (default); json: one JSON document when it ends "
            '({"task": …, "output": […]}); jsonl: one JSON object per line as it streams',
        )
        return
    parser.add_argument(
        "--output",
        "-o",
        choices=("table", "json"),
        default="table",
        help="table for people (default) or one JSON document",
    )


def _leaf(
    subparsers: Any, name: str, func: Callable[[argparse.Namespace], int], **kwargs: Any
) -> argparse.ArgumentParser:
    cert = kwargs.pop("operator_cert", True)
    parser: argparse.ArgumentParser = subparsers.add_parser(name, **kwargs)
    _add_global_options(parser, top=False, cert=cert)
    parser.set_defaults(func=func)
    return parser


def _group(subparsers: Any, name: str, help: str) -> Any:
    parser: argparse.ArgumentParser = subparsers.add_parser(name, help=help, description=help)
    parser.set_defaults(func=lambda _args: _usage(parser))
    return parser.add_subparsers(title="commands", metavar="COMMAND")


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _add_revoke(subparsers: Any) -> None:
    """`worker revoke` (the spelling of the security docs) and `workers revoke`."""
    p = _leaf(
        subparsers,
        "revoke",
        cmd_workers_revoke,
        help="cut a worker off at once and for good; its runs are retried elsewhere",
    )
    p.add_argument("worker_id", metavar="ID")
    p.add_argument("--reason", default="", help="recorded with the revocation")
    _add_output(p)


def _add_workers_list_and_get(subparsers: Any) -> None:
    """`workers list|get`, also spelled `worker list|get`."""
    p = _leaf(subparsers, "list", cmd_workers_list, help="list workers")
    p.add_argument(
        "--status",
        action="append",
        type=enum_arg(WorkerStatus),
        metavar="S",
        help="online, draining, offline, revoked (repeat or comma-separate)",
    )
    _add_output(p)
    p = _leaf(subparsers, "get", cmd_workers_get, help="show a worker with its agents")
    p.add_argument("worker_id", metavar="ID")
    _add_output(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskrun",
        description="TaskRun: run AI agents as Tasks on remote Workers.",
        epilog="Start everything locally with `taskrun dev`. " + FOLLOW_EXIT_HELP,
    )
    parser.add_argument("--version", action="version", version=f"taskrun {__version__}")
    _add_global_options(parser, top=True)
    parser.set_defaults(func=lambda _args: _usage(parser))
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    # certs
    certs = _group(commands, "certs", "create the local PKI: CA, server, operator, workers")
    p = _leaf(certs, "init", cmd_certs_init, help="create a CA and certificates")
    p.add_argument("--dir", help="where to write them (default --certs-dir)")
    p.add_argument(
        "--worker",
        action="append",
        metavar="ID",
        help="a worker to issue a certificate for (repeat; default worker-1 and worker-2)",
    )
    p.add_argument("--operator", default="admin", help="operator name (default admin)")
    p.add_argument(
        "--host",
        action="append",
        metavar="H",
        help="a name or address of the server (repeat; default localhost and 127.0.0.1)",
    )
    p.add_argument("--force", action="store_true", help="replace everything, including the CA")
    p = _leaf(certs, "worker", cmd_certs_worker, help="issue a certificate for one worker")
    p.add_argument("worker_id", metavar="ID")
    p.add_argument("--dir", help="the PKI directory (default --certs-dir)")

    p = _leaf(
        certs,
        "server",
        cmd_certs_server,
        help="issue a new server certificate (a running server uses it for new connections)",
    )
    p.add_argument("--dir", help="the PKI directory (default --certs-dir)")
    p.add_argument(
        "--host",
        action="append",
        metavar="H",
        help="a name or address of the server (repeat; default localhost and 127.0.0.1)",
    )

    # server
    p = _leaf(commands, "server", cmd_server, help="run the control plane")
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
        type=positive_float,
        metavar="S",
        help="lifetime of enrolled and renewed worker certificates (default 86400 = 24 h)",
    )
    p.add_argument(
        "--operator-cert-lifetime",
        type=positive_float,
        metavar="S",
        help="default and longest lifetime of `taskrun login` certificates "
        "(default 43200 = 12 h, at most 86400)",
    )
    p.add_argument(
        "--heartbeat-interval",
        type=positive_float,
        metavar="S",
        help="how often workers renew their lease (default 1; at most a third of --lease)",
    )
    p.add_argument(
        "--idle-heartbeat-interval",
        type=positive_float,
        metavar="S",
        help="how often a worker holding no runs renews it (default 10; 0 = every "
        "--heartbeat-interval): it renews before starting a run given to it then; a silent "
        "idle worker is shown offline after this plus --lease and --lease-margin",
    )
    p.add_argument(
        "--lease",
        type=positive_float,
        metavar="S",
        help="the lease on a worker's runs (default 4; on PostgreSQL 3 x --leader-lease + 2, to "
        "outlast a takeover): a worker that cannot renew it stops its runs; the runs of a dead "
        "or cut-off worker are retried after it plus --lease-margin",
    )
    p.add_argument(
        "--lease-margin",
        type=positive_float,
        metavar="S",
        help="wait this long after a lease ran out before retrying its runs (default 0.5)",
    )
    p.add_argument(
        "--leader-lease",
        type=positive_float,
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

    # worker
    worker = _group(commands, "worker", "enroll a worker, run a worker daemon, or revoke a worker")
    p = _leaf(
        worker,
        "enroll",
        cmd_worker_enroll,
        operator_cert=False,
        help="give this machine a worker identity with a bootstrap token",
        description="Pin the control plane's CA by its fingerprint, generate a key, trade the "
        "token and a CSR for a certificate, and store them in the state directory. --server is "
        "the public (enrollment) address printed by `taskrun token create`.",
    )
    p.add_argument(
        "--token", help="the bootstrap token (TASKRUN_TOKEN, which keeps it out of shell history)"
    )
    p.add_argument(
        "--ca-fingerprint",
        metavar="sha256:HEX",
        help="the CA fingerprint printed with the token (TASKRUN_CA_FINGERPRINT)",
    )
    p.add_argument(
        "--state-dir",
        help="where to keep the identity (TASKRUN_STATE_DIR; default $XDG_STATE_HOME/taskrun/"
        "worker, i.e. ~/.local/state/taskrun/worker, or $STATE_DIRECTORY under systemd, "
        "/var/lib/taskrun/worker with the unit in deploy/)",
    )
    p = _leaf(
        worker,
        "run",
        cmd_worker_run,
        operator_cert=False,
        help="connect to the control plane and run agents until SIGTERM",
    )
    p.add_argument("--id", dest="worker_id", help="worker id (TASKRUN_WORKER_ID, default worker-1)")
    p.add_argument("--agents", help="comma-separated agents to offer (TASKRUN_AGENTS; default all)")
    p.add_argument("--capacity", type=int, help="concurrent runs (TASKRUN_CAPACITY, default 4)")
    p.add_argument("--label", action="append", metavar="K=V", help="a worker label (repeat)")
    p.add_argument(
        "--cert", dest="worker_cert", help="default <certs-dir>/<id>.pem (TASKRUN_WORKER_CERT)"
    )
    p.add_argument(
        "--key", dest="worker_key", help="default <certs-dir>/<id>-key.pem (TASKRUN_WORKER_KEY)"
    )
    p.add_argument("--drain-timeout", type=positive_float, metavar="S")
    p.add_argument(
        "--metrics-listen",
        metavar="ADDR",
        help="serve Prometheus /metrics on host:port (TASKRUN_METRICS_LISTEN; default off)",
    )
    p.add_argument(
        "--state-dir",
        help="use the identity enrolled there (`taskrun worker enroll`): its worker id, CA, "
        "certificate and key, and its server unless --server is given (TASKRUN_STATE_DIR; "
        "default: the enrollment's default state directory, when it holds an identity and no "
        "--id, --cert or --key is given)",
    )
    p.add_argument(  # agents work in per-run directories, away from the keys
        "--workspace-root",
        metavar="DIR",
        help="where each run gets its own working directory (TASKRUN_WORKSPACE_ROOT; default "
        "~/.cache/taskrun/workspaces/<id>); must lie outside the state and certificate dirs",
    )
    p.add_argument(
        "--allow-cwd",
        action="append",
        metavar="DIR",
        help="a directory a task's input.cwd may name or lie inside (repeat; default none: "
        "a task giving input.cwd fails)",
    )
    p.add_argument(
        "--keep-workspaces",
        action="store_true",
        help="keep each run's working directory after the run (default: removed)",
    )
    p.add_argument(
        "--agent-sandbox",
        action="store_true",
        help="ask agents that can (claude_code) to sandbox the commands they run "
        "(needs bubblewrap: apt install bubblewrap socat)",
    )
    agent_flags.add_worker_flags(p)
    _add_revoke(worker)
    _add_workers_list_and_get(worker)  # `worker list` = `workers list`, `worker get` = ...

    task_cmd.register(commands)  # `taskrun task`

    # workers
    workers = _group(commands, "workers", "inspect workers")
    _add_workers_list_and_get(workers)
    p = _leaf(
        workers,
        "drain",
        cmd_workers_drain,
        help="stop giving a worker runs; it finishes what it has and exits",
    )
    p.add_argument("worker_id", metavar="ID")
    _add_output(p)
    _add_revoke(workers)

    schedule_cmd.register(commands)
    conversation_cmd.register(commands)  # `taskrun chat`, `taskrun conversation`
    events_cmd.register(commands)  # `taskrun events`, `taskrun tui`
    status_cmd.register(commands)  # `taskrun status`
    access_cmd.register(commands)  # `taskrun token`, `api-token`, `audit`
    webhook_cmd.register(commands)  # `taskrun webhook`
    workflow_cmd.register(commands)  # `taskrun workflow`, `inbox`, `approve`, `reject`
    maintenance_cmd.register(commands)  # `taskrun backup`, `taskrun completion`
    store_cmd.register(commands)  # `taskrun store copy`
    usage_cmd.register(commands)  # `taskrun usage`

    # dev
    p = _leaf(
        commands,
        "dev",
        cmd_dev,
        help="run a server and workers locally in one command",
        description="Create certificates if missing, start a server and N workers as child "
        "processes, and print how to talk to them. Ctrl-C stops workers, then the server.",
    )
    p.add_argument("--workers", type=int, default=2, help="number of workers (default 2)")
    p.add_argument("--agents", default="echo", help="agents to offer (default echo)")
    p.add_argument("--dir", default=".taskrun/dev", help="state directory (default .taskrun/dev)")
    p.add_argument(
        "--listen",
        default="127.0.0.1:50051",
        help="server address (default 127.0.0.1:50051; port 0 picks a free port)",
    )
    p.add_argument(
        "--store",
        help="sqlite:PATH, postgresql://... or memory (default sqlite:<dir>/taskrun.db)",
    )
    return parser


# --- resolving settings ----------------------------------------------------------------------


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def _arg(args: argparse.Namespace, name: str) -> Any:
    return getattr(args, name, None)


def operator_settings(args: argparse.Namespace) -> creds.OperatorSettings:
    return creds.resolve_settings(
        server=_arg(args, "server"),
        certs_dir=_arg(args, "certs_dir"),
        ca=_arg(args, "ca"),
        cert=_arg(args, "cert"),
        key=_arg(args, "key"),
        server_name=_arg(args, "server_name"),
        api_token=_arg(args, "api_token"),
    )


def certs_dir(args: argparse.Namespace) -> Path:
    return creds.resolve_certs_dir(_arg(args, "certs_dir"))


def log_level(args: argparse.Namespace) -> str:
    return _arg(args, "log_level") or _env("TASKRUN_LOG_LEVEL") or "info"


def log_json(args: argparse.Namespace, *, daemon: bool) -> bool:
    fmt = _arg(args, "log_format") or _env("TASKRUN_LOG_FORMAT")
    return fmt == "json" if fmt else daemon


def _setup_logging(args: argparse.Namespace, *, daemon: bool) -> None:
    from taskrun.logging import configure_logging

    configure_logging(json=log_json(args, daemon=daemon), level=log_level(args))


def _labels(items: list[str] | None, field: str) -> dict[str, str]:
    return parse_label_args(items or [], field)


def resolve_store(args: argparse.Namespace) -> str | None:
    """--store, --db (sqlite:PATH), TASKRUN_STORE, TASKRUN_DB, in that order; None = default."""
    from taskrun.controlplane.store import POSTGRES_SCHEMES

    store, db = _arg(args, "store"), _arg(args, "db")
    if store and db:
        raise CliError("give either --store or --db, not both")
    value = store or (f"sqlite:{db}" if db else None)
    if value is None:
        value = _env("TASKRUN_STORE") or (
            f"sqlite:{_env('TASKRUN_DB')}" if _env("TASKRUN_DB") else None
        )
    if (
        value is not None
        and value != "memory"
        and not (value.startswith("sqlite:") and len(value) > len("sqlite:"))
        and not (value.startswith(POSTGRES_SCHEMES) and not value.endswith("://"))
    ):
        raise CliError(
            f"store {value!r} must be sqlite:PATH, postgresql://USER@HOST:PORT/DBNAME or memory"
        )
    return value


# --- commands --------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Client:
    return Client.from_settings(operator_settings(args))


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _now() -> datetime:
    return datetime.now(UTC)


def cmd_certs_init(args: argparse.Namespace) -> int:
    from taskrun.controlplane.pki import PkiPaths, ca_fingerprint, init_pki

    directory = Path(args.dir) if args.dir else certs_dir(args)
    workers = tuple(args.worker) if args.worker else ("worker-1", "worker-2")
    hosts = tuple(args.host) if args.host else ("localhost", "127.0.0.1")
    planned = PkiPaths.at(directory)
    try:
        files = [
            planned.ca_cert,
            planned.ca_key,
            planned.server_cert,
            planned.server_key,
            planned.operator_cert,
            planned.operator_key,
        ]
        for worker_id in workers:
            files += [planned.worker_cert(worker_id), planned.worker_key(worker_id)]
        before = {f: f.stat().st_mtime_ns if f.exists() else None for f in files}
        paths = init_pki(
            directory, workers=workers, operator=args.operator, server_hosts=hosts, force=args.force
        )
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from None
    lines = []
    for f in files:
        now = f.stat().st_mtime_ns if f.exists() else None
        state = "kept" if before[f] is not None and before[f] == now else "wrote"
        lines.append(f"{state:5}  {f}\n")
    fingerprint = ca_fingerprint(paths.ca_cert.read_bytes())
    _write("".join(lines) + f"CA fingerprint: {fingerprint}\n")
    return EXIT_OK


def cmd_certs_worker(args: argparse.Namespace) -> int:
    from taskrun.controlplane.pki import issue_worker_cert

    directory = Path(args.dir) if args.dir else certs_dir(args)
    try:
        cert, key = issue_worker_cert(directory, args.worker_id)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    except FileNotFoundError:
        raise CliError(
            f"no CA in {directory}: create one with `taskrun certs init --dir {directory}`"
        ) from None
    _write(f"wrote  {cert}\nwrote  {key}\n")
    return EXIT_OK


def cmd_certs_server(args: argparse.Namespace) -> int:
    from taskrun.controlplane.pki import issue_server_cert

    directory = Path(args.dir) if args.dir else certs_dir(args)
    hosts = tuple(args.host) if args.host else ("localhost", "127.0.0.1")
    try:
        cert, key = issue_server_cert(directory, hosts)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    except FileNotFoundError:
        raise CliError(
            f"no CA in {directory}: create one with `taskrun certs init --dir {directory}`"
        ) from None
    _write(
        f"wrote  {key}\nwrote  {cert}\n"
        "a running control plane serves it on new connections; live streams keep the old one\n"
    )
    return EXIT_OK


def _require_files(*paths: tuple[Path, str], hint: str = "") -> None:
    for path, what in paths:
        if not path.exists():
            raise CliError(
                f"{what} {path} does not exist: create the certificates with "
                f"`taskrun certs init` or point --certs-dir (TASKRUN_CERTS_DIR) at them{hint}"
            )


def server_config(args: argparse.Namespace) -> Any:
    """The ServerConfig described by flags, TASKRUN_* variables and defaults."""
    from pydantic import ValidationError

    from taskrun.controlplane.config import ServerConfig

    directory = certs_dir(args)
    values: dict[str, Any] = {
        "ca_cert": creds.resolve_ca(_arg(args, "ca"), directory),
        "server_cert": Path(
            _arg(args, "server_cert") or _env("TASKRUN_SERVER_CERT") or directory / "server.pem"
        ),
        "server_key": Path(
            _arg(args, "server_key") or _env("TASKRUN_SERVER_KEY") or directory / "server-key.pem"
        ),
        "ca_key": Path(_arg(args, "ca_key") or _env("TASKRUN_CA_KEY") or directory / "ca-key.pem"),
    }
    listen = _arg(args, "listen") or _env("TASKRUN_LISTEN")
    public = _arg(args, "public_listen")
    if public is None:
        public = os.environ.get("TASKRUN_PUBLIC_LISTEN")  # set but empty disables it
    optional = {
        "listen": listen,
        "public_listen": public,
        "public_operator_api": _public_api(args),
        "worker_cert_lifetime": _arg(args, "worker_cert_lifetime"),
        "operator_cert_lifetime": _arg(args, "operator_cert_lifetime"),
        "store": resolve_store(args),
        "heartbeat_interval": _arg(args, "heartbeat_interval"),
        "idle_heartbeat_interval": _arg(args, "idle_heartbeat_interval"),
        "lease_duration": _arg(args, "lease"),
        "lease_margin": _arg(args, "lease_margin"),
        "leader_lease": _arg(args, "leader_lease") or _env("TASKRUN_LEADER_LEASE"),
        "advertise": _arg(args, "advertise") or _env("TASKRUN_ADVERTISE"),
        "metrics_listen": _metrics_listen(args, DEFAULT_METRICS_LISTEN),
        "metrics_optional": _metrics_listen(args, "") == "",
        "http_listen": _arg(args, "http_listen") or _env("TASKRUN_HTTP_LISTEN"),
        "ready_file": _arg(args, "ready_file") or _env("TASKRUN_READY_FILE"),
        "mcp_url": _arg(args, "mcp_url") or _env("TASKRUN_MCP_URL"),
        "max_subtask_depth": _arg(args, "max_subtask_depth"),
        "webhook_allow_networks": _arg(args, "webhook_allow_network")
        or [
            n.strip()
            for n in (_env("TASKRUN_WEBHOOK_ALLOW_NETWORKS") or "").split(",")
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
        raise CliError(_validation_message(exc)) from None


DEFAULT_METRICS_LISTEN = "127.0.0.1:9464"


def _public_api(args: argparse.Namespace) -> bool | None:
    """--no-public-api, else TASKRUN_PUBLIC_API (0/false/no turns it off), else the default."""
    flag = _arg(args, "public_operator_api")
    if flag is not None:
        return bool(flag)
    value = _env("TASKRUN_PUBLIC_API")
    if value is None:
        return None
    return value.strip().lower() not in {"0", "false", "no", "off"}


def _metrics_listen(args: argparse.Namespace, default: str) -> str:
    """--metrics-listen, else TASKRUN_METRICS_LISTEN (set but empty disables), else default."""
    flag = _arg(args, "metrics_listen")
    if flag is not None:
        return str(flag)
    return os.environ.get("TASKRUN_METRICS_LISTEN", default)


def _validation_message(exc: Any) -> str:
    parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
    return "; ".join(parts)


def cmd_server(args: argparse.Namespace) -> int:
    config = server_config(args)
    _require_files(
        (config.ca_cert, "CA certificate"),
        (config.server_cert, "server certificate"),
        (config.server_key, "server key"),
    )
    _setup_logging(args, daemon=True)
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


def worker_config(args: argparse.Namespace) -> Any:
    """The WorkerConfig described by flags, TASKRUN_* variables and defaults."""
    from pydantic import ValidationError

    from taskrun.worker.config import WorkerConfig

    directory = certs_dir(args)
    server = creds.resolve_server(_arg(args, "server"))
    worker_id = _arg(args, "worker_id") or _env("TASKRUN_WORKER_ID") or "worker-1"
    agents_text = _arg(args, "agents") or _env("TASKRUN_AGENTS") or ""
    capacity = _arg(args, "capacity") or _env("TASKRUN_CAPACITY")
    cert = _arg(args, "worker_cert") or _env("TASKRUN_WORKER_CERT")
    key = _arg(args, "worker_key") or _env("TASKRUN_WORKER_KEY")
    values: dict[str, Any] = {
        "server": server,
        "worker_id": worker_id,
        "agents": [a.strip() for a in agents_text.split(",") if a.strip()],
        "labels": _labels(_arg(args, "label"), "labels"),
        "ca_cert": creds.resolve_ca(_arg(args, "ca"), directory),
        "cert": Path(cert) if cert else directory / f"{worker_id}.pem",
        "key": Path(key) if key else directory / f"{worker_id}-key.pem",
        "server_name": creds.resolve_server_name(_arg(args, "server_name"), server) or "",
    }
    if capacity is not None:
        values["capacity"] = capacity
    values["metrics_listen"] = _metrics_listen(args, "")
    drain = _arg(args, "drain_timeout")
    if drain is not None:
        values["drain_timeout"] = drain
    workspace_root = _arg(args, "workspace_root") or _env("TASKRUN_WORKSPACE_ROOT")
    if workspace_root:
        values["workspace_root"] = Path(workspace_root)
    values["allow_cwd"] = [Path(d) for d in _arg(args, "allow_cwd") or []]
    values["keep_workspaces"] = bool(_arg(args, "keep_workspaces"))
    values["agent_sandbox"] = bool(_arg(args, "agent_sandbox"))
    values.update(agent_flags.worker_values(args))
    state_dir = _arg(args, "state_dir") or _env("TASKRUN_STATE_DIR")
    if not state_dir and not (cert or key or _arg(args, "worker_id") or _env("TASKRUN_WORKER_ID")):
        from taskrun.worker.identity import default_state_dir

        default = default_state_dir()
        if (default / "identity.json").exists():  # enrolled on this machine: use that identity
            state_dir = str(default)
    if state_dir:
        # The enrolled identity supplies these; only what is given explicitly overrides it.
        values["state_dir"] = Path(state_dir)
        for name in ("ca_cert", "cert", "key"):
            del values[name]
        explicit = {
            "worker_id": _arg(args, "worker_id") or _env("TASKRUN_WORKER_ID"),
            "server": _arg(args, "server") or _env(creds.ENV_SERVER),
            "server_name": _arg(args, "server_name") or _env(creds.ENV_SERVER_NAME),
        }
        for name, given in explicit.items():
            if not given:
                del values[name]
    try:
        return WorkerConfig(**values).with_identity()
    except ValidationError as exc:
        raise CliError(_validation_message(exc)) from None
    except ValueError as exc:  # the state directory holds no (matching) identity
        raise CliError(str(exc)) from None


def cmd_worker_run(args: argparse.Namespace) -> int:
    from taskrun.worker.identity import default_state_dir

    config = worker_config(args)
    looked = (
        ""
        if config.state_dir is not None
        else f"; no enrolled identity in {default_state_dir()} either (the default state "
        "directory; --state-dir or TASKRUN_STATE_DIR picks another)"
    )
    _require_files(
        (config.ca_cert, "CA certificate"),
        (config.cert_path(), "worker certificate"),
        (config.key_path(), "worker key"),
        hint=f"{looked}; on a new machine, enroll it first: `taskrun worker enroll --server "
        "HOST:PORT --token TOKEN --ca-fingerprint sha256:…` (see `taskrun token create`)",
    )
    try:
        config.workspaces()  # refuse a workspace root among the keys, before starting
    except (ValueError, OSError) as exc:
        raise CliError(str(exc)) from None
    _setup_logging(args, daemon=True)
    agent_flags.apply_worker_models(args)
    from taskrun.worker.daemon import run_worker

    code: int = asyncio.run(run_worker(config))
    return code


def cmd_worker_enroll(args: argparse.Namespace) -> int:
    from taskrun.worker.identity import (
        EnrollmentError,
        ServerUnreachable,
        default_state_dir,
        enroll,
    )

    server = _arg(args, "server")
    token = args.token or _env("TASKRUN_TOKEN")
    fingerprint = args.ca_fingerprint or _env("TASKRUN_CA_FINGERPRINT")
    if not server:
        raise CliError(
            "give --server HOST:PORT: the control plane's public (enrollment) address, as "
            "printed by `taskrun token create`"
        )
    if not token:
        raise CliError("give the bootstrap token with --token or TASKRUN_TOKEN")
    if not fingerprint:
        raise CliError("give --ca-fingerprint sha256:… (printed by `taskrun token create`)")
    state_dir = Path(args.state_dir or _env("TASKRUN_STATE_DIR") or default_state_dir())
    server_name = _arg(args, "server_name") or _env(creds.ENV_SERVER_NAME) or ""
    try:
        enrolled = asyncio.run(
            enroll(server, token, fingerprint, state_dir, server_name=server_name)
        )
    except ServerUnreachable as exc:
        raise CliError(str(exc), EXIT_UNAVAILABLE) from None
    except (EnrollmentError, ValueError) as exc:
        raise CliError(str(exc)) from None
    identity = enrolled.identity
    labels = ",".join(f"{k}={v}" for k, v in sorted(enrolled.labels.items()))
    _write(
        f"enrolled as worker {identity.worker_id}\n"
        f"certificate expires {enrolled.expires_at.isoformat()} (renewed automatically)\n"
        f"identity stored in {enrolled.paths.directory}\n"
        + (f"labels {labels}\n" if labels else "")
        + f"start the worker with: taskrun worker run --state-dir {enrolled.paths.directory}\n"
    )
    return EXIT_OK


def _one_call(args: argparse.Namespace, call: Callable[[Client], Awaitable[T]]) -> T:
    """Open a client from the flags, make one call, close it."""
    client = _client(args)

    async def run() -> T:
        async with client:
            return await call(client)

    return asyncio.run(run())


def cmd_workers_list(args: argparse.Namespace) -> int:
    client = _client(args)
    statuses = flatten(args.status)

    async def run() -> list[Any]:
        async with client:
            return await client.list_workers(statuses)

    workers = asyncio.run(run())
    if args.output == "json":
        _write(output.dumps({"workers": [output.worker_doc(w, r) for w, r in workers]}))
    elif workers:
        _write(output.workers_table(workers, _now()))
    else:
        sys.stderr.write("no workers\n")
    return EXIT_OK


def cmd_workers_get(args: argparse.Namespace) -> int:
    worker, runs = _one_call(args, lambda c: c.get_worker(args.worker_id))
    if args.output == "json":
        _write(output.dumps(output.worker_doc(worker, runs)))
    else:
        _write(output.worker_detail(worker, runs, _now()))
    return EXIT_OK


def cmd_workers_drain(args: argparse.Namespace) -> int:
    worker = _one_call(args, lambda c: c.drain_worker(args.worker_id))
    if args.output == "json":
        _write(output.dumps(output.to_json_value(worker)))
    else:
        _write(f"worker {worker.id} {output.status_name(worker.status)}\n")
    return EXIT_OK


def cmd_workers_revoke(args: argparse.Namespace) -> int:
    worker = _one_call(args, lambda c: c.revoke_worker(args.worker_id, args.reason))
    if args.output == "json":
        _write(output.dumps(output.to_json_value(worker)))
    else:
        _write(f"worker {worker.id} {output.status_name(worker.status)}: {worker.revoked_reason}\n")
    return EXIT_OK


def cmd_dev(args: argparse.Namespace) -> int:
    from taskrun.cli.dev import DevOptions, guard_output, run_dev

    if args.workers < 1:
        raise CliError("--workers must be at least 1")
    options = DevOptions(
        directory=Path(args.dir),
        workers=args.workers,
        agents=args.agents,
        listen=args.listen,
        store=args.store,
        log_level=log_level(args),
    )
    guard_output()  # a broken pipe on our output stops the children in order (before logging)
    _setup_logging(args, daemon=False)
    return run_dev(options)


# --- entry point -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run one `taskrun` command and return its exit status."""
    if os.environ.get("TASKRUN_DEV_PARENT_PID"):  # a server or worker started by `taskrun dev`
        from taskrun.cli.dev import die_with_parent

        die_with_parent()
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    for stream in (sys.stdout, sys.stderr):  # stored text that is not UTF-8 never crashes output
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    try:
        return func(args)
    except CliError as exc:
        sys.stderr.write(f"error: {exc.message}\n")
        return exc.code
    except TaskRunError as exc:  # local validation, before anything was sent
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_USAGE
    except creds.MissingCredentials as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_USAGE
    except grpc.aio.AioRpcError as exc:
        server = _arg(args, "server") or creds.resolve_server(None)
        sys.stderr.write(describe_rpc_error(exc, server) + "\n")
        return exit_code_for_status(exc.code())
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`taskrun task logs X | head`): stop quietly.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
