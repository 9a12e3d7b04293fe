"""The daemons' garbage-collector settings (in a child process: they are process-wide)."""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import gc
from taskrun.runtime import YOUNG_GENERATION, settle_garbage_collector
before = gc.get_threshold()
assert gc.get_freeze_count() == 0
settle_garbage_collector()
assert gc.get_freeze_count() > 1000, gc.get_freeze_count()  # the modules' objects at least
assert gc.get_threshold() == (YOUNG_GENERATION, before[1], before[2]), gc.get_threshold()
cycle = []
cycle.append(cycle)  # made later: still collected
del cycle
assert gc.collect() >= 1
print("ok")
"""


def test_a_started_daemon_freezes_what_it_started_with_and_collects_later_cycles() -> None:
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
