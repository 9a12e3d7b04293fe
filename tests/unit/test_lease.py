"""The worker's count of its lease: always from when it sent what the server answered."""

from __future__ import annotations

import pytest

from taskrun.worker import lease as lease_module
from taskrun.worker.lease import HeartbeatPace, Lease, LeaseFile
from tests.clock import Clock, patch_monotonic


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    return patch_monotonic(monkeypatch, lease_module)


def test_no_lease_before_the_first_session(clock: Clock) -> None:
    assert Lease().remaining() == float("inf")


def test_the_first_lease_counts_from_sending_the_hello(clock: Clock) -> None:
    lease = Lease()
    lease.hello_sent()
    clock.now += 0.3  # the answer takes a while
    lease.session_granted(4.0)
    assert lease.remaining() == pytest.approx(3.7)


def test_a_renewal_counts_from_sending_that_heartbeat(clock: Clock) -> None:
    lease = Lease()
    lease.hello_sent()
    lease.session_granted(4.0)
    clock.now += 1.0
    seq = lease.next_heartbeat()
    clock.now += 2.5  # a slow answer
    lease.granted(seq)
    assert lease.remaining() == pytest.approx(4.0 - 2.5)


def test_an_old_or_unknown_grant_never_shortens_or_extends_wrongly(clock: Clock) -> None:
    lease = Lease()
    lease.hello_sent()
    lease.session_granted(4.0)
    first = lease.next_heartbeat()
    clock.now += 1.0
    second = lease.next_heartbeat()
    lease.granted(second)
    expires = lease.expires
    lease.granted(first)  # arrives late: forgotten already
    lease.granted(99)  # never sent
    assert lease.expires == expires


def test_heartbeats_are_numbered_afresh_each_session(clock: Clock) -> None:
    lease = Lease()
    lease.hello_sent()
    lease.session_granted(4.0)
    assert [lease.next_heartbeat(), lease.next_heartbeat()] == [1, 2]
    lease.hello_sent()
    assert lease.next_heartbeat() == 1


def test_the_worker_starts_stopping_runs_before_the_end(clock: Clock) -> None:
    lease = Lease()
    lease.hello_sent()
    lease.session_granted(4.0)
    assert lease.fence_lead() == 1.0
    lease.duration = 1.0
    assert lease.fence_lead() == 0.25


def test_lease_file_holds_the_end_and_zero_once_ended(tmp_path) -> None:  # type: ignore[no-untyped-def]
    f = LeaseFile(tmp_path / "lease")
    f.write(123.5)
    assert float(f.path.read_text()) == 123.5
    f.end()
    assert float(f.path.read_text()) == 0.0
    assert f.path.stat().st_mode & 0o777 == 0o600


def test_on_postgresql_the_default_worker_lease_outlasts_a_leadership_takeover() -> None:
    from taskrun.controlplane.config import ServerConfig

    pg = "postgresql://taskrun@127.0.0.1:5432/taskrun"
    assert ServerConfig(store="sqlite:t.db").lease_duration == 4.0  # one process: no takeover
    assert ServerConfig(store=pg).lease_duration == 3 * 2.0 + 2.0
    assert ServerConfig(store=pg, leader_lease=4.0).lease_duration == 14.0
    assert ServerConfig(store=pg, lease_duration=5.0).lease_duration == 5.0  # an explicit one


# --- an idle worker's heartbeats ---------------------------------------------------------------


def test_a_run_starts_at_once_only_while_the_lease_has_twice_the_fence_lead_left(
    clock: Clock,
) -> None:
    lease = Lease()
    lease.hello_sent()
    lease.session_granted(4.0)  # fence lead 1 s
    clock.now += 1.9
    assert lease.ready_to_start()
    clock.now += 0.2  # 1.9 s left: a renewal might not come before the run had to stop
    assert not lease.ready_to_start()
    seq = lease.next_heartbeat()
    clock.now += 0.01
    lease.granted(seq)
    assert lease.ready_to_start()


def test_an_idle_lease_that_lapsed_is_not_overdue_while_heartbeats_are_answered(
    clock: Clock,
) -> None:
    lease = Lease()
    lease.hello_sent()
    lease.session_granted(4.0)
    clock.now += 10.0  # an idle interval: the lease lapsed, nothing was asked yet
    assert lease.remaining() < 0 and not lease.overdue()
    seq = lease.next_heartbeat()
    clock.now += 3.9
    assert not lease.overdue()
    lease.granted(seq)
    clock.now += 10.0
    assert not lease.overdue()


def test_a_heartbeat_unanswered_for_a_whole_lease_is_overdue(clock: Clock) -> None:
    lease = Lease()
    lease.hello_sent()
    lease.session_granted(4.0)
    first = lease.next_heartbeat()
    clock.now += 2.0
    lease.next_heartbeat()  # a later one does not hide the older one's silence
    clock.now += 2.0
    assert lease.overdue()
    lease.granted(first + 1)  # answering the newer one answers both
    assert not lease.overdue()


def test_a_new_session_forgets_the_unanswered_heartbeats_of_the_last(clock: Clock) -> None:
    lease = Lease()
    lease.hello_sent()
    lease.session_granted(4.0)
    lease.next_heartbeat()
    clock.now += 5.0
    assert lease.overdue()
    lease.hello_sent()
    assert not lease.overdue()


def test_heartbeats_pace_busy_while_holding_or_having_held_a_run_since_the_last() -> None:
    pace = HeartbeatPace(busy=1.0, idle=10.0, draw=lambda: 0.0)  # no spread drawn
    assert pace.due_in(last_sent=0.0, now=0.5, holding=False) == pytest.approx(9.5)
    assert pace.due_in(last_sent=0.0, now=0.5, holding=True) == pytest.approx(0.5)
    pace.started()  # a run came and finished before the next heartbeat
    assert pace.due_in(last_sent=0.0, now=0.5, holding=False) == pytest.approx(0.5)
    pace.sent(holding=False)  # the heartbeat after it: idle again
    assert pace.due_in(last_sent=1.0, now=1.5, holding=False) == pytest.approx(9.5)
    pace.sent(holding=True)
    assert pace.due_in(last_sent=2.0, now=2.5, holding=False) == pytest.approx(0.5)


def test_idle_waits_are_drawn_apart_within_the_idle_interval_and_never_below_busy() -> None:
    """Workers that connected together (a control-plane restart) drift apart."""
    widest = HeartbeatPace(busy=1.0, idle=10.0, draw=lambda: 1.0)
    assert widest.due_in(last_sent=0.0, now=0.0, holding=False) == pytest.approx(8.0)
    paces = [HeartbeatPace(busy=1.0, idle=10.0) for _ in range(200)]
    waits = []
    for pace in paces:
        pace.sent(holding=False)
        waits.append(pace.due_in(last_sent=0.0, now=0.0, holding=False))
    assert all(8.0 <= w <= 10.0 for w in waits)
    assert max(waits) - min(waits) > 1.0  # spread out, not one burst
    pace = paces[0]
    drawn = set()
    for _ in range(20):  # each heartbeat draws its next wait anew
        pace.sent(holding=False)
        drawn.add(pace.due_in(last_sent=0.0, now=0.0, holding=False))
    assert len(drawn) > 1
    tight = HeartbeatPace(busy=1.0, idle=1.1, draw=lambda: 1.0)
    assert tight.due_in(last_sent=0.0, now=0.0, holding=False) == pytest.approx(1.0)


def test_an_idle_interval_below_the_busy_one_or_unset_means_every_interval() -> None:
    assert HeartbeatPace(busy=1.0, idle=0.0).due_in(0.0, 0.0, holding=False) == 1.0
    assert HeartbeatPace(busy=1.0, idle=0.5).due_in(0.0, 0.0, holding=False) == 1.0


def test_an_idle_heartbeat_asks_for_a_renewal_only_if_it_would_outlast_the_next_idle_one(
    clock: Clock,
) -> None:
    lease = Lease()
    lease.hello_sent()
    lease.session_granted(4.0)
    window = lease.ready_window()  # a run starts at once for 4 - 2 x 1 s after the sending
    assert window == pytest.approx(2.0)
    pace = HeartbeatPace(busy=1.0, idle=10.0)  # the defaults: idle waits of 8 to 10 s
    assert not pace.asks_renewal(holding=False, ready_window=window)
    assert pace.asks_renewal(holding=True, ready_window=window)
    pace.started()  # held a run since the last heartbeat: its renewal still matters
    assert pace.asks_renewal(holding=False, ready_window=window)
    pace.sent(holding=False)
    assert not pace.asks_renewal(holding=False, ready_window=window)
    # idle heartbeats close enough (the shortest idle wait 0.8 x 2.5 s) keep the worker ready
    assert HeartbeatPace(busy=1.0, idle=2.5).asks_renewal(holding=False, ready_window=window)
    assert not HeartbeatPace(busy=1.0, idle=2.6).asks_renewal(holding=False, ready_window=window)
    assert HeartbeatPace(busy=1.0, idle=0.0).asks_renewal(holding=False, ready_window=window)


def test_a_heartbeat_asking_for_no_renewal_is_number_0_and_never_overdue(clock: Clock) -> None:
    lease = Lease()
    lease.hello_sent()
    lease.session_granted(4.0)
    assert lease.quiet_heartbeat() == 0
    assert lease.last_sent == clock.now
    clock.now += 60.0  # never answered, and never expected to be
    assert not lease.overdue()
    assert lease.next_heartbeat() == 1  # the numbered ones go on from where they were
