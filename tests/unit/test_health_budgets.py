"""The circuit breaker of worker health and the daily budgets, as pure logic."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import pytest

from taskrun.controlplane.budgets import Budgets, parse_caps
from taskrun.controlplane.health import BreakerSettings, WorkerHealth
from taskrun.controlplane.waiting import check_offered, waiting_reason
from taskrun.core.ids import TaskId, WorkerId
from taskrun.core.models import AgentSpec, ModelBackend, Task, TaskPolicy, Worker, asked_model
from taskrun.core.status import TaskStatus, WorkerStatus

W = WorkerId("w")
WALL = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def breaker(**kw: float) -> WorkerHealth:
    return WorkerHealth(BreakerSettings(**{"threshold": 3, "fast_failure": 10, "base": 30, **kw}))  # type: ignore[arg-type]


def test_the_breaker_opens_after_threshold_fast_failures_in_a_row() -> None:
    h = breaker()
    assert h.failed(W, 0.1, "e", 0.0, WALL) is None
    assert h.failed(W, 0.1, "e", 1.0, WALL) is None
    assert not h.quarantined(W, 1.0)
    tripped = h.failed(W, 0.1, "no key", 2.0, WALL)
    assert tripped is not None and tripped.seconds == 30
    assert "3 runs in a row failed within 10s" in tripped.reason and "no key" in tripped.reason
    assert h.quarantined(W, 31.9)
    assert not h.quarantined(W, 32.0)
    failures, until, reason = h.view(W, 10.0)
    assert (failures, until, reason) == (3, WALL + timedelta(seconds=30), tripped.reason)


def test_a_slow_failure_or_a_success_ends_the_streak() -> None:
    h = breaker()
    h.failed(W, 0.1, "e", 0.0, WALL)
    h.failed(W, 0.1, "e", 0.0, WALL)
    assert h.failed(W, 60.0, "slow", 0.0, WALL) is None  # the worker did work
    h.failed(W, 0.1, "e", 0.0, WALL)
    h.succeeded(W)
    h.failed(W, 0.1, "e", 0.0, WALL)
    assert h.failed(W, 0.1, "e", 0.0, WALL) is None
    assert not h.quarantined(W, 0.0)


def test_half_open_one_more_fast_failure_reopens_for_twice_as_long_up_to_the_max() -> None:
    h = breaker(max_quarantine=100)
    now = 0.0
    for _ in range(3):
        tripped = h.failed(W, 0.1, "e", now, WALL)
    assert tripped is not None and tripped.seconds == 30
    now = 31.0  # the quarantine ended: the worker is tried again
    again = h.failed(W, 0.1, "e", now, WALL)
    assert again is not None and again.seconds == 60
    now = 92.0
    third = h.failed(W, 0.1, "e", now, WALL)
    assert third is not None and third.seconds == 100  # capped
    h.succeeded(W)  # closes it and forgets the history
    assert h.view(W, now) == (0, None, "")


def test_failures_during_a_quarantine_do_not_extend_it() -> None:
    h = breaker()
    for _ in range(3):
        h.failed(W, 0.1, "e", 0.0, WALL)
    assert h.failed(W, 0.1, "e", 5.0, WALL) is None  # a run assigned before it opened
    assert not h.quarantined(W, 30.0)


def test_threshold_zero_never_quarantines() -> None:
    h = breaker(threshold=0)
    for _ in range(50):
        assert h.failed(W, 0.0, "e", 0.0, WALL) is None


def task(labels: dict[str, str], schedule: str = "") -> Task:
    return Task(
        TaskId("t"), "echo", "{}", labels, TaskPolicy(), TaskStatus.PENDING, WALL, WALL,
        schedule=schedule,
    )  # fmt: skip


def test_a_label_cap_blocks_its_tasks_once_reached_and_a_new_day_resets_it() -> None:
    b = Budgets({"team=research": 1.0}, {}, date(2026, 12, 2))
    research, other = task({"team": "research"}), task({"team": "ops"})
    b.spend({"team": "research"}, "", 0.6, WALL)
    assert b.blocking(research) is None
    b.spend({"team": "research"}, "", 0.4, WALL)
    cap = b.blocking(research)
    assert cap is not None and cap.reached
    assert "label team=research" in cap.reason() and "$1 today" in cap.reason()
    assert b.blocking(other) is None
    b.spend({"team": "research"}, "", 5.0, WALL - timedelta(days=1))  # yesterday: not today's
    assert b.caps()[0].spent_usd == pytest.approx(1.0)
    assert b.roll(WALL + timedelta(days=1))
    assert b.blocking(research) is None


def test_a_schedule_cap_counts_only_that_schedules_tasks() -> None:
    b = Budgets({}, {"nightly": 0.5}, date(2026, 12, 2))
    b.spend({}, "nightly", 0.5, WALL)
    b.spend({}, "hourly", 9.0, WALL)
    assert b.blocking(task({}, "nightly")) is not None
    assert b.blocking(task({}, "hourly")) is None
    assert b.blocking(task({})) is None


def test_a_zero_cap_blocks_at_once() -> None:
    b = Budgets({"team=x": 0.0}, {}, date(2026, 12, 2))
    assert b.blocking(task({"team": "x"})) is not None


@pytest.mark.parametrize(
    ("raw", "kind", "needle"),
    [
        ("team=research", "label", "is not a label budget"),
        ("research=20", "label", "is not a label budget"),
        ("team=research=lots", "label", "is not an amount"),
        ("team=research=-1", "label", "finite number >= 0"),
        ("team=research=inf", "label", "finite number >= 0"),
        ("=5", "schedule", "is not a schedule budget"),
    ],
)
def test_bad_budgets_are_refused_naming_them(raw: str, kind: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_caps([raw], kind)


def test_budgets_parse() -> None:
    assert parse_caps(["team=research=20", "a=b=0.5"], "label") == {
        "team=research": 20.0,
        "a=b": 0.5,
    }
    assert parse_caps(["nightly=5"], "schedule") == {"nightly": 5.0}


# -- why a task waits ------------------------------------------------------------------------------


def online(name: str, *agents: AgentSpec) -> Worker:
    return Worker(WorkerId(name), agents=agents, status=WorkerStatus.ONLINE)


ANTHROPIC = AgentSpec("anthropic", backends=(ModelBackend("anthropic", "claude-sonnet-5-5"),))


def pending(agent: str = "anthropic", **policy: str) -> Task:
    t = task({})
    t.agent, t.policy = agent, TaskPolicy(**policy)  # type: ignore[arg-type]
    return t


def test_waiting_reason_names_unavailable_agents_with_their_reasons() -> None:
    keyless = replace(ANTHROPIC, unavailable_reason="no ANTHROPIC_API_KEY")
    reason = waiting_reason(pending(), [online("w1", keyless), online("w2", keyless)])
    assert reason == (
        "no online worker can run agent 'anthropic' now "
        "(w1: no ANTHROPIC_API_KEY; w2: no ANTHROPIC_API_KEY)"
    )
    assert waiting_reason(pending(), [online("w1", keyless), online("w2", ANTHROPIC)]) == ""


def test_waiting_reason_matches_the_model_per_agent() -> None:
    echo = AgentSpec("echo", backends=(ModelBackend("none", "echo"),))
    worker = online("w1", echo, ANTHROPIC)
    assert waiting_reason(pending("echo", required_provider="anthropic"), [worker]) == (
        "no online worker offers agent 'echo' with a anthropic model backend"
    )
    assert waiting_reason(pending(required_model="claude-sonnet-5-5"), [worker]) == ""


def test_a_model_named_in_the_input_binds_like_the_required_model() -> None:
    worker = online("w1", ANTHROPIC)
    named = pending()
    named.input = json.dumps({"prompt": "x", "model": "claude-opus-9"})
    assert waiting_reason(named, [worker]) == (
        "no online worker offers agent 'anthropic' with a claude-opus-9 model backend"
    )
    named.input = json.dumps({"prompt": "x", "model": "claude-sonnet-5-5"})
    assert waiting_reason(named, [worker]) == ""
    # the required model wins over the input's (it is the one the agent runs)
    named.policy.required_model = "claude-sonnet-5-5"
    named.input = json.dumps({"prompt": "x", "model": "claude-opus-9"})
    assert waiting_reason(named, [worker]) == ""


@pytest.mark.parametrize(
    ("required", "text", "asked"),
    [
        ("", "{}", ""),
        ("", '{"prompt": "model"}', ""),
        ("", '{"model": "m1"}', "m1"),
        ("", '{"\\u006dodel": "m1"}', "m1"),  # spelled with an escape, still the key
        ("", '{"model": 3}', ""),  # not a model name: the agent's schema refuses it
        ("", '{"model": ""}', ""),
        ("", '["model"]', ""),
        ("", "not json, model", ""),
        ("m2", '{"model": "m1"}', "m2"),
    ],
)
def test_asked_model(required: str, text: str, asked: str) -> None:
    assert asked_model(required, text) == asked


def test_waiting_reason_says_when_every_fitting_worker_is_quarantined() -> None:
    until = WALL + timedelta(seconds=30)
    workers = [online("w1", ANTHROPIC), online("w2", ANTHROPIC)]
    reason = waiting_reason(pending(), workers, lambda w: until)
    assert reason == (
        "every online worker that offers agent 'anthropic' is quarantined "
        "(w1 until 12:00:30 UTC; w2 until 12:00:30 UTC)"
    )
    assert waiting_reason(pending(), workers, lambda w: until if w.id == "w1" else None) == ""


class _Counted(list[Worker]):
    """The connected workers, counting how many of them a caller looks at."""

    looked_at = 0

    def __iter__(self) -> Iterator[Worker]:
        for worker in super().__iter__():
            self.looked_at += 1
            yield worker


def test_a_task_that_some_worker_can_take_costs_a_look_at_one_worker_not_all() -> None:
    """Every task CreateTasks returns pending is asked why it waits: with a thousand workers
    connected, a look at each of them per task was most of what the thousand cost."""
    echo = AgentSpec("echo")
    workers = _Counted(
        [online(f"w{i}", echo) for i in range(1000)] + [online("gpu", ANTHROPIC, echo)]
    )
    workers[-1].labels = {"gpu": "yes"}
    asked: list[WorkerId] = []

    def quarantined_until(worker: Worker) -> None:
        asked.append(worker.id)

    assert waiting_reason(pending("echo"), workers, quarantined_until) == ""
    assert (workers.looked_at, asked) == (1, ["w0"])
    check_offered("anthropic", "anthropic", "", workers)  # offered: passes
    assert workers.looked_at == 1 + 1001  # the one that offers it is the last
    # a requirement only the last meets: found there, the others looked at once each
    workers.looked_at = 0
    gpu = pending("echo")
    gpu.policy.required_labels = {"gpu": "yes"}
    assert waiting_reason(gpu, workers) == ""
    assert workers.looked_at == 1001
    # nobody can: the reason needs them all, and still names it right
    gpu.policy.required_labels = {"gpu": "no"}
    assert waiting_reason(gpu, workers) == "no online worker offers agent 'echo' with label gpu=no"
