"""Looking at processes through /proc, for tests about child processes and orphans."""

from __future__ import annotations

import os
from pathlib import Path


def _stat(pid: int) -> tuple[str, int] | None:
    """(name, parent pid) of a process, None when it is gone."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return None
    name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :]
    fields = rest.split()
    if fields[0] == "Z":  # a zombie has exited
        return None
    return name, int(fields[1])


def processes() -> dict[int, tuple[str, int]]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := _stat(int(entry.name))) is not None:
            found[int(entry.name)] = info
    return found


def descendants(root: int | None = None, name: str | None = None) -> list[int]:
    """Live processes below `root` (default: this one), optionally only those called `name`."""
    root = os.getpid() if root is None else root
    table = processes()
    out = []
    for pid, (pname, _) in table.items():
        ancestor = table.get(pid, ("", 0))[1]
        while ancestor and ancestor != root:
            ancestor = table.get(ancestor, ("", 0))[1]
        if ancestor == root and (name is None or pname == name):
            out.append(pid)
    return sorted(out)


def named(name: str) -> list[int]:
    """Every live process called `name`, wherever it is (an orphan is re-parented to init)."""
    return sorted(pid for pid, (pname, _) in processes().items() if pname == name)


def alive(pid: int) -> bool:
    return _stat(pid) is not None
