"""`taskrun events` (a live stream of what happens, one line per event) and `taskrun tui`.

`register(subparsers)` adds both commands to the `taskrun` parser (src/cli/main.py); they reuse
main's connection flags and client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import Any

from taskrun.cli import output
from taskrun.cli.client import EventKind
from taskrun.cli.running import main_module as _cli

KIND_NAMES = {k.name.lower(): k for k in EventKind if k is not EventKind.SNAPSHOT_END}


def _kinds(text: str) -> list[EventKind]:
    out: list[EventKind] = []
    for part in text.split(","):
        name = part.strip().lower()
        if name not in KIND_NAMES:
            raise argparse.ArgumentTypeError(
                f"unknown event kind {name!r} (one of {', '.join(KIND_NAMES)})"
            )
        out.append(KIND_NAMES[name])
    return out


def register(subparsers: Any) -> None:
    """Add `events` and `tui` to the `taskrun` parser."""
    cli = _cli()
    p = cli._leaf(
        subparsers,
        "events",
        cmd_events,
        help="stream what happens: workers, tasks, runs (and output), live",
        description="Print the current workers and unfinished tasks, then every change as it "
        "is committed (across a restart or a failover to another control plane too: the "
        "stream resumes where it was), one line per event (with --output jsonl, one JSON "
        "object per line; "
        "json means the same here, as an endless stream is never one document). "
        "Stop with Ctrl-C.",
    )
    p.add_argument("--task", default="", metavar="ID", help="only events about this task")
    p.add_argument(
        "--worker", default="", metavar="ID", help="only events about this worker and its runs"
    )
    p.add_argument(
        "--kind",
        action="append",
        type=_kinds,
        metavar="K",
        help=f"only these kinds (repeat or comma-separate): {', '.join(KIND_NAMES)}",
    )
    p.add_argument("--include-output", action="store_true", help="also stream run output")
    p.add_argument(
        "--no-snapshot", action="store_true", help="only changes, not the current state first"
    )
    p.add_argument(
        "--after",
        type=int,
        default=0,
        metavar="POSITION",
        help="resume: every change after this position of the event log first (the `position` "
        "of the jsonl output), then live; instead of a snapshot",
    )
    p.add_argument(
        "--output",
        "-o",
        choices=("table", "jsonl", "json"),
        default="table",
        help="table for people (default), or jsonl: one JSON object per line (json: the same)",
    )

    cli._leaf(
        subparsers,
        "tui",
        cmd_tui,
        help="a terminal UI: workers, tasks, runs and events, live",
        description="Watch and steer the fleet: workers (drain), tasks (new, cancel), run "
        "output, live events. Press ? inside for the key bindings.",
    )


def cmd_events(args: argparse.Namespace) -> int:
    cli = _cli()
    client = cli._client(args)
    kinds = cli.flatten(args.kind)
    json_lines = args.output in ("json", "jsonl")

    async def run() -> int:
        async with (
            client,
            contextlib.aclosing(
                client.watch_events(
                    task_id=args.task,
                    worker_id=args.worker,
                    kinds=kinds,
                    include_output=args.include_output or EventKind.OUTPUT in kinds,
                    snapshot=not args.no_snapshot,
                    after_position=args.after,
                )
            ) as events,
        ):
            async for event in events:
                if json_lines:
                    cli._write(output.dumps(output.event_doc(event), indent=None))
                else:
                    cli._write(output.event_line(event))
        return int(cli.EXIT_OK)

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return int(cli.EXIT_INTERRUPTED)


def cmd_tui(args: argparse.Namespace) -> int:
    cli = _cli()
    client = cli._client(args)
    from taskrun.cli.tui.app import TaskRunApp

    app = TaskRunApp(client)
    app.run()
    return int(cli.EXIT_OK)
