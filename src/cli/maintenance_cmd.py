"""`taskrun backup` (an online copy of the SQLite store) and `taskrun completion` (shell scripts).

The backup uses SQLite's online backup API, so it is consistent while the control plane writes;
copying the file (and its -wal) by hand is not.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any

from taskrun.cli.running import main_module as _cli

BACKUP_PAGES_PER_STEP = 1024  # copy in steps so the server's writers are not held up


def register(commands: Any) -> None:
    cli = _cli()
    p = cli._leaf(
        commands,
        "backup",
        cmd_backup,
        help="copy the control plane's SQLite store while it runs (online backup API)",
        description="Write a consistent copy of the SQLite store to PATH, also while the server "
        "is running, then check the copy's integrity. Restore by stopping the server and "
        "putting the copy in place of the store file (remove its -wal and -shm files).",
    )
    p.add_argument("path", metavar="PATH", help="the file to write (replaced if it exists)")
    p.add_argument(
        "--store",
        help="sqlite:PATH of the store (TASKRUN_STORE, default sqlite:.taskrun/taskrun.db)",
    )
    p.add_argument("--db", metavar="PATH", help="shorthand for --store sqlite:PATH (TASKRUN_DB)")

    p = cli._leaf(
        commands,
        "completion",
        cmd_completion,
        help="print a shell completion script (bash or zsh)",
        description="bash: `taskrun completion bash > ~/.local/share/bash-completion/completions/"
        "taskrun`; zsh: `taskrun completion zsh > ~/.zfunc/_taskrun` with ~/.zfunc on $fpath "
        "before `compinit`.",
    )
    p.add_argument("shell", choices=("bash", "zsh"))


def backup_sqlite(source: Path, target: Path) -> int:
    """Copy the database at `source` to `target` with the online backup API; the page count.

    The copy is written next to `target` and renamed into place, mode 0600 (it holds token
    hashes and the audit log). ValueError when the copy fails its integrity check.
    """
    if not source.is_file():
        raise FileNotFoundError(f"store {source} does not exist")
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    try:
        with (
            contextlib.closing(sqlite3.connect(source)) as src,
            contextlib.closing(sqlite3.connect(partial)) as dst,
        ):
            src.backup(dst, pages=BACKUP_PAGES_PER_STEP)
            (check,) = dst.execute("PRAGMA integrity_check").fetchone()
            (pages,) = dst.execute("PRAGMA page_count").fetchone()
        if check != "ok":
            raise ValueError(f"the copy of {source} failed its integrity check: {check}")
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return int(pages)


def cmd_backup(args: argparse.Namespace) -> int:
    cli = _cli()
    store = cli.resolve_store(args) or "sqlite:.taskrun/taskrun.db"
    if not store.startswith("sqlite:"):
        raise cli.CliError(f"store {store!r}: only a sqlite:PATH store can be backed up")
    source, target = Path(store.removeprefix("sqlite:")), Path(args.path)
    if source.resolve() == target.resolve():
        raise cli.CliError("PATH: the backup must not replace the store itself")
    try:
        pages = backup_sqlite(source, target)
    except FileNotFoundError as exc:
        raise cli.CliError(str(exc)) from None
    except (OSError, sqlite3.Error, ValueError) as exc:
        raise cli.CliError(
            f"backup of {source} to {target} failed: {exc}", cli.EXIT_FAILED
        ) from None
    cli._write(f"backed up {source} to {target} ({pages} pages)\n")
    return int(cli.EXIT_OK)


def cmd_completion(args: argparse.Namespace) -> int:
    import shtab

    sys.stdout.write(shtab.complete(_cli().build_parser(), shell=args.shell))
    return 0
