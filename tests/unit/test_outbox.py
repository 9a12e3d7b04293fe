"""The worker's outbox packs what it has to send into messages that fit the server's limit."""

from __future__ import annotations

from pathlib import Path

from taskrun.core.ids import RunId, TaskId
from taskrun.v1 import common_pb2 as pb
from taskrun.v1 import workers_pb2 as wpb
from taskrun.worker.executor import RunContext
from taskrun.worker.outbox import Outbox
from taskrun.worker.workspace import Workspaces


def completed(run_id: str, result_bytes: int) -> wpb.RunStatusUpdate:
    return wpb.RunStatusUpdate(
        run_id=run_id,
        attempt=1,
        status=pb.RUN_STATUS_COMPLETED,
        result_json='"' + "r" * result_bytes + '"',
    )


async def test_status_updates_count_what_they_carry_towards_a_messages_size() -> None:
    outbox = Outbox()
    for i in range(3):
        outbox.put_nowait(completed(f"run_{i}", 900_000))
    sizes = []
    while (message := outbox.take(1000, 1024 * 1024)) is not None:
        sizes.append(message.ByteSize())
        assert len(message.statuses) == 1
    assert len(sizes) == 3 and max(sizes) <= 1024 * 1024


async def test_small_updates_still_share_a_message() -> None:
    outbox = Outbox()
    for i in range(50):
        outbox.put_nowait(completed(f"run_{i}", 10))
    message = outbox.take(1000, 1024 * 1024)
    assert message is not None and len(message.statuses) == 50


async def test_output_of_many_byte_characters_counts_its_utf8_size(tmp_path: Path) -> None:
    outbox = Outbox(max_bytes=64 * 1024 * 1024)
    ctx = RunContext(
        task_id=TaskId("tsk_1"),
        run_id=RunId("run_1"),
        attempt=1,
        input={},
        resume_session_id="",
        prompt="",
        outbox=outbox,
        max_chunk_bytes=64 * 1024,
        workspaces=Workspaces(tmp_path, ()),
    )
    await ctx.emit("語" * 1_000_000)  # 3 MB of UTF-8 in chunks of 16,384 characters
    sizes = []
    while (message := outbox.take(1000, 1024 * 1024)) is not None:
        sizes.append(message.ByteSize())
    assert sum(sizes) > 3_000_000 and max(sizes) <= 1024 * 1024
