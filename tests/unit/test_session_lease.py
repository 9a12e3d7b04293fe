"""When the control plane ends a silent worker session: the lease with runs, one idle heartbeat
interval later without (the worker then heartbeats less often and lets its lease lapse)."""

from __future__ import annotations

import pytest

from taskrun.controlplane import session as session_module
from taskrun.controlplane.session import WorkerSession
from taskrun.core.ids import RunId, WorkerId
from taskrun.core.models import Worker
from tests.clock import Clock, patch_monotonic

LEASE = 4.0
IDLE = 10.0


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    return patch_monotonic(monkeypatch, session_module)


def session() -> WorkerSession:
    return WorkerSession(Worker(WorkerId("w")), "s", LEASE)


def test_an_idle_session_may_stay_silent_one_idle_interval_past_its_lease(clock: Clock) -> None:
    s = session()
    assert s.renew_deadline(IDLE) == 100.0 + LEASE + IDLE
    clock.now += 3.0
    s.renew_lease(1)
    assert s.renew_deadline(IDLE) == 103.0 + LEASE + IDLE


def test_without_an_idle_interval_an_idle_session_keeps_the_lease(clock: Clock) -> None:
    assert session().renew_deadline(0.0) == 100.0 + LEASE


def test_a_run_given_to_a_session_with_a_lapsed_lease_waits_one_lease_from_then(
    clock: Clock,
) -> None:
    s = session()
    clock.now += 7.0  # idle: the lease lapsed at 104
    s.runs.add(RunId("r1"))
    assert s.renew_deadline(IDLE) == 107.0 + LEASE  # the same bound as a worker that went
    clock.now += 1.0  # silent just after its last renewal
    s.runs.add(RunId("r2"))  # more runs while waiting do not push it further
    assert s.renew_deadline(IDLE) == 107.0 + LEASE
    s.renew_lease(1)  # the worker renewed: its lease decides again
    assert s.renew_deadline(IDLE) == 108.0 + LEASE


def test_a_busy_session_that_goes_silent_is_ended_when_its_lease_runs_out(clock: Clock) -> None:
    s = session()
    s.runs.add(RunId("r1"))
    clock.now += 3.0
    s.renew_lease(1)
    clock.now += 0.5  # silent from here on; runs already held keep their lease's bound
    s.runs.add(RunId("r2"))
    assert s.renew_deadline(IDLE) == 103.0 + LEASE


def test_a_session_that_became_idle_and_busy_again_counts_from_the_new_run(clock: Clock) -> None:
    s = session()
    s.runs.add(RunId("r1"))
    s.runs.discard(RunId("r1"))
    assert s.renew_deadline(IDLE) == 100.0 + LEASE + IDLE
    clock.now += 20.0
    s.runs.add(RunId("r2"))
    assert s.renew_deadline(IDLE) == 120.0 + LEASE
