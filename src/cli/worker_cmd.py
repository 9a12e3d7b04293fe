"""`taskrun worker` (enroll, run the daemon, revoke) and `taskrun workers` (list, get, drain,
revoke); `worker list|get` are spellings of `workers list|get`.

`register(subparsers)` and `register_workers(subparsers)` add them to the `taskrun` parser
(src/cli/main.py) with main's helpers and connection flags.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from taskrun.cli import agent_flags, output
from taskrun.cli import credentials as creds
from taskrun.cli.exits import EXIT_OK, EXIT_UNAVAILABLE, CliError
from taskrun.cli.running import main_module as _cli
from taskrun.cli.server_cmd import metrics_listen, validation_message
from taskrun.core.status import WorkerStatus


def register(commands: Any) -> None:
    cli = _cli()
    worker = cli._group(
        commands, "worker", "enroll a worker, run a worker daemon, or revoke a worker"
    )
    p = cli._leaf(
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
    p = cli._leaf(
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
    p.add_argument("--drain-timeout", type=cli.positive_float, metavar="S")
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


def register_workers(commands: Any) -> None:
    cli = _cli()
    workers = cli._group(commands, "workers", "inspect workers")
    _add_workers_list_and_get(workers)
    p = cli._leaf(
        workers,
        "drain",
        cmd_workers_drain,
        help="stop giving a worker runs; it finishes what it has and exits",
    )
    p.add_argument("worker_id", metavar="ID")
    cli._add_output(p)
    _add_revoke(workers)


def _add_revoke(subparsers: Any) -> None:
    """`worker revoke` (the spelling of the security docs) and `workers revoke`."""
    cli = _cli()
    p = cli._leaf(
        subparsers,
        "revoke",
        cmd_workers_revoke,
        help="cut a worker off at once and for good; its runs are retried elsewhere",
    )
    p.add_argument("worker_id", metavar="ID")
    p.add_argument("--reason", default="", help="recorded with the revocation")
    cli._add_output(p)


def _add_workers_list_and_get(subparsers: Any) -> None:
    """`workers list|get`, also spelled `worker list|get`."""
    cli = _cli()
    p = cli._leaf(subparsers, "list", cmd_workers_list, help="list workers")
    p.add_argument(
        "--status",
        action="append",
        type=cli.enum_arg(WorkerStatus),
        metavar="S",
        help="online, draining, offline, revoked (repeat or comma-separate)",
    )
    cli._add_output(p)
    p = cli._leaf(subparsers, "get", cmd_workers_get, help="show a worker with its agents")
    p.add_argument("worker_id", metavar="ID")
    cli._add_output(p)


def worker_config(args: argparse.Namespace) -> Any:
    """The WorkerConfig described by flags, TASKRUN_* variables and defaults."""
    from pydantic import ValidationError

    from taskrun.worker.config import WorkerConfig

    cli = _cli()
    directory = cli.certs_dir(args)
    server = creds.resolve_server(cli._arg(args, "server"))
    worker_id = cli._arg(args, "worker_id") or cli._env("TASKRUN_WORKER_ID") or "worker-1"
    agents_text = cli._arg(args, "agents") or cli._env("TASKRUN_AGENTS") or ""
    capacity = cli._arg(args, "capacity") or cli._env("TASKRUN_CAPACITY")
    cert = cli._arg(args, "worker_cert") or cli._env("TASKRUN_WORKER_CERT")
    key = cli._arg(args, "worker_key") or cli._env("TASKRUN_WORKER_KEY")
    values: dict[str, Any] = {
        "server": server,
        "worker_id": worker_id,
        "agents": [a.strip() for a in agents_text.split(",") if a.strip()],
        "labels": cli._labels(cli._arg(args, "label"), "labels"),
        "ca_cert": creds.resolve_ca(cli._arg(args, "ca"), directory),
        "cert": Path(cert) if cert else directory / f"{worker_id}.pem",
        "key": Path(key) if key else directory / f"{worker_id}-key.pem",
        "server_name": creds.resolve_server_name(cli._arg(args, "server_name"), server) or "",
    }
    if capacity is not None:
        values["capacity"] = capacity
    values["metrics_listen"] = metrics_listen(args, "")
    drain = cli._arg(args, "drain_timeout")
    if drain is not None:
        values["drain_timeout"] = drain
    workspace_root = cli._arg(args, "workspace_root") or cli._env("TASKRUN_WORKSPACE_ROOT")
    if workspace_root:
        values["workspace_root"] = Path(workspace_root)
    values["allow_cwd"] = [Path(d) for d in cli._arg(args, "allow_cwd") or []]
    values["keep_workspaces"] = bool(cli._arg(args, "keep_workspaces"))
    values["agent_sandbox"] = bool(cli._arg(args, "agent_sandbox"))
    values.update(agent_flags.worker_values(args))
    state_dir = cli._arg(args, "state_dir") or cli._env("TASKRUN_STATE_DIR")
    if not state_dir and not (
        cert or key or cli._arg(args, "worker_id") or cli._env("TASKRUN_WORKER_ID")
    ):
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
            "worker_id": cli._arg(args, "worker_id") or cli._env("TASKRUN_WORKER_ID"),
            "server": cli._arg(args, "server") or cli._env(creds.ENV_SERVER),
            "server_name": cli._arg(args, "server_name") or cli._env(creds.ENV_SERVER_NAME),
        }
        for name, given in explicit.items():
            if not given:
                del values[name]
    try:
        return WorkerConfig(**values).with_identity()
    except ValidationError as exc:
        raise CliError(validation_message(exc)) from None
    except ValueError as exc:  # the state directory holds no (matching) identity
        raise CliError(str(exc)) from None


def cmd_worker_run(args: argparse.Namespace) -> int:
    from taskrun.worker.identity import default_state_dir

    cli = _cli()
    config = worker_config(args)
    looked = (
        ""
        if config.state_dir is not None
        else f"; no enrolled identity in {default_state_dir()} either (the default state "
        "directory; --state-dir or TASKRUN_STATE_DIR picks another)"
    )
    cli._require_files(
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
    cli._setup_logging(args, daemon=True)
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

    cli = _cli()
    server = cli._arg(args, "server")
    token = args.token or cli._env("TASKRUN_TOKEN")
    fingerprint = args.ca_fingerprint or cli._env("TASKRUN_CA_FINGERPRINT")
    if not server:
        raise CliError(
            "give --server HOST:PORT: the control plane's public (enrollment) address, as "
            "printed by `taskrun token create`"
        )
    if not token:
        raise CliError("give the bootstrap token with --token or TASKRUN_TOKEN")
    if not fingerprint:
        raise CliError("give --ca-fingerprint sha256:… (printed by `taskrun token create`)")
    state_dir = Path(args.state_dir or cli._env("TASKRUN_STATE_DIR") or default_state_dir())
    server_name = cli._arg(args, "server_name") or cli._env(creds.ENV_SERVER_NAME) or ""
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
    cli._write(
        f"enrolled as worker {identity.worker_id}\n"
        f"certificate expires {enrolled.expires_at.isoformat()} (renewed automatically)\n"
        f"identity stored in {enrolled.paths.directory}\n"
        + (f"labels {labels}\n" if labels else "")
        + f"start the worker with: taskrun worker run --state-dir {enrolled.paths.directory}\n"
    )
    return EXIT_OK


def cmd_workers_list(args: argparse.Namespace) -> int:
    cli = _cli()
    statuses = cli.flatten(args.status)
    workers: list[Any] = cli._one_call(args, lambda c: c.list_workers(statuses))
    if args.output == "json":
        cli._write(output.dumps({"workers": [output.worker_doc(w, r) for w, r in workers]}))
    elif workers:
        cli._write(output.workers_table(workers, cli._now()))
    else:
        sys.stderr.write("no workers\n")
    return EXIT_OK


def cmd_workers_get(args: argparse.Namespace) -> int:
    cli = _cli()
    worker, runs = cli._one_call(args, lambda c: c.get_worker(args.worker_id))
    if args.output == "json":
        cli._write(output.dumps(output.worker_doc(worker, runs)))
    else:
        cli._write(output.worker_detail(worker, runs, cli._now()))
    return EXIT_OK


def cmd_workers_drain(args: argparse.Namespace) -> int:
    cli = _cli()
    worker = cli._one_call(args, lambda c: c.drain_worker(args.worker_id))
    if args.output == "json":
        cli._write(output.dumps(output.to_json_value(worker)))
    else:
        cli._write(f"worker {worker.id} {output.status_name(worker.status)}\n")
    return EXIT_OK


def cmd_workers_revoke(args: argparse.Namespace) -> int:
    cli = _cli()
    worker = cli._one_call(args, lambda c: c.revoke_worker(args.worker_id, args.reason))
    if args.output == "json":
        cli._write(output.dumps(output.to_json_value(worker)))
    else:
        cli._write(
            f"worker {worker.id} {output.status_name(worker.status)}: {worker.revoked_reason}\n"
        )
    return EXIT_OK
