"""A claude_code conversation outlives its worker's machine: worker processes with their own
HOME (their own disk for Claude Code's sessions); the first is killed with SIGKILL and the next
turn resumes the same session on the second, from the snapshot the control plane kept.
"""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from taskrun.cli.client import TurnEnded
from taskrun.controlplane.pki import PkiPaths
from taskrun.core.status import TaskStatus
from tests.e2e.test_faults import Processes, online
from tests.fakes.anthropic_server import FakeAnthropic, Text

pytestmark = pytest.mark.e2e
pytest.importorskip("claude_agent_sdk", reason="needs the taskrun[claude] extra")

KEY = "sk-ant-test-key"


@pytest.fixture
async def procs(pki: PkiPaths, tmp_path: Path) -> AsyncIterator[Processes]:
    p = Processes(pki, tmp_path)
    for name in list(p.env):
        if name.startswith(("ANTHROPIC_", "CLAUDE_", "TASKRUN_CLAUDE_", "TASKRUN_ANTHROPIC_")):
            del p.env[name]
    try:
        yield p
    finally:
        p.stop()


def sessions(home: Path) -> list[Path]:
    return sorted(home.glob(".claude/projects/*/*.jsonl"))


async def test_a_claude_code_conversation_continues_on_another_machine_after_kill_9(
    procs: Processes, tmp_path: Path
) -> None:
    workdir = tmp_path / "repo"
    workdir.mkdir()
    homes = {w: tmp_path / f"home-{w}" for w in ("worker-1", "worker-2")}
    with FakeAnthropic(api_key=KEY) as api:
        procs.env.update(
            ANTHROPIC_BASE_URL=api.base_url,
            ANTHROPIC_API_KEY=KEY,
            CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
            CLAUDE_CODE_MAX_RETRIES="0",
        )
        procs.start_server()
        for home in homes.values():
            home.mkdir()
        procs.env["HOME"] = str(homes["worker-1"])
        procs.start_worker("worker-1", agents="claude_code", allow_cwd=workdir)
        async with procs.client() as client:
            await online(client, "worker-1")
            api.enqueue(Text("I will remember 7."))
            conversation, turn = await client.create_conversation(
                "claude_code", "Remember the number 7.", options={"cwd": str(workdir)}
            )
            first = await client.wait(turn.task_id)
            assert first.status is TaskStatus.COMPLETED, first.error
            [kept] = sessions(homes["worker-1"])

            worker1 = procs.workers["worker-1"]
            worker1.send_signal(signal.SIGKILL)
            worker1.wait(10)
            procs.env["HOME"] = str(homes["worker-2"])
            procs.start_worker("worker-2", agents="claude_code", allow_cwd=workdir)
            await online(client, "worker-2")
            assert sessions(homes["worker-2"]) == []  # nothing of the session on this machine

            api.enqueue(Text("The number was 7."))
            events = []
            chat = client.chat("Which number?", conversation_id=conversation.id)
            async with contextlib.aclosing(chat) as stream:
                async for event in stream:
                    events.append(event)
            ended = events[-1]
            assert isinstance(ended, TurnEnded), events
            assert ended.turn.status is TaskStatus.COMPLETED, ended.turn.error
            assert ended.turn.answer == "The number was 7."
            _, [run] = await client.get_task(ended.turn.task_id)
            _, [first_run] = await client.get_task(turn.task_id)
    assert run.worker_id == "worker-2"
    assert run.session_id == first_run.session_id == kept.stem  # the same session, resumed
    assert [p.name for p in sessions(homes["worker-2"])] == [kept.name]
    request = api.message_requests[-1]
    sent = json.dumps(request.messages)
    assert "Remember the number 7." in sent and "I will remember 7." in sent
    assert "conversation so far" not in sent  # the session itself, not a transcript preamble
    assert request.last_user_text() == "Which number?"
