"""`taskrun store copy SRC DST`: move a control plane's state between stores (SQLite ->
PostgreSQL), with the control plane stopped."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from taskrun.cli.running import main_module as _cli

STORE_HELP = (
    "Stores are named as for `taskrun server --store`: sqlite:PATH, "
    "postgresql://USER:PASSWORD@HOST:PORT/DBNAME. Stop the control plane first: what it writes "
    "during the copy may be missed. The destination must be empty (a new SQLite file, or a "
    "PostgreSQL database or schema without TaskRun data); its schema is created as the server "
    "would. Audit events keep their order and are numbered again from 1."
)


def register(subparsers: Any) -> None:
    """Add `store` and its commands to the `taskrun` parser."""
    cli = _cli()
    group = cli._group(subparsers, "store", "move a control plane's state between stores")
    p = cli._leaf(
        group,
        "copy",
        cmd_copy,
        help="copy everything from one store into an empty one (e.g. SQLite to PostgreSQL)",
        description="Copy tasks, runs, output, workers, schedules, tokens and audit events from "
        "SRC into DST.",
        epilog=STORE_HELP,
        operator_cert=False,
    )
    p.add_argument("source", metavar="SRC", help="the store to read, e.g. sqlite:taskrun.db")
    p.add_argument(
        "destination", metavar="DST", help="the empty store to fill, e.g. postgresql://..."
    )
    p.add_argument(
        "--batch", type=int, default=500, metavar="N", help="tasks per transaction (default 500)"
    )


def cmd_copy(args: argparse.Namespace) -> int:
    cli = _cli()
    from taskrun.controlplane.store import open_store, redact
    from taskrun.controlplane.store.copy import CopyCounts, DestinationNotEmpty, copy_store
    from taskrun.core.errors import StoreUnavailable
    from taskrun.core.store import Store

    if args.batch < 1:
        raise cli.CliError(f"--batch must be positive, got {args.batch}")
    if args.source == args.destination:
        raise cli.CliError("SRC and DST are the same store")
    if args.source.startswith("sqlite:"):
        path = Path(args.source.removeprefix("sqlite:"))
        if not path.is_file():
            raise cli.CliError(f"SRC {args.source}: {path} does not exist")
    try:
        source, destination = open_store(args.source), open_store(args.destination)
    except ValueError as exc:
        raise cli.CliError(str(exc)) from None
    cli._setup_logging(args, daemon=False)

    def progress(counts: CopyCounts) -> None:
        sys.stderr.write(f"\rcopied {counts.tasks} tasks, {counts.runs} runs so far")
        sys.stderr.flush()

    async def run() -> CopyCounts:
        opened: list[Store] = []
        try:
            for store in (source, destination):
                await store.open()
                opened.append(store)
            return await copy_store(source, destination, batch=args.batch, progress=progress)
        finally:
            for store in opened:
                await store.close()

    try:
        counts = asyncio.run(run())
    except (DestinationNotEmpty, StoreUnavailable) as exc:
        sys.stderr.write("\n")
        raise cli.CliError(str(exc), cli.EXIT_FAILED) from None
    sys.stderr.write("\n")
    source_name, destination_name = redact(args.source), redact(args.destination)
    sys.stdout.write(f"copied {counts.summary()} from {source_name} to {destination_name}\n")
    return int(cli.EXIT_OK)
