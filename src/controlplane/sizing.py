"""Answers that fit one gRPC message.

The server receives `max_message_bytes` and 1 MiB more, and may send 2 MiB more (app.py): the
budget is what a page or an update fills; the headroom is for one item larger than it (a task
with an input and a result of up to 1 MiB each), and a reply may hold a little more than the
request it answers (CreateTasks answers with every task as created). A page cut short goes on
through its token; a follow's output goes out in as many updates as it takes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from google.protobuf.message import Message

from taskrun.core.models import OutputChunk
from taskrun.core.text import utf8_size
from taskrun.v1 import workflows_pb2

M = TypeVar("M", bound=Message)

OUTPUT_BATCH = 1000  # chunks in one follow update at most, whatever their size
RECEIVE_HEADROOM = 1024 * 1024  # over max_message_bytes
SEND_HEADROOM = 2 * 1024 * 1024

# The chunks of one follow update, and whether the task's state goes with them.
Part = tuple[list[OutputChunk], bool]


def fitting(messages: Iterable[M], budget: int, *, at_least: int = 1) -> tuple[list[M], bool]:
    """The first of `messages` that fit in one message of `budget` bytes, and whether any were
    left out; `at_least` of them whatever they take (a page's one item is what the headroom
    over the budget is for). Taken one by one: what is left out is never built."""
    taken: list[M] = []
    used = 0
    for message in messages:
        used += message.ByteSize() + 8
        if len(taken) >= at_least and used > budget:
            return taken, True
        taken.append(message)
    return taken, False


def chunk_bytes(chunk: OutputChunk) -> int:
    """About what the chunk takes in a message: its text as UTF-8, and room for the rest."""
    return utf8_size(chunk.data) + 64


def output_updates(
    chunks: list[OutputChunk], state_bytes: int | None, budget: int, *, opening: bool
) -> list[Part]:
    """How a follow sends `chunks` and, when `state_bytes` is given, the task's state: groups of
    at most OUTPUT_BATCH chunks within `budget` bytes, in order (one empty group when there are
    none). The state goes with the last group (after all of the output) and, when `opening`,
    with the first too (a replay opens with the task, however much output follows); alone
    where it does not fit beside them."""
    groups: list[tuple[list[OutputChunk], int]] = [([], 0)]
    for chunk in chunks:
        size = chunk_bytes(chunk)
        group, used = groups[-1]
        if group and (len(group) >= OUTPUT_BATCH or used + size > budget):
            groups.append(([], 0))
            group, used = groups[-1]
        group.append(chunk)
        groups[-1] = (group, used + size)
    parts: list[Part] = [(group, False) for group, _ in groups]
    if state_bytes is None:
        return parts
    last, used = groups[-1]
    if not last or used + state_bytes <= budget:
        parts[-1] = (last, True)
    else:
        parts.append(([], True))
    if opening and not parts[0][1]:
        first, used = groups[0]
        if used + state_bytes <= budget:
            parts[0] = (first, True)
        else:
            parts.insert(0, ([], True))
    return parts


def leave_out_results(run: workflows_pb2.WorkflowRun, budget: int) -> workflows_pb2.WorkflowRun:
    """`run` within `budget` bytes where its step results are what passes it (a hundred steps
    may each hold a result of 1 MiB): the largest are left out first, each marked so (a
    reader asks for them one step at a time). The steps themselves are always all there."""
    over = run.ByteSize() - budget
    if over <= 0:
        return run
    for step in sorted(run.steps, key=lambda s: len(s.result_json), reverse=True):
        if over <= 0 or not step.result_json:
            break
        over -= utf8_size(step.result_json)  # and its tag and length: what is left is less
        step.result_json = ""
        step.result_left_out = True
    return run
