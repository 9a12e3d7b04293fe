"""How follow updates, pages and workflow runs are cut to fit one message (controlplane.sizing,
controlplane.pages), and what a worker reports is bounded (core.validation)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from taskrun.controlplane.pages import page_token, position_token, token_field, token_position
from taskrun.controlplane.sizing import (
    OUTPUT_BATCH,
    chunk_bytes,
    fitting,
    leave_out_results,
    output_updates,
)
from taskrun.core.errors import InvalidArgument
from taskrun.core.ids import RunId
from taskrun.core.models import MAX_SESSION_SNAPSHOT_BYTES, ModelBackend, OutputChunk
from taskrun.core.validation import bounded_backend, kept_session_id, kept_snapshot
from taskrun.v1 import workflows_pb2


def chunks(*sizes: int) -> list[OutputChunk]:
    return [OutputChunk(RunId("run_1"), 1, i, "x" * n) for i, n in enumerate(sizes, 1)]


def shape(parts: list[tuple[list[OutputChunk], bool]]) -> list[tuple[list[int], bool]]:
    return [([c.seq for c in group], state) for group, state in parts]


def test_output_is_grouped_by_bytes_and_count_in_order() -> None:
    budget = 3 * chunk_bytes(chunks(100)[0])
    assert shape(output_updates(chunks(*[100] * 7), None, budget, opening=False)) == [
        ([1, 2, 3], False),
        ([4, 5, 6], False),
        ([7], False),
    ]
    many = output_updates(chunks(*[1] * (OUTPUT_BATCH + 1)), None, 10**9, opening=False)
    assert [len(group) for group, _ in many] == [OUTPUT_BATCH, 1]
    assert shape(output_updates(chunks(10_000), None, 100, opening=False)) == [([1], False)]


def test_the_state_comes_after_all_output_and_opens_a_replay_alone_where_it_does_not_fit() -> None:
    budget = 3 * chunk_bytes(chunks(100)[0])
    two = chunks(100, 100)
    assert shape(output_updates(two, 10, budget, opening=False)) == [([1, 2], True)]
    assert shape(output_updates(two, 10, budget, opening=True)) == [([1, 2], True)]
    assert shape(output_updates([], 10, budget, opening=True)) == [([], True)]
    # a state too large to go beside the output: alone, after it (and first when opening)
    assert shape(output_updates(two, budget, budget, opening=False)) == [
        ([1, 2], False),
        ([], True),
    ]
    assert shape(output_updates(two, budget, budget, opening=True)) == [
        ([], True),
        ([1, 2], False),
        ([], True),
    ]
    # the first group is full: the opening state goes alone before it; the last has room
    five = chunks(*[100] * 5)
    assert shape(output_updates(five, 10, budget, opening=True)) == [
        ([], True),
        ([1, 2, 3], False),
        ([4, 5], True),
    ]


def test_a_page_takes_what_fits_builds_nothing_past_it_and_says_it_was_cut() -> None:
    built: list[int] = []

    def messages(n: int) -> Iterator[Timestamp]:
        for i in range(n):
            built.append(i)
            yield Timestamp(seconds=10**9 + i)  # 6 bytes each, 14 with the room per item

    taken, cut = fitting(messages(10), 40)
    assert (len(taken), cut, built) == (2, True, [0, 1, 2])  # the third is seen, not taken
    assert fitting(messages(2), 10**6) == (list(taken), False)
    assert fitting(messages(3), 0) == ([Timestamp(seconds=10**9)], True)  # one at least
    assert fitting(messages(3), 0, at_least=0) == ([], True)


def test_a_workflow_run_leaves_out_its_largest_results_first_and_keeps_every_step() -> None:
    run = workflows_pb2.WorkflowRun(id="wfr_1")
    for name, size in [("a", 10), ("b", 5000), ("c", 3000), ("d", 0)]:
        run.steps.add(name=name, result_json=json.dumps("r" * size) if size else "")
    whole = run.ByteSize()
    assert leave_out_results(run, whole).ByteSize() == whole  # fits: untouched
    cut = leave_out_results(run, whole - 100)
    assert [(s.name, s.result_left_out) for s in cut.steps] == [
        ("a", False),
        ("b", True),
        ("c", False),
        ("d", False),
    ]
    assert cut.ByteSize() <= whole - 100 and cut.steps[1].result_json == ""
    assert [s.result_left_out for s in leave_out_results(run, 200).steps] == [
        False,
        True,
        True,
        False,
    ]


def test_page_tokens_round_trip_and_anything_else_is_refused_naming_the_call() -> None:
    assert token_field(page_token("tsk_1"), "ListTasks") == "tsk_1"
    assert token_field("", "ListTasks") == ""
    when = datetime(2026, 12, 3, 12, 0, 0, 123456, tzinfo=UTC)
    assert token_position(position_token(when, "wfr_a:b"), "ListWorkflowRuns") == (when, "wfr_a:b")
    assert token_position("", "ListWorkflowRuns") is None
    for bad in ["bogus", page_token("x", "y"), page_token("soon", "wfr_1"), "v1" * 300]:
        with pytest.raises(InvalidArgument) as refused:
            token_position(bad, "ListWorkflowRuns")
        assert refused.value.field == "page_token"
        assert "ListWorkflowRuns" in str(refused.value)


def test_what_a_worker_reports_is_kept_within_bounds() -> None:
    real = ModelBackend("anthropic", "claude-sonnet-5-5", 200_000, ("text",), ("Read",))
    assert bounded_backend(real) == real
    huge = ModelBackend("p" * 100, "m" * 1000, 1, ("text",) * 100, ("t" * 300,) * 100)
    kept = bounded_backend(huge)
    assert (len(kept.provider), len(kept.model_name)) == (64, 256)
    assert len(kept.tools) == len(kept.modalities) == 64 and len(kept.tools[0]) == 256
    assert (kept_session_id("sess-1"), kept_snapshot(b"zip")) == ("sess-1", b"zip")
    too_big = b"z" * (MAX_SESSION_SNAPSHOT_BYTES + 1)
    assert (kept_session_id("s" * 257), kept_snapshot(too_big)) == ("", b"")
