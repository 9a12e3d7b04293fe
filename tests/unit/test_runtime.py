"""The daemons' garbage-collector settings (in a child process: they are process-wide)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from taskrun.runtime import BurstCollector

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


async def test_a_burst_of_sessions_is_collected_once_a_quiet_spell_after_its_last() -> None:
    loop = asyncio.get_running_loop()
    fired: list[tuple[int, float]] = []
    collector = BurstCollector(burst=3, quiet=0.2, collect=lambda g: fired.append((g, loop.time())))
    collector.note()
    collector.note()
    await asyncio.sleep(0.3)
    assert fired == []  # fewer than a burst: left to the collector's own pace
    collector.note()  # the burst
    await asyncio.sleep(0.1)
    collector.note()  # still coming: the quiet spell starts again
    last = loop.time()
    async with asyncio.timeout(5):
        while not fired:
            await asyncio.sleep(0.01)
    [(generation, at)] = fired
    assert generation == 1  # the young and middle generations; the old one is left alone
    assert at >= last + 0.2 - 0.01  # never before the quiet spell after the last note
    for _ in range(2):
        collector.note()  # counted afresh: two are not a burst
    await asyncio.sleep(0.3)
    assert len(fired) == 1


def test_after_a_storm_of_sessions_settles_what_they_left_is_in_the_old_generation() -> None:
    done = subprocess.run([sys.executable, "-c", STORM], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


STORM = """
import asyncio, gc
from taskrun.runtime import BurstCollector

async def main():
    gc.disable()  # only the collections this test makes
    collector = BurstCollector(burst=100, quiet=0.05)
    sessions = []
    for i in range(1000):
        sessions.append({"id": i, "buffers": [[] for _ in range(50)]})
        collector.note()
        if i % 100 == 99:
            gc.collect(0)  # as the storm's young collections do: into the middle generation
    assert len(gc.get_objects(1)) > 50_000, len(gc.get_objects(1))
    await asyncio.sleep(0.5)
    assert len(gc.get_objects(1)) == 0, len(gc.get_objects(1))
    assert len(gc.get_objects(2)) > 50_000
    print("ok")

asyncio.run(main())
"""
