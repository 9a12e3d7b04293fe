"""Per-run working directories, kept away from the worker's keys.

Each run gets `<root>/<run_id>` (mode 0700), removed when the run ends unless the worker keeps
them. The root must lie outside the directories holding the worker's state and certificates
(checked at start). An agent given a `cwd` in its input gets it only inside a directory the
worker's operator allowed (`--allow-cwd DIR`), and never one holding or inside a protected
directory. What this does not do: stop a program the agent runs (Bash) from opening any file the
worker's user can open. Agents that can (claude_code) also deny their file tools the protected
directories; a sandbox (claude_code's opt-in `agent_sandbox`, bubblewrap) hides them from the
programs too.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

from taskrun.core.agent import AgentError
from taskrun.core.text import quoted

log = structlog.get_logger(__name__)


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path.expanduser()))


def default_root(worker_id: str) -> Path:
    """`$XDG_CACHE_HOME/taskrun/workspaces/<worker_id>` (default `~/.cache/…`)."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "taskrun" / "workspaces" / worker_id


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


@dataclass(frozen=True)
class Workspaces:
    """Where runs work, what they may not touch, and which `cwd` values they may ask for."""

    root: Path
    protected: tuple[Path, ...]  # the worker's state and certificate directories
    allow_cwd: tuple[Path, ...] = ()
    keep: bool = False
    sandbox: bool = False  # ask agents that can to sandbox the programs they run

    @classmethod
    def create(
        cls,
        root: Path,
        protected: Iterable[Path],
        allow_cwd: Iterable[Path] = (),
        *,
        keep: bool = False,
        sandbox: bool = False,
    ) -> Workspaces:
        """Checked settings (ValueError naming the setting); the root is created 0700."""
        real_root = _real(root)
        guarded = tuple(dict.fromkeys(_real(p) for p in protected))
        for p in guarded:
            if _overlaps(real_root, p):
                raise ValueError(
                    f"workspace_root {root} overlaps {p}, which holds the worker's state or "
                    "certificates; choose a directory outside it"
                )
        allowed = tuple(_real(p) for p in allow_cwd)
        for a in allowed:
            for p in guarded:
                if _overlaps(a, p):
                    raise ValueError(
                        f"allow_cwd {a} overlaps {p}, which holds the worker's state or "
                        "certificates"
                    )
        if sandbox and shutil.which("bwrap") is None:
            raise ValueError(
                "agent_sandbox needs bubblewrap (bwrap) on PATH: apt install bubblewrap socat"
            )
        real_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        real_root.chmod(0o700)
        return cls(real_root, guarded, allowed, keep, sandbox)

    def open(self, run_id: str) -> Path:
        """A fresh, empty directory for one run."""
        path = self.root / run_id
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)  # a leftover of an earlier attempt
        path.mkdir(mode=0o700)
        return path

    def close(self, path: Path) -> None:
        if self.keep:
            return
        shutil.rmtree(path, ignore_errors=True)

    def cwd_for(self, requested: str | None, workspace: Path) -> Path:
        """The directory a run works in: its workspace, or an allowed `input.cwd`."""
        if not requested:
            return workspace
        path = _real(Path(requested))
        if not path.is_absolute() or not any(path.is_relative_to(a) for a in self.allow_cwd):
            allowed = ", ".join(str(a) for a in self.allow_cwd) or "none"
            raise AgentError(
                f"input.cwd: {quoted(requested, 256)} is not inside a directory this worker allows "
                f"(allowed: {allowed}; the worker's operator adds one with --allow-cwd DIR)"
            )
        if any(_overlaps(path, p) for p in self.protected):
            raise AgentError(
                f"input.cwd: {quoted(requested, 256)} overlaps the worker's state or certificates"
            )
        if not path.is_dir():
            raise AgentError(
                f"input.cwd: {quoted(requested, 256)} is not a directory on this worker"
            )
        return path
