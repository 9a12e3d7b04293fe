"""The dispatcher decides which pending run goes to which worker."""

from __future__ import annotations

from taskrun.controlplane.dispatcher import Candidate, PendingQueue, PendingRun, backends_fit
from taskrun.core.ids import RunId, TaskId, WorkerId


def run(n: int, agent: str = "echo", priority: int = 0, **kw: object) -> PendingRun:
    return PendingRun(RunId(f"r{n}"), TaskId(f"t{n}"), agent, priority, **kw)  # type: ignore[arg-type]


def worker(
    name: str,
    capacity: int = 1,
    active: int = 0,
    agents: tuple[str, ...] = ("echo",),
    labels: dict[str, str] | None = None,
    backends: frozenset[tuple[str, str]] = frozenset(),
    draining: bool = False,
) -> Candidate:
    """Every agent of the worker offers `backends` (see the per-agent tests for the rest)."""
    return Candidate(
        WorkerId(name), dict.fromkeys(agents, backends), labels or {}, capacity, active, draining
    )


def ids(plan: list[tuple[PendingRun, WorkerId]]) -> list[tuple[str, str]]:
    return [(p.run_id, w) for p, w in plan]


def test_run_goes_only_to_a_worker_announcing_its_agent() -> None:
    q = PendingQueue()
    q.add(run(1, agent="claude_code"))
    assert q.plan([worker("a")]) == []
    assert ids(q.plan([worker("b", agents=("claude_code",))])) == [("r1", "b")]


def test_required_labels_must_all_match() -> None:
    q = PendingQueue()
    q.add(run(1, required_labels=(("gpu", "a100"), ("zone", "eu"))))
    assert q.plan([worker("a", labels={"gpu": "a100"})]) == []
    assert q.plan([worker("b", labels={"gpu": "h100", "zone": "eu"})]) == []
    plan = q.plan([worker("c", labels={"gpu": "a100", "zone": "eu", "extra": "x"})])
    assert ids(plan) == [("r1", "c")]


def test_capacity_is_respected() -> None:
    q = PendingQueue()
    for n in range(5):
        q.add(run(n))
    plan = q.plan([worker("a", capacity=3, active=1)])
    assert len(plan) == 2
    assert len(q) == 3


def test_higher_priority_first_then_oldest() -> None:
    q = PendingQueue()
    q.add(run(1, priority=0))
    q.add(run(2, priority=5))
    q.add(run(3, priority=0))
    q.add(run(4, priority=5))
    plan = q.plan([worker("a", capacity=4)])
    assert [p.run_id for p, _ in plan] == ["r2", "r4", "r1", "r3"]


def test_priority_is_global_across_requirement_groups() -> None:
    q = PendingQueue()
    q.add(run(1, priority=1))
    q.add(run(2, priority=9, required_labels=(("gpu", "yes"),)))
    plan = q.plan([worker("a", capacity=1, labels={"gpu": "yes"})])
    assert ids(plan) == [("r2", "a")]


def test_least_loaded_worker_first() -> None:
    q = PendingQueue()
    for n in range(4):
        q.add(run(n))
    busy = worker("busy", capacity=4, active=3)
    idle = worker("idle", capacity=4, active=0)
    plan = q.plan([busy, idle])
    # idle fills until it is as loaded as busy (3 of 4); then the tie goes by name
    assert [w for _, w in plan] == ["idle", "idle", "idle", "busy"]


def test_draining_worker_gets_nothing() -> None:
    q = PendingQueue()
    q.add(run(1))
    assert q.plan([worker("a", capacity=5, draining=True)]) == []
    assert len(q) == 1


def test_unfit_run_waits_and_does_not_block_others() -> None:
    q = PendingQueue()
    q.add(run(1, agent="nobody_has_this", priority=100))
    q.add(run(2))
    assert ids(q.plan([worker("a")])) == [("r2", "a")]
    assert "r1" in q


def test_removed_run_is_never_planned() -> None:
    q = PendingQueue()
    q.add(run(1))
    q.add(run(2))
    assert q.remove(RunId("r1")) is not None
    assert ids(q.plan([worker("a", capacity=2)])) == [("r2", "a")]
    assert len(q) == 0


def test_required_provider_and_model() -> None:
    q = PendingQueue()
    q.add(run(1, provider="anthropic", model="claude-x"))
    other = worker("a", backends=frozenset({("anthropic", "claude-y")}))
    right = worker("b", backends=frozenset({("anthropic", "claude-x")}))
    assert q.plan([other]) == []
    assert ids(q.plan([other, right])) == [("r1", "b")]


def test_depth_by_agent() -> None:
    q = PendingQueue()
    q.add(run(1))
    q.add(run(2, agent="other"))
    q.add(run(3))
    assert q.depth_by_agent() == {"echo": 2, "other": 1}


def test_follow_up_is_pinned_to_the_worker_holding_its_session() -> None:
    q = PendingQueue()
    q.add(run(1, worker_id="busy"))
    idle = worker("idle", capacity=4)
    assert q.plan([idle]) == []
    assert ids(q.plan([idle, worker("busy", capacity=4, active=3)])) == [("r1", "busy")]


# -- per agent: requirements match the agent's own backends ---------------------------------------


def test_a_provider_requirement_matches_the_agents_own_backends_not_the_workers() -> None:
    q = PendingQueue()
    q.add(run(1, agent="echo", provider="anthropic"))
    mixed = Candidate(
        WorkerId("a"),
        {"echo": frozenset({("none", "echo")}), "anthropic": frozenset({("anthropic", "m")})},
        {},
        4,
        0,
    )
    assert q.plan([mixed]) == []  # the worker offers anthropic, but not for echo
    assert len(q) == 1


def test_a_model_requirement_goes_to_the_worker_whose_agent_offers_that_model() -> None:
    q = PendingQueue()
    q.add(run(1, agent="anthropic", model="claude-opus-5-5"))
    sonnet = Candidate(
        WorkerId("a"), {"anthropic": frozenset({("anthropic", "claude-sonnet-5-5")})}, {}, 4, 0
    )
    opus = Candidate(
        WorkerId("b"), {"anthropic": frozenset({("anthropic", "claude-opus-5-5")})}, {}, 4, 3
    )
    assert ids(q.plan([sonnet, opus])) == [("r1", "b")]  # busier, but the only fit


def test_backends_fit_is_a_pure_match_of_provider_and_model() -> None:
    offered = [("anthropic", "claude-sonnet-5-5"), ("openai", "gpt-x")]
    assert backends_fit("", "", [])
    assert backends_fit("anthropic", "", offered)
    assert backends_fit("", "gpt-x", offered)
    assert not backends_fit("anthropic", "gpt-x", offered)
    assert not backends_fit("none", "", offered)


def test_a_retry_prefers_another_worker_than_the_one_that_failed_it() -> None:
    q = PendingQueue()
    q.add(run(1, avoid="a"))
    # "a" is idle and "b" busier: without the preference the idle one would win
    assert ids(q.plan([worker("a", capacity=4), worker("b", capacity=4, active=2)])) == [
        ("r1", "b")
    ]


def test_a_retry_still_goes_to_the_failed_worker_when_it_is_the_only_fit() -> None:
    q = PendingQueue()
    q.add(run(1, avoid="a"))
    assert ids(q.plan([worker("a")])) == [("r1", "a")]


def test_a_quarantined_or_draining_worker_gets_nothing() -> None:
    q = PendingQueue()
    q.add(run(1))
    assert q.plan([worker("a", capacity=4, draining=True)]) == []
    assert len(q) == 1
