"""`taskrun`: the command line of TaskRun (certificates, server, worker, tasks, workers, dev).

Every global flag has a TASKRUN_* environment fallback; flags win over the environment.
Exit codes: 0 success; 1 a followed task FAILED or an unexpected server error; 2 a usage,
validation, not-found, precondition or permission error; 3 the server is unreachable;
130 a followed task was CANCELLED, or Ctrl-C.

The parser, the global settings and flags, the helpers the command modules share (through
`running.main_module`, whichever copy of this module runs) and the certificate and dev commands;
every other command group has its own module (server_cmd, worker_cmd, task_cmd, schedule_cmd,
access_cmd, ...), and the exit codes and errors are in exits.
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
from typing import Any, Final, TypeVar

import grpc

from taskrun import __version__
from taskrun.cli import (
    access_cmd,
    conversation_cmd,
    events_cmd,
    maintenance_cmd,
    schedule_cmd,
    server_cmd,
    status_cmd,
    store_cmd,
    task_cmd,
    usage_cmd,
    webhook_cmd,
    worker_cmd,
    workflow_cmd,
)
from taskrun.cli import credentials as creds
from taskrun.cli.client import Client
from taskrun.cli.exits import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    FOLLOW_EXIT_HELP,
    CliError,
    describe_rpc_error,
    exit_code_for_status,
)
from taskrun.core.errors import TaskRunError
from taskrun.core.models import DEFAULT_MAX_ATTEMPTS
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


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `taskrun` parser. Given the command line, it has only the commands that line names,
    all of them when it names none (a mistyped command) or asks for help (`taskrun -h task`
    lists every command).

    The whole CLI is about 75 parsers and 900 options; argparse takes 30-50 ms to build them
    (measured; much of it gettext looking for translations of each parser's help strings),
    on every start of every command. Parsing is the same either way: every word on the line
    that is a command gets its command's module registered, so a value that happens to be
    a command's name only costs that command's parsers."""
    parser = argparse.ArgumentParser(
        prog="taskrun",
        description="TaskRun: run AI agents as Tasks on remote Workers.",
        epilog="Start everything locally with `taskrun dev`. " + FOLLOW_EXIT_HELP,
    )
    parser.add_argument("--version", action="version", version=f"taskrun {__version__}")
    _add_global_options(parser, top=True)
    parser.set_defaults(func=lambda _args: _usage(parser))
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    words = set(argv or ())
    asks_help = bool(words.intersection(("-h", "--help")))
    named = [] if asks_help else [r for names, r in COMMANDS if words.intersection(names)]
    for register in named or [register for _names, register in COMMANDS]:
        register(commands)
    return parser


def _register_certs(commands: Any) -> None:
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


def _register_dev(commands: Any) -> None:
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


# The top-level commands, each with the function that registers it (and the other commands of its
# module), in the order `taskrun --help` lists them. A unit test checks the names against what
# each function registers.
COMMANDS: Final[tuple[tuple[tuple[str, ...], Callable[[Any], None]], ...]] = (
    (("certs",), _register_certs),
    (("server",), server_cmd.register),
    (("worker",), worker_cmd.register),
    (("task",), task_cmd.register),
    (("workers",), worker_cmd.register_workers),
    (("schedule",), schedule_cmd.register),
    (("chat", "conversation"), conversation_cmd.register),
    (("events", "tui"), events_cmd.register),
    (("status",), status_cmd.register),
    (("token", "api-token", "login", "audit"), access_cmd.register),
    (("webhook",), webhook_cmd.register),
    (("workflow", "inbox", "approve", "reject"), workflow_cmd.register),
    (("backup", "completion"), maintenance_cmd.register),
    (("store",), store_cmd.register),
    (("usage",), usage_cmd.register),
    (("dev",), _register_dev),
)


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


def _one_call(args: argparse.Namespace, call: Callable[[Client], Awaitable[T]]) -> T:
    """Open a client from the flags, make one call, close it."""
    client = _client(args)

    async def run() -> T:
        async with client:
            return await call(client)

    return asyncio.run(run())


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
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
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
