"""The transcript a conversation's next turn is given (core.models.transcript)."""

from __future__ import annotations

from datetime import UTC, datetime

from taskrun.core.ids import ConversationId, TaskId
from taskrun.core.models import TranscriptMessage, Turn, estimated_tokens, transcript
from taskrun.core.status import TaskStatus

T0 = datetime(2026, 12, 1, tzinfo=UTC)


def turn(index: int, status: TaskStatus, **fields: object) -> Turn:
    t = Turn(ConversationId("cnv_1"), index, TaskId(f"tsk_{index}"), f"m{index}", T0, status)
    for name, value in fields.items():
        setattr(t, name, value)
    return t


def test_each_turn_gives_its_message_and_answer_in_order() -> None:
    turns = [
        turn(1, TaskStatus.COMPLETED, answer="a1"),
        turn(2, TaskStatus.COMPLETED, answer="a2", tools='[{"tool":"Read"}]'),
    ]
    assert transcript(turns) == (
        TranscriptMessage("user", "m1", 1),
        TranscriptMessage("assistant", "a1", 1),
        TranscriptMessage("user", "m2", 2),
        TranscriptMessage("assistant", '[tools used: [{"tool":"Read"}]]\na2', 2),
    )


def test_a_failed_or_cancelled_turn_keeps_its_message_and_says_how_it_ended() -> None:
    turns = [
        turn(1, TaskStatus.FAILED, error="overloaded"),
        turn(2, TaskStatus.CANCELLED, error="cancelled: too slow"),
    ]
    assert [m.text for m in transcript(turns)] == [
        "m1",
        "(this turn failed: overloaded)",
        "m2",
        "(this turn cancelled: cancelled: too slow)",
    ]


def test_summarized_turns_are_replaced_by_the_summary() -> None:
    turns = [turn(i, TaskStatus.COMPLETED, answer=f"a{i}") for i in (1, 2, 3)]
    messages = transcript(turns, "they talked", 2)
    assert [(m.role, m.text, m.turn) for m in messages] == [
        ("user", "Summary of our conversation so far:\nthey talked", 0),
        ("assistant", "Understood.", 0),
        ("user", "m3", 3),
        ("assistant", "a3", 3),
    ]


def test_estimated_tokens_grow_with_the_text() -> None:
    short = transcript([turn(1, TaskStatus.COMPLETED, answer="x")])
    long = transcript([turn(1, TaskStatus.COMPLETED, answer="x" * 4000)])
    assert estimated_tokens(long, "q") > estimated_tokens(short, "q") + 900
