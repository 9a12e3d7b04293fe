"""The dispatcher decides which pending run goes to which worker."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

from taskrun.controlplane.dispatcher import (
    ROUND_SPREAD,
    Candidate,
    PendingQueue,
    PendingRun,
    Requirement,
    WorkerIndex,
    backends_fit,
)
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


def scan_plan(
    q: PendingQueue, workers: list[Candidate], spread: int = ROUND_SPREAD
) -> list[tuple[str, str]]:
    """The plan by the definition, by scans over every worker (what the index must reproduce):
    the best pending run that some free worker fits goes to the worker holding an open batch of
    its requirement, else to the least loaded free worker that fits it, which opens a batch of
    ceil(runs waiting for that requirement / spread) runs."""
    pending = sorted(q._entries.values(), key=lambda r: (-r.priority, r.order))
    waiting = Counter(r.requirement for r in pending)
    batches: dict[object, tuple[Candidate, int]] = {}
    out: list[tuple[str, str]] = []
    taken: set[str] = set()
    while True:
        for entry in pending:
            if entry.run_id in taken:
                continue
            req = entry.requirement
            fitting = [w for w in workers if w.free > 0 and w.fits(req)]
            if fitting:
                held, left = batches.get(req, (None, 0))
                if held is not None and left > 0 and held.free > 0:
                    best, left = held, left - 1
                else:
                    key = lambda w: (w.active / w.capacity, w.active, w.worker_id)  # noqa: E731
                    best, left = min(fitting, key=key), -(-waiting[req] // spread) - 1
                batches[req] = (best, left)
                best.active += 1
                taken.add(entry.run_id)
                out.append((entry.run_id, best.worker_id))
                break
        else:
            return out


Shape = list[tuple[str, int, tuple[str, ...], dict[str, str], bool]]


def fleet(shape: Shape, loads: list[int]) -> list[Candidate]:
    return [
        worker(n, capacity=c, active=min(c, a), agents=ag, labels=dict(lb), draining=d)
        for (n, c, ag, lb, d), a in zip(shape, loads, strict=True)
    ]


def test_the_index_plans_as_a_scan_over_every_worker_would() -> None:
    rng = random.Random(7)
    for _ in range(200):
        q, reference = PendingQueue(), PendingQueue()
        for n in range(rng.randint(0, 30)):
            priority = rng.choice((0, 0, 1, 5))
            kw: dict[str, object] = {}
            if rng.random() < 0.3:
                kw["required_labels"] = (("gpu", rng.choice(("a", "b"))),)
            if rng.random() < 0.1:
                kw["worker_id"] = f"w{rng.randint(0, 9)}"
            agent = rng.choice(("echo", "echo", "claude_code"))
            q.add(run(n, agent, priority, **kw))
            reference.add(run(n, agent, priority, **kw))
        shape: Shape = [
            (
                f"w{i}",
                rng.randint(1, 4),
                rng.choice((("echo",), ("echo", "claude_code"), ("claude_code",))),
                {"gpu": rng.choice(("a", "b"))} if rng.random() < 0.5 else {},
                rng.random() < 0.1,
            )
            for i in range(rng.randint(0, 10))
        ]

        loads = [rng.randint(0, 3) for _ in shape]
        index = WorkerIndex(fleet(shape, loads))
        # loads change after the index was built, and the index is told
        for i, w in enumerate(list(fleet(shape, loads))):
            if rng.random() < 0.3 and (got := index.get(w.worker_id)) is not None:
                got.active = max(0, got.active - 1)
                loads[i] = got.active
                index.put(got)
        spread = rng.choice((1, 2, 3, ROUND_SPREAD))
        expected = scan_plan(reference, fleet(shape, loads), spread)
        assert ids(q.plan(index, spread)) == expected


def test_the_index_forgets_removed_workers_and_follows_load_changes() -> None:
    a, b = worker("a", capacity=2), worker("b", capacity=2)
    index = WorkerIndex([a, b])
    q = PendingQueue()
    for n in range(3):
        q.add(run(n))
    assert [w for _, w in q.plan(index)] == ["a", "b", "a"]
    assert (a.active, b.active) == (2, 1)
    a.active = 0  # a's runs ended
    index.put(a)
    index.remove(WorkerId("b"))
    for n in range(3, 6):
        q.add(run(n))
    assert [w for _, w in q.plan(index)] == ["a", "a"]
    a.draining = True
    index.put(a)
    q.add(run(9))
    a.active = 0
    assert q.plan(index) == []


# -- batches: runs planned together go out several per worker ------------------------------------


def many(n: int, capacity: int, prefix: str = "w") -> list[Candidate]:
    return [worker(f"{prefix}{i:04d}", capacity=capacity) for i in range(n)]


def per_worker(plan: list[tuple[PendingRun, WorkerId]]) -> Counter[str]:
    return Counter(w for _, w in plan)


def test_a_burst_goes_to_few_workers_in_batches_of_a_share_of_it() -> None:
    q = PendingQueue()
    for n in range(100):
        q.add(run(n))
    workers = many(1000, capacity=256)
    counts = per_worker(q.plan(WorkerIndex(workers)))
    share = -(-100 // ROUND_SPREAD)  # 25
    assert sum(counts.values()) == 100
    assert max(counts.values()) == share
    assert len(counts) == -(-100 // share) <= ROUND_SPREAD  # 4 workers, not 100
    # the batches went to the least loaded (all idle: by name), one after the other
    assert sorted(counts) == [f"w{i:04d}" for i in range(len(counts))]


def test_a_batch_is_in_queue_order_on_one_worker_then_the_next() -> None:
    q = PendingQueue()
    for n in range(6):
        q.add(run(n))
    plan = q.plan([worker("a", capacity=8), worker("b", capacity=8)], spread=2)
    assert ids(plan) == [
        ("r0", "a"),
        ("r1", "a"),
        ("r2", "a"),
        ("r3", "b"),
        ("r4", "b"),
        ("r5", "b"),
    ]


def test_a_trickle_of_single_runs_is_spread_least_loaded() -> None:
    q = PendingQueue()
    index = WorkerIndex(many(5, capacity=256))
    placed = []
    for n in range(10):  # one run per plan, none finishing
        q.add(run(n))
        placed += [w for _, w in q.plan(index)]
    assert placed == [f"w{i:04d}" for i in range(5)] * 2


def test_a_burst_smaller_than_the_spread_still_gets_one_worker_per_run() -> None:
    q = PendingQueue()
    for n in range(ROUND_SPREAD):
        q.add(run(n))
    counts = per_worker(q.plan(many(100, capacity=4)))
    assert len(counts) == ROUND_SPREAD and set(counts.values()) == {1}


def test_a_batch_stops_at_the_workers_free_slots_and_capacity_is_never_exceeded() -> None:
    q = PendingQueue()
    for n in range(200):
        q.add(run(n))
    workers = [*many(20, capacity=3), worker("busy", capacity=3, active=2)]
    plan = q.plan(WorkerIndex(workers))
    assert len(plan) == 20 * 3 + 1 and len(q) == 200 - 61
    assert all(w.active <= w.capacity for w in workers)
    assert per_worker(plan)["busy"] == 1


def test_batches_keep_priority_global_across_requirement_groups() -> None:
    q = PendingQueue()
    for n in range(40):
        q.add(run(n))  # a share of 3 per worker
    q.add(run(99, priority=9, required_labels=(("gpu", "yes"),)))
    q.add(run(98, priority=5))
    plan = q.plan([worker("a", capacity=2, labels={"gpu": "yes"}), worker("b", capacity=2)])
    # the label group's batch is a's; the plain one opens on the least loaded, b, until b is full
    assert ids(plan) == [("r99", "a"), ("r98", "b"), ("r0", "b"), ("r1", "a")]


def test_a_retry_in_a_burst_still_avoids_the_worker_that_failed_it() -> None:
    q = PendingQueue()
    for n in range(4):
        q.add(run(n, avoid="a" if n == 2 else ""))
    plan = q.plan([worker("a", capacity=8), worker("b", capacity=8)], spread=1)
    assert ids(plan) == [("r0", "a"), ("r1", "a"), ("r2", "b"), ("r3", "a")]


def test_removed_runs_do_not_count_in_a_batch_share() -> None:
    q = PendingQueue()
    for n in range(8 * ROUND_SPREAD):
        q.add(run(n))
    for n in range(1, 8 * ROUND_SPREAD, 2):
        q.remove(RunId(f"r{n}"))
    # 4 x ROUND_SPREAD left: a share of 4 each, as if the removed ones had never been queued
    # (with them, 8 each)
    assert set(per_worker(q.plan(many(32, capacity=16))).values()) == {4}


def test_a_spread_of_zero_places_every_run_on_the_least_loaded_worker() -> None:
    q = PendingQueue()
    for n in range(100):
        q.add(run(n))
    counts = per_worker(q.plan(many(1000, capacity=256), spread=0))
    assert len(counts) == 100 and set(counts.values()) == {1}


# -- requirements narrower than an agent -----------------------------------------------------------


class Counted(Candidate):
    """A candidate that counts how often the planner asks whether it fits."""

    __slots__ = ()
    asked = 0

    def fits(self, req: Requirement) -> bool:
        Counted.asked += 1
        return super().fits(req)


def test_runs_only_a_few_workers_may_take_look_at_those_few_not_past_every_worker() -> None:
    fleet = [
        Counted(
            WorkerId(f"w{i:04d}"), {"echo": frozenset()}, {"gpu": "a"} if i % 400 == 7 else {}, 1, 0
        )
        for i in range(1200)
    ]
    index = WorkerIndex(fleet)
    gpu = [w for w in fleet if w.labels]
    q = PendingQueue()
    for n in range(9):
        q.add(run(n, required_labels=(("gpu", "a"),)))
    assert sorted(w for _, w in q.plan(index)) == ["w0007", "w0407", "w0807"]
    Counted.asked = 0
    for round_ in range(20):  # their runs end, more come: placed on the same three
        for w in gpu:
            w.active = 0
            index.put(w)
        placed = q.plan(index)
        assert sorted(w for _, w in placed) == ["w0007", "w0407", "w0807"]
        for n in range(3):
            q.add(run(100 + 3 * round_ + n, required_labels=(("gpu", "a"),)))
    # about what the three were asked, each time: a walk past the 1,197 others would be 20 x 1,197
    assert Counted.asked < 20 * 30


AGENTS: list[tuple[str, ...]] = [("echo",), ("echo", "claude_code"), ("claude_code",)]
LABELS: list[dict[str, str]] = [{}, {"gpu": "a"}, {"gpu": "b"}, {"gpu": "a", "zone": "x"}]
BACKENDS = [frozenset(), frozenset({("anthropic", "m1")}), frozenset({("openai", "m2")})]


def test_a_long_lived_index_plans_as_a_scan_would_while_workers_come_go_and_change() -> None:
    rng = random.Random(11)
    for _ in range(80):
        index, live, n = WorkerIndex(), dict[str, Candidate](), 0
        for _round in range(6):
            for _change in range(rng.randint(0, 5)):
                name = f"w{rng.randint(0, 9)}"
                current = live.get(name)
                if current is not None and rng.random() < 0.2:
                    index.remove(WorkerId(name))
                    del live[name]
                    continue
                if current is None:
                    current = live[name] = worker(
                        name,
                        capacity=rng.randint(1, 4),
                        agents=rng.choice(AGENTS),
                        labels=dict(rng.choice(LABELS)),
                        backends=rng.choice(BACKENDS),
                    )
                else:  # runs ended, or what it can run changed
                    current.active = max(0, current.active - rng.randint(0, 3))
                    if rng.random() < 0.3:
                        current.agents = dict.fromkeys(rng.choice(AGENTS), rng.choice(BACKENDS))
                    current.draining = rng.random() < 0.1
                index.put(current)
            q, reference = PendingQueue(), PendingQueue()
            for _run in range(rng.randint(0, 12)):
                agent, priority = rng.choice(("echo", "claude_code")), rng.choice((0, 0, 1))
                labels = tuple(sorted(rng.choice(LABELS).items())) if rng.random() < 0.5 else ()
                provider = rng.choice(("anthropic", "openai")) if rng.random() < 0.2 else ""
                for queue in (q, reference):
                    queue.add(run(n, agent, priority, required_labels=labels, provider=provider))
                n += 1
            spread = rng.choice((1, 2, ROUND_SPREAD))
            expected = scan_plan(reference, [replace(w) for w in live.values()], spread)
            assert ids(q.plan(index, spread)) == expected
