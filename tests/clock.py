"""A monotonic clock a test moves by hand (patched into the module under test)."""

from __future__ import annotations

from types import ModuleType

import pytest


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def patch_monotonic(monkeypatch: pytest.MonkeyPatch, module: ModuleType) -> Clock:
    """`module.time.monotonic` reads a Clock from now on; returns it."""
    clock = Clock()
    monkeypatch.setattr(module.time, "monotonic", clock)
    return clock
