"""claude_code bounded and honest, with the task's settings: the real Claude Code CLI bundled in
claude-agent-sdk against the fake Messages API on loopback (as in test_agents_claude_code.py),
directly and through a real control plane and worker."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from taskrun.core.agent import AgentError, CostLimitReached
from taskrun.core.ids import ConversationId
from taskrun.core.models import ModelSettings, RunOptions, TurnContext, Usage
from taskrun.core.status import RunStatus, TaskStatus
from taskrun.worker.agents.claude_code import ClaudeCodeAgent
from tests.conftest import Cluster
from tests.fakes.anthropic_server import FakeAnthropic, Text, ToolUse
from tests.fakes.run_context import RecordingContext

pytest.importorskip("claude_agent_sdk", reason="needs the taskrun-agents[claude] extra")

KEY = "sk-ant-test-key"
SCHEMA = {
    "type": "object",
    "properties": {"verdict": {"enum": ["yes", "no"]}},
    "required": ["verdict"],
}


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeAnthropic]:
    home = tmp_path / "home"
    home.mkdir()
    with FakeAnthropic(api_key=KEY) as fake:
        for name in list(os.environ):
            if name.startswith(("ANTHROPIC_", "CLAUDE_", "TASKRUN_CLAUDE_", "TASKRUN_ANTHROPIC_")):
                monkeypatch.delenv(name)
        for name, value in {
            "ANTHROPIC_BASE_URL": fake.base_url,
            "ANTHROPIC_API_KEY": KEY,
            "HOME": str(home),
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "TASKRUN_ANTHROPIC_MAX_RETRIES": "0",
        }.items():
            monkeypatch.setenv(name, value)
        yield fake


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    (path / "notes.txt").write_text("the secret is 42\n")
    return path


async def test_a_401_fails_within_taskruns_retry_limit_on_a_worker(
    api: FakeAnthropic, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-wrong")
    monkeypatch.setenv("TASKRUN_ANTHROPIC_MAX_RETRIES", "1")
    monkeypatch.setenv("CLAUDE_CODE_MAX_RETRIES", "10")  # TaskRun's setting wins over this
    await cluster.start_server()
    await cluster.start_worker("worker-1", agents=["claude_code"])
    client = cluster.client()
    task = await client.create_task("claude_code", {"prompt": "hi"}, max_attempts=1)
    final = await client.wait(task.id)
    assert final.status is TaskStatus.FAILED
    assert final.error.startswith("authentication failed: check ANTHROPIC_API_KEY (HTTP 401")
    assert "after 1 retries" in final.error and "Invalid API key" in final.error
    assert len(api.message_requests) == 2  # the first call and one retry


async def test_the_cli_retries_twice_by_default_not_ten_times(
    api: FakeAnthropic, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TASKRUN_ANTHROPIC_MAX_RETRIES")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-wrong")
    with pytest.raises(AgentError, match="HTTP 401"):
        await ClaudeCodeAgent().run(RecordingContext(input={"prompt": "hi"}))
    assert len(api.message_requests) == 3


async def test_no_credentials_says_what_to_set_on_the_worker(
    api: FakeAnthropic, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    with pytest.raises(AgentError) as err:
        await ClaudeCodeAgent().run(RecordingContext(input={"prompt": "hi"}))
    message = str(err.value)
    assert message.startswith(
        "no credentials for claude_code on this worker: set ANTHROPIC_API_KEY"
    )
    assert "Please run /login" in message  # what the CLI said, kept after the explanation
    assert api.message_requests == []


@pytest.mark.skipif(os.geteuid() != 0, reason="the CLI refuses bypassPermissions only as root")
async def test_a_cli_that_refuses_to_start_says_why_from_its_stderr(api: FakeAnthropic) -> None:
    ctx = RecordingContext(input={"prompt": "hi", "permission_mode": "bypassPermissions"})
    with pytest.raises(AgentError) as err:
        await ClaudeCodeAgent().run(ctx)
    message = str(err.value)
    assert "--dangerously-skip-permissions cannot be used with root/sudo privileges" in message
    assert "run it as another user" in message
    assert "Check stderr output for details" not in message


async def test_model_settings_reach_claude_code(api: FakeAnthropic, workdir: Path) -> None:
    api.enqueue(
        Text("checking", tool_uses=(ToolUse("Bash", {"command": "echo mode=$RUN_MODE"}),)),
        Text("done"),
    )
    settings = ModelSettings(
        append_system_prompt="Always answer in haiku.",
        max_tokens=321,
        env={"RUN_MODE": "ci-42"},
        mcp_servers=json.dumps({"probe": {"command": "/bin/false"}}),
        allowed_tools=["Bash"],
        disallowed_tools=["Read"],
    )
    ctx = RecordingContext(
        input={"prompt": "go", "cwd": str(workdir)}, options=RunOptions(model_settings=settings)
    )
    result = await ClaudeCodeAgent().run(ctx)
    first, second = api.message_requests
    assert "Always answer in haiku." in " ".join(b["text"] for b in first.body["system"])
    assert first.body["max_tokens"] == 321
    assert "mode=ci-42" in json.dumps(second.tool_results())  # the env reached the tool
    assert result.backend_used is not None
    assert "Bash" in result.backend_used.tools and "Read" not in result.backend_used.tools
    [session] = ctx.events_of("session")
    assert [s["name"] for s in session["mcp_servers"]] == ["probe"]
    assert ctx.events_of("tool_refused") == []


async def test_temperature_is_refused_for_claude_code(api: FakeAnthropic) -> None:
    ctx = RecordingContext(
        input={"prompt": "hi"}, options=RunOptions(model_settings=ModelSettings(temperature=0.5))
    )
    with pytest.raises(AgentError, match=r"claude_code does not take a temperature"):
        await ClaudeCodeAgent().run(ctx)
    assert api.requests == []


async def test_output_schema_is_reasked_in_the_same_session(api: FakeAnthropic) -> None:
    api.enqueue(Text('{"verdict": "maybe"}'), Text('{"verdict": "no"}'))
    ctx = RecordingContext(input={"prompt": "Is it raining?"})
    ctx.options = RunOptions(output_schema=SCHEMA, output_retries=1)
    result = await ClaudeCodeAgent().run(ctx)
    assert result.result == {"verdict": "no"}
    first, again = api.message_requests
    assert json.dumps(SCHEMA) in " ".join(b["text"] for b in first.body["system"])
    assert "did not match the schema" in again.last_user_text()
    assert "'maybe' is not one of" in again.last_user_text()
    assert [e["valid"] for e in ctx.events_of("output_attempt")] == [False, True]
    assert result.usage.input_tokens == 24 and result.usage.turns == 2  # both queries counted


async def test_output_schema_exhausted_fails_listing_the_errors(api: FakeAnthropic) -> None:
    api.default = Text("no JSON here")
    ctx = RecordingContext(input={"prompt": "Is it raining?"})
    ctx.options = RunOptions(output_schema=SCHEMA, output_retries=1)
    with pytest.raises(AgentError, match="did not match the output schema after 2 attempts") as e:
        await ClaudeCodeAgent().run(ctx)
    assert "not valid JSON" in str(e.value)
    assert e.value.usage is not None and e.value.usage.input_tokens == 24


async def test_a_refused_tool_shows_in_the_output_and_the_result(
    api: FakeAnthropic, workdir: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.txt"
    bash = ToolUse("Bash", {"command": f"touch {outside}"})
    api.enqueue(Text("let me", tool_uses=(bash,)), Text("I could not."))
    ctx = RecordingContext(input={"prompt": "touch it", "cwd": str(workdir)})
    result = await ClaudeCodeAgent().run(ctx)
    [refused] = ctx.events_of("tool_refused")
    assert refused["name"] == "Bash" and refused["permission_mode"] == "default"
    assert refused["input"] == {"command": f"touch {outside}"}
    assert refused["reason"]  # what Claude Code told the model
    [warning] = result.result["warnings"]
    assert warning.startswith("1 tool call refused by permission mode default: Bash")
    assert not outside.exists()

    api.enqueue(Text("let me", tool_uses=(bash,)), Text("I could not."))
    strict = RecordingContext(
        input={"prompt": "touch it", "cwd": str(workdir), "fail_on_refused_tools": True}
    )
    with pytest.raises(AgentError, match="1 tool call refused by permission mode default: Bash"):
        await ClaudeCodeAgent().run(strict)


async def test_cost_limit_stops_a_claude_code_session_on_a_worker(
    api: FakeAnthropic, cluster: Cluster, workdir: Path
) -> None:
    notes = str(workdir / "notes.txt")
    # every call asks for another Read; $2 per million input tokens: $0.02 a call. A call
    # takes 0.2 s, still far quicker than a real one: an instant fake lets the CLI run calls
    # ahead of a worker on a loaded machine (6 calls were seen), which no real API does
    api.default = Text(
        "again",
        input_tokens=10_000,
        tool_uses=(ToolUse("Read", {"file_path": notes}),),
        delay=0.2,
    )
    await cluster.start_server()
    await cluster.start_worker("worker-1", agents=["claude_code"], allow_cwd=[workdir])
    client = cluster.client()
    task = await client.create_task(
        "claude_code",
        {"prompt": "read it forever", "cwd": str(workdir), "allowed_tools": ["Read"],
         "max_turns": 30},
        max_cost_usd=0.05, max_attempts=1,
    )  # fmt: skip
    final = await client.wait(task.id)
    assert final.status is TaskStatus.FAILED
    assert final.error.startswith("cost limit reached: the run spent $0.06")
    # the CLI may have sent the next call while the worker stopped it; no more than that
    assert 3 <= len(api.message_requests) <= 4
    _, [run] = await client.get_task(task.id)
    assert run.status is RunStatus.FAILED
    assert run.usage.input_tokens >= 30_000 and run.usage.cost_usd > 0.05


@dataclass
class _BackedUpContext(RecordingContext):
    """A worker whose stream to the control plane is backed up: reporting usage takes a while,
    so Claude Code (which does not wait for the worker to read its messages) runs ahead. With
    `stop_above`, it stops the run over that cost itself, as a limit Claude Code is not told."""

    stop_above: float = 0.0

    async def report_usage(self, usage: Usage) -> None:
        await asyncio.sleep(0.5)
        await super().report_usage(usage)
        if self.stop_above and usage.cost_usd > self.stop_above:
            raise CostLimitReached(usage, self.stop_above)


def _read_forever(api: FakeAnthropic, workdir: Path) -> dict[str, Any]:
    """Every call asks for another Read, at once ($0.02 a call); the input that asks for it."""
    notes = str(workdir / "notes.txt")
    api.default = Text(
        "again", input_tokens=10_000, tool_uses=(ToolUse("Read", {"file_path": notes}),)
    )
    return {"prompt": "read it forever", "cwd": str(workdir), "allowed_tools": ["Read"],
            "max_turns": 30}  # fmt: skip


async def test_a_session_stopped_at_a_limit_counts_the_calls_claude_code_made_ahead(
    api: FakeAnthropic, workdir: Path
) -> None:
    ctx = _BackedUpContext(input=_read_forever(api, workdir), stop_above=0.05)
    with pytest.raises(CostLimitReached) as stopped:
        await ClaudeCodeAgent().run(ctx)
    made = len(api.message_requests)
    assert made > 3  # the CLI ran ahead: $0.02 a call, so the limit was crossed at the third
    # every call the API answered is in the run's usage: nothing it bills goes unrecorded
    usage = stopped.value.usage
    assert usage is not None
    # the call in flight when the interrupt came may be cut off, on either side of its end
    counted = api.streams_finished - 1
    assert counted >= made - 2
    assert usage.input_tokens >= 10_000 * counted
    assert usage.cost_usd >= 0.02 * counted - 1e-9
    spent = f"cost limit reached: the run spent ${usage.cost_usd:.4f}"
    assert str(stopped.value).startswith(spent)


async def test_the_task_cost_limit_bounds_claude_code_however_late_the_worker_reads(
    api: FakeAnthropic, workdir: Path
) -> None:
    ctx = _BackedUpContext(input=_read_forever(api, workdir), options=RunOptions(max_cost_usd=0.05))
    with pytest.raises(CostLimitReached) as stopped:
        await ClaudeCodeAgent().run(ctx)
    assert len(api.message_requests) == 3  # Claude Code stopped itself at the limit
    usage = stopped.value.usage
    assert usage is not None and usage.cost_usd >= 0.06 - 1e-9
    assert str(stopped.value).startswith("cost limit reached: the run spent $0.06")
    assert "max_cost_usd" in str(stopped.value)


async def test_a_resumed_turns_cost_limit_counts_from_the_turns_start(
    api: FakeAnthropic, workdir: Path
) -> None:
    read = ToolUse("Read", {"file_path": str(workdir / "notes.txt")})
    api.enqueue(
        Text("a", input_tokens=10_000, tool_uses=(read,)),
        Text("b", input_tokens=10_000, tool_uses=(read,)),
        Text("done", input_tokens=10_000),
    )
    conversation = ConversationId("conv-test")
    first = await ClaudeCodeAgent().run(
        RecordingContext(
            input={"prompt": "turn one", "cwd": str(workdir), "allowed_tools": ["Read"]},
            conversation=TurnContext(conversation, 1),
        )
    )
    assert first.session_cost_usd == pytest.approx(0.06, abs=1e-3)  # the session's total
    before = len(api.message_requests)
    turn = TurnContext(
        conversation,
        2,
        session_id=first.session_id,
        session_snapshot=first.session_snapshot,
        session_cost_usd=first.session_cost_usd,
        session_turn=1,
    )
    ctx = _BackedUpContext(
        input=_read_forever(api, workdir), options=RunOptions(max_cost_usd=0.05), conversation=turn
    )
    with pytest.raises(CostLimitReached) as stopped:
        await ClaudeCodeAgent().run(ctx)
    # Claude Code's budget counts this turn's calls, not the session's earlier ones
    assert len(api.message_requests) - before == 3
    assert stopped.value.usage is not None
    assert stopped.value.usage.cost_usd == pytest.approx(0.06, abs=1e-3)
    # the next turn resumes the session as this one left it, and knows its running total
    assert stopped.value.session_id == first.session_id
    assert stopped.value.session_snapshot
    assert stopped.value.session_cost_usd == pytest.approx(0.12, abs=1e-3)
