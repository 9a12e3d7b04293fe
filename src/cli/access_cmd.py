"""`taskrun token` (bootstrap tokens), `taskrun api-token` (bearer tokens) and `taskrun audit`.

`register(subparsers)` adds them to the `taskrun` parser (src/cli/main.py); they reuse main's
connection flags and client. Every command needs the `admin` scope.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from taskrun.cli import output
from taskrun.cli.client import ApiTokenInfo, BootstrapTokenInfo, Client
from taskrun.cli.credentials import target_host
from taskrun.cli.running import main_module as _cli
from taskrun.core.access import AuditEvent, AuditKind, Scope, TokenState
from taskrun.core.durations import human_duration
from taskrun.files import private_directory, write_atomic

T = TypeVar("T")
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """`90`, `90s`, `30m`, `1h`, `7d` → seconds."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (a number with s, m, h or d, e.g. 1h)"
        )
    return float(match.group(1)) * _UNITS[match.group(2)]


def _one_of(allowed: Sequence[str], what: str) -> Callable[[str], list[str]]:
    """An argparse type: comma-separated names, each one of `allowed`."""

    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",")]
        for name in names:
            if name not in allowed:
                raise argparse.ArgumentTypeError(
                    f"unknown {what} {name!r} (one of {', '.join(allowed)})"
                )
        return names

    return parse


_scopes = _one_of([s.value for s in Scope], "scope")
_kinds = _one_of([k.value for k in AuditKind], "kind")


def register(subparsers: Any) -> None:
    cli = _cli()
    token = cli._group(subparsers, "token", "bootstrap tokens: how a new worker enrolls")
    p = cli._leaf(
        token,
        "create",
        cmd_token_create,
        help="create a single-use enrollment token and print the enroll command",
        description="Create a bootstrap token bound to a worker id (and labels). It is shown "
        "once, with the CA fingerprint and the exact `taskrun worker enroll` command to run on "
        "the new machine. The token works once, until its TTL ends.",
    )
    p.add_argument(
        "--ttl", type=parse_duration, default=0.0, help="lifetime, e.g. 30m or 1h (default 1h)"
    )
    p.add_argument("--worker-id", default="", metavar="NAME", help="identity it produces")
    p.add_argument(
        "--label", action="append", metavar="k=v", help="labels bound to the worker (repeat)"
    )
    cli._add_output(p)
    p = cli._leaf(token, "list", cmd_token_list, help="bootstrap tokens (active ones by default)")
    p.add_argument("--all", action="store_true", help="also used, expired and revoked tokens")
    cli._add_output(p)
    p = cli._leaf(token, "revoke", cmd_token_revoke, help="make an unused token unusable")
    p.add_argument("token_id", metavar="TOKEN_ID")
    cli._add_output(p)

    api = cli._group(subparsers, "api-token", "bearer tokens with scopes, for programs")
    p = cli._leaf(
        api,
        "create",
        cmd_api_token_create,
        help="create an API token (shown once)",
        description="Create a bearer token for a program. Scopes: read (get, list, follow, "
        "watch), submit (also create, cancel and continue tasks, manage schedules), admin "
        "(everything, including workers and tokens). Use it with TASKRUN_API_TOKEN or "
        "--api-token, against the public listener (no client certificate needed).",
    )
    p.add_argument("name", help="what it is for, e.g. ci")
    p.add_argument(
        "--scope",
        action="append",
        type=_scopes,
        required=True,
        metavar="SCOPE",
        help="read, submit or admin (repeat or comma-separate)",
    )
    p.add_argument(
        "--ttl", type=parse_duration, default=0.0, help="lifetime, e.g. 30d (default: none)"
    )
    cli._add_output(p)
    p = cli._leaf(api, "list", cmd_api_token_list, help="API tokens (active ones by default)")
    p.add_argument("--all", action="store_true", help="also expired and revoked tokens")
    cli._add_output(p)
    p = cli._leaf(api, "revoke", cmd_api_token_revoke, help="refuse an API token from now on")
    p.add_argument("token_id", metavar="TOKEN_ID")
    cli._add_output(p)

    p = cli._leaf(
        subparsers,
        "login",
        cmd_login,
        help="trade an admin API token for a short-lived operator certificate",
        description="Make a new key, and trade the admin API token (--api-token or "
        "TASKRUN_API_TOKEN) for an operator client certificate bound to it: valid 12 h by "
        "default (at most 24 h, never past the token), refused at once when the token is "
        "revoked (`taskrun api-token revoke`). Writes ca.pem, operator.pem and operator-key.pem "
        "(0600) to --out (default ~/.config/taskrun); use them with --certs-dir.",
    )
    p.add_argument(
        "--ttl", type=parse_duration, default=0.0, help="lifetime, e.g. 8h (default 12h)"
    )
    p.add_argument("--out", metavar="DIR", help="where to write (default ~/.config/taskrun)")
    cli._add_output(p)

    p = cli._leaf(
        subparsers,
        "audit",
        cmd_audit,
        help="security events: enrollments, renewals, revocations, refusals (newest first)",
    )
    p.add_argument("--limit", type=int, default=50, help="how many (default 50, at most 1000)")
    p.add_argument("--before", type=int, default=0, metavar="ID", help="older than this event")
    p.add_argument(
        "--kind", action="append", type=_kinds, metavar="K", help="only these kinds (repeat)"
    )
    cli._add_output(p)


# --- documents and tables ----------------------------------------------------------------------


def _time(value: datetime | None) -> str | None:
    return output.format_time(value) if value else None


def bootstrap_doc(t: BootstrapTokenInfo) -> dict[str, Any]:
    return {
        "token_id": t.token_id,
        "worker_id": t.worker_id,
        "labels": t.labels,
        "state": t.state.name.lower(),
        "created_at": _time(t.created_at),
        "expires_at": _time(t.expires_at),
        "used_at": _time(t.used_at),
        "used_by_host": t.used_by_host,
        "revoked_at": _time(t.revoked_at),
        "created_by": t.created_by,
    }


def api_doc(t: ApiTokenInfo) -> dict[str, Any]:
    return {
        "token_id": t.token_id,
        "name": t.name,
        "scopes": list(t.scopes),
        "state": t.state.name.lower(),
        "created_at": _time(t.created_at),
        "expires_at": _time(t.expires_at),
        "revoked_at": _time(t.revoked_at),
        "created_by": t.created_by,
    }


def audit_doc(e: AuditEvent) -> dict[str, Any]:
    return {
        "id": e.id,
        "time": _time(e.time),
        "kind": e.kind.value,
        "principal": e.principal,
        "subject": e.subject,
        "peer": e.peer,
        "detail": e.detail,
    }


def _bootstrap_table(tokens: Sequence[BootstrapTokenInfo], now: datetime) -> str:
    rows = [
        (
            t.token_id,
            t.worker_id,
            t.state.name.lower(),
            output.format_expiry(t.expires_at, now),
            output.format_labels(t.labels),
            _used_by(t),
        )
        for t in tokens
    ]
    return output.render_table(
        ("TOKEN ID", "WORKER", "STATE", "EXPIRES", "LABELS", "USED BY"), rows
    )


def _used_by(t: BootstrapTokenInfo) -> str:
    """Who used the token; for one consumed after it expired, who presented it (refused)."""
    if t.state is TokenState.EXPIRED and t.used_by_host:
        return f"expired, presented by {t.used_by_host}"
    return t.used_by_host


def _api_table(tokens: Sequence[ApiTokenInfo], now: datetime) -> str:
    rows = [
        (
            t.token_id,
            t.name,
            ",".join(t.scopes),
            t.state.name.lower(),
            output.format_expiry(t.expires_at, now) if t.expires_at else "never",
            t.created_by,
        )
        for t in tokens
    ]
    return output.render_table(("TOKEN ID", "NAME", "SCOPES", "STATE", "EXPIRES", "BY"), rows)


def _audit_table(events: Sequence[AuditEvent]) -> str:
    rows = [
        (str(e.id), output.format_time(e.time), e.kind.value, e.principal, e.subject, e.detail)
        for e in events
    ]
    return output.render_table(("ID", "TIME", "KIND", "WHO", "SUBJECT", "DETAIL"), rows)


# --- commands ----------------------------------------------------------------------------------


def cmd_token_create(args: argparse.Namespace) -> int:
    cli = _cli()
    labels = cli._labels(args.label, "labels")
    settings = cli.operator_settings(args)
    new = cli._one_call(
        args,
        lambda c: c.create_bootstrap_token(ttl=args.ttl, worker_id=args.worker_id, labels=labels),
    )
    host = target_host(settings.server)
    host = f"[{host}]" if ":" in host else host
    command = (
        f"taskrun worker enroll --server {host}:{new.public_port} --token {new.token} "
        f"--ca-fingerprint {new.ca_fingerprint}"
    )
    if args.output == "json":
        doc = {
            "token": new.token,
            **bootstrap_doc(new.info),
            "ca_fingerprint": new.ca_fingerprint,
            "public_port": new.public_port,
            "session_port": new.session_port,
            "enroll_command": command,
        }
        cli._write(output.dumps(doc))
        return int(cli.EXIT_OK)
    expires = output.format_time(new.info.expires_at) if new.info.expires_at else "?"
    lifetime = human_duration((new.info.expires_at - new.info.created_at).total_seconds())
    cli._write(
        f"token:           {new.token}\n"
        f"worker id:       {new.info.worker_id}\n"
        f"expires:         {expires} (valid for {lifetime}, single use)\n"
        f"CA fingerprint:  {new.ca_fingerprint}\n"
        "\nThe token is shown only this once. On the new machine run:\n\n"
        f"  {command}\n"
    )
    return int(cli.EXIT_OK)


def _show(
    args: argparse.Namespace,
    call: Callable[[Client], Awaitable[T]],
    doc: Callable[[T], Any],
    text: Callable[[T], str],
) -> int:
    """Make one call; print its result as JSON (`--output json`) or as text."""
    cli = _cli()
    result = cli._one_call(args, call)
    cli._write(output.dumps(doc(result)) if args.output == "json" else text(result))
    return int(cli.EXIT_OK)


def cmd_token_list(args: argparse.Namespace) -> int:
    return _show(
        args,
        lambda c: c.list_bootstrap_tokens(include_inactive=args.all),
        lambda tokens: {"tokens": [bootstrap_doc(t) for t in tokens]},
        lambda tokens: _bootstrap_table(tokens, _cli()._now()),
    )


def cmd_token_revoke(args: argparse.Namespace) -> int:
    return _show(
        args,
        lambda c: c.revoke_bootstrap_token(args.token_id),
        bootstrap_doc,
        lambda t: f"token {t.token_id} revoked\n",
    )


def cmd_api_token_create(args: argparse.Namespace) -> int:
    cli = _cli()
    scopes = sorted({s for group in args.scope for s in group})
    secret, info = cli._one_call(
        args, lambda c: c.create_api_token(args.name, scopes, ttl=args.ttl)
    )
    if args.output == "json":
        cli._write(output.dumps({"token": secret, **api_doc(info)}))
        return int(cli.EXIT_OK)
    cli._write(
        f"token:   {secret}\n"
        f"id:      {info.token_id}\n"
        f"scopes:  {', '.join(info.scopes)}\n"
        "\nThe token is shown only this once. Programs use it as `authorization: Bearer …`:\n"
        "  TASKRUN_API_TOKEN=… TASKRUN_SERVER=HOST:PUBLIC_PORT taskrun task list\n"
    )
    return int(cli.EXIT_OK)


def cmd_api_token_list(args: argparse.Namespace) -> int:
    return _show(
        args,
        lambda c: c.list_api_tokens(include_inactive=args.all),
        lambda tokens: {"api_tokens": [api_doc(t) for t in tokens]},
        lambda tokens: _api_table(tokens, _cli()._now()),
    )


def cmd_api_token_revoke(args: argparse.Namespace) -> int:
    return _show(
        args,
        lambda c: c.revoke_api_token(args.token_id),
        api_doc,
        lambda t: f"API token {t.token_id} ({t.name}) revoked\n",
    )


def cmd_audit(args: argparse.Namespace) -> int:
    kinds = [k for group in args.kind or () for k in group]
    return _show(
        args,
        lambda c: c.list_audit_events(limit=args.limit, before_id=args.before, kinds=kinds),
        lambda events: {"events": [audit_doc(e) for e in events]},
        _audit_table,
    )


def default_login_dir() -> Path:
    """`$XDG_CONFIG_HOME/taskrun` (default `~/.config/taskrun`)."""
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "taskrun"


def _login_key_and_csr() -> tuple[bytes, bytes]:
    """A new key (PEM) and its certificate request (PEM) for `taskrun login`. cryptography is
    imported here, not with the module: it is a tenth of every other command's start-up."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "taskrun login")]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr


def cmd_login(args: argparse.Namespace) -> int:
    cli = _cli()
    settings = cli.operator_settings(args)
    if not settings.api_token:
        raise cli.CliError(
            "login needs an admin API token: --api-token tra_… or TASKRUN_API_TOKEN "
            "(an admin creates one with `taskrun api-token create NAME --scope admin`)"
        )
    key_pem, csr = _login_key_and_csr()
    issued = cli._one_call(args, lambda c: c.issue_operator_certificate(csr, ttl=args.ttl))
    out = Path(args.out) if args.out else default_login_dir()
    private_directory(out)
    write_atomic(out / "operator-key.pem", key_pem, 0o600)
    write_atomic(out / "operator.pem", issued.certificate_pem, 0o644)
    write_atomic(out / "ca.pem", issued.ca_pem, 0o644)
    server = f"{target_host(settings.server)}:{issued.session_port}"
    if args.output == "json":
        doc = {
            "identity": issued.identity,
            "expires_at": _time(issued.expires_at),
            "certs_dir": str(out),
            "server": server,
        }
        cli._write(output.dumps(doc))
        return int(cli.EXIT_OK)
    cli._write(
        f"identity:  {issued.identity}\n"
        f"expires:   {output.format_time(issued.expires_at)}\n"
        f"written:   {out}/operator.pem, operator-key.pem, ca.pem\n"
        "\nUse it on the mTLS listener until it expires or the token is revoked:\n"
        f"  TASKRUN_CERTS_DIR={out} TASKRUN_SERVER={server} taskrun workers list\n"
    )
    return int(cli.EXIT_OK)
