"""Faults underneath the control plane, for tests: a filesystem that fills up, a network path
that goes silent, CPUs taken by others. Real ones, not mocks: a tmpfs mount (CI runs as root),
a TCP proxy, busy processes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.proxy import SilentProxy

__all__ = ["SilentProxy", "busy_cpus", "fill", "small_filesystem"]


@contextlib.contextmanager
def small_filesystem(path: Path, size: str = "2m") -> Iterator[Path]:
    """Mount a tmpfs of `size` at `path` for the block (needs root, as in CI)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write a file in `directory` until the filesystem is full; returns it (delete to free)."""
    filler = directory / "filler"
    block = b"\0" * 4096
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            os.write(fd, block)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


@contextlib.contextmanager
def busy_cpus(count: int | None = None) -> Iterator[None]:
    """Processes that keep `count` CPUs busy (by default one more than there are), so that the
    threads and the event loop under test get their turns late, as on a loaded CI machine:
    some races then happen every few runs instead of once in a while."""
    count = count if count is not None else (os.cpu_count() or 1) + 1
    spin = [sys.executable, "-c", "while True: pass"]
    procs = [subprocess.Popen(spin) for _ in range(count)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()
