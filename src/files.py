"""Crash-safe file writes and private directories, shared by the control plane and the worker."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write data to a temporary file next to path with mode, fsync it, rename it over path,
    then fsync the directory: after a crash the file is either the old one or the new one."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def fsync_dir(directory: Path) -> None:
    """Make a rename in directory durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def private_directory(directory: Path) -> None:
    """Create `directory` and any missing parents with mode 0700 (set explicitly, not left to
    the umask). An existing directory keeps its mode, except TaskRun's own `.taskrun`, which
    older versions created 0755 and which is tightened when this process owns it."""
    missing = []
    for level in (directory, *directory.parents):
        if level.exists():
            break
        missing.append(level)
    for level in reversed(missing):
        level.mkdir(mode=0o700, exist_ok=True)
        level.chmod(0o700)
    for level in (directory, *directory.parents):
        if level.name == ".taskrun":
            with contextlib.suppress(PermissionError):
                if level.stat().st_uid == os.getuid():
                    level.chmod(0o700)
            break
