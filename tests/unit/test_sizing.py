"""How follow updates and pages are cut to fit one message (controlplane.sizing)."""

from __future__ import annotations

from collections.abc import Iterator

from google.protobuf.timestamp_pb2 import Timestamp

from taskrun.controlplane.sizing import OUTPUT_BATCH, chunk_bytes, fitting, output_updates
from taskrun.core.ids import RunId
from taskrun.core.models import OutputChunk


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
