"""Another commit's TaskRun beside this one, for scripts/bench --compare-ref REF.

`git archive REF` is unpacked into the run's temporary directory and a `taskrun` link to its
`src/` is put first on PYTHONPATH of the server and worker processes of that side; both sides
use this checkout's virtualenv (its dependencies) and this checkout's bench clients, which speak
to an older server through the calls it has (the client falls back where a call is missing).
"""

from __future__ import annotations

import subprocess
import tarfile
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

from benchprocs import BenchError

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Side:
    """Which TaskRun the server and workers of a measurement run."""

    name: str  # "this" or the ref as given
    env: dict[str, str] = field(default_factory=dict)  # added to the children's environment
    commit: str = ""


def this_side() -> Side:
    return Side("this", {}, _rev_parse("HEAD") + (" (+ uncommitted)" if _dirty() else ""))


def ref_side(ref: str, tmp: Path) -> Side:
    commit = _rev_parse(ref)
    tree = tmp / f"ref-{commit[:12]}"
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", commit, "src"],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        raise BenchError(f"git archive {ref}: {archive.stderr.decode(errors='replace').strip()}")
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(tree, filter="data")
    path = tree / "pythonpath"
    path.mkdir()
    (path / "taskrun").symlink_to(tree / "src", target_is_directory=True)
    return Side(ref, {"PYTHONPATH": str(path)}, commit)


def _rev_parse(ref: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"--compare-ref {ref!r} is not a commit here: {done.stderr.strip()}")
    return done.stdout.strip()


def _dirty() -> bool:
    done = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "src"],
        capture_output=True,
        text=True,
        check=False,
    )
    return bool(done.stdout.strip())
