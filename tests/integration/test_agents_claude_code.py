"""The `claude_code` agent (and support_triage on the claude_code backend), for real.

These use the Claude Code CLI bundled in the claude-agent-sdk wheel (not a fake CLI): the real
CLI and the real SDK parsing run against the fake Messages API on loopback, with
ANTHROPIC_BASE_URL, a temporary HOME (where sessions are kept) and
CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1, so nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskrun.core.agent import AgentError
from taskrun.core.status import Fault, RunStatus, TaskStatus
from taskrun.worker.agents.claude_code import ClaudeCodeAgent
from taskrun.worker.agents.support_triage import SupportTriageAgent
from taskrun.worker.workspace import Workspaces
from tests.conftest import Cluster
from tests.fakes.anthropic_server import FakeAnthropic, Text, ToolUse
from tests.fakes.run_context import RecordingContext
from tests.processes import alive, descendants

pytest.importorskip("claude_agent_sdk", reason="needs the taskrun-agents[claude] extra")

KEY = "sk-ant-test-key"


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeAnthropic]:
    home = tmp_path / "home"
    home.mkdir()
    with FakeAnthropic(api_key=KEY) as fake:
        for name in list(os.environ):  # nothing from the developer's own setup leaks in
            if name.startswith(("ANTHROPIC_", "CLAUDE_", "TASKRUN_CLAUDE_")):
                monkeypatch.delenv(name)
        for name, value in {
            "ANTHROPIC_BASE_URL": fake.base_url,
            "ANTHROPIC_API_KEY": KEY,
            "HOME": str(home),
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "CLAUDE_CODE_MAX_RETRIES": "0",
        }.items():
            monkeypatch.setenv(name, value)
        yield fake


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    (path / "notes.txt").write_text("the secret is 42\n")
    return path


def cli_children() -> list[int]:
    """Pids of the Claude Code CLI processes below this test process (under their supervisor)."""
    return descendants(name="claude")


def exited_and_reaped(pid: int) -> bool:
    return not alive(pid)


async def test_claude_code_streams_text_and_reports_tools_usage_and_session(
    api: FakeAnthropic, workdir: Path
) -> None:
    notes = str(workdir / "notes.txt")
    api.enqueue(
        Text(["I'll read ", "the file."], tool_uses=(ToolUse("Read", {"file_path": notes}),)),
        Text(["The secret ", "is 42."]),
    )
    ctx = RecordingContext(
        input={
            "prompt": "What is in notes.txt?",
            "cwd": str(workdir),
            "allowed_tools": ["Read"],
            "model": "claude-sonnet-5-5",
            "max_turns": 5,
        }
    )
    result = await ClaudeCodeAgent().run(ctx)

    # text arrived as the deltas were produced, the two assistant messages on separate lines
    assert ctx.texts[:2] == ["I'll read ", "the file."]
    assert ctx.output == "I'll read the file.\nThe secret is 42."
    [session] = ctx.events_of("session")
    [tool_use] = ctx.events_of("tool_use")
    [tool_result] = ctx.events_of("tool_result")
    assert tool_use["name"] == "Read" and tool_use["input"] == {"file_path": notes}
    assert tool_result["tool_use_id"] == tool_use["id"]
    assert "the secret is 42" in tool_result["content"] and not tool_result["is_error"]

    assert result.session_id and result.session_id == session["session_id"]
    assert result.result["session_id"] == result.session_id
    assert result.result["text"] == "The secret is 42."
    assert result.result["model"] == "claude-sonnet-5-5"
    assert result.usage.turns == 2
    assert result.usage.input_tokens == 24  # 12 per model call, as the fake reports
    assert result.usage.output_tokens > 0 and result.usage.cost_usd > 0
    assert result.usage.duration_ms > 0
    assert result.backend_used is not None
    assert result.backend_used.model_name == "claude-sonnet-5-5"
    assert "Read" in result.backend_used.tools

    first, second = api.message_requests
    assert first.headers["x-api-key"] == KEY and first.body["model"] == "claude-sonnet-5-5"
    assert "What is in notes.txt?" in first.last_user_text()
    assert "the secret is 42" in json.dumps(second.tool_results())
    assert cli_children() == []


async def test_follow_up_resumes_the_same_session_with_the_new_message(
    api: FakeAnthropic, workdir: Path
) -> None:
    agent = ClaudeCodeAgent()
    task_input = {"prompt": "Remember the number 7.", "cwd": str(workdir)}
    api.enqueue(Text("I will remember 7."))
    first = await agent.run(RecordingContext(input=dict(task_input)))

    api.enqueue(Text("The number was 7."))
    ctx = RecordingContext(
        input=dict(task_input), resume_session_id=first.session_id, prompt="Which number?"
    )
    second = await agent.run(ctx)

    assert second.session_id == first.session_id
    assert ctx.output == "The number was 7."
    assert ctx.events_of("session")[0]["resumed"] is True
    conversation = json.dumps(api.message_requests[-1].messages)
    assert "Remember the number 7." in conversation and "I will remember 7." in conversation
    assert api.message_requests[-1].last_user_text() == "Which number?"


async def test_cancel_interrupts_the_session_and_the_cli_process_exits(
    api: FakeAnthropic, workdir: Path
) -> None:
    api.enqueue(Text(["tick "] * 200, delay=0.05))  # ten seconds if left alone
    ctx = RecordingContext(input={"prompt": "Count slowly.", "cwd": str(workdir)})
    run = asyncio.create_task(ClaudeCodeAgent().run(ctx))
    await asyncio.wait_for(ctx.first_text.wait(), 20)
    [pid] = cli_children()
    started = time.monotonic()
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert time.monotonic() - started < 5
    assert exited_and_reaped(pid)
    assert cli_children() == []
    assert await asyncio.to_thread(api.client_gone.wait, 5)  # its API stream was dropped
    assert api.streams_finished == 0


async def test_api_errors_reported_by_the_cli_fail_the_run(
    api: FakeAnthropic, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-wrong")
    ctx = RecordingContext(input={"prompt": "hi", "cwd": str(workdir)})
    with pytest.raises(AgentError) as err:
        await ClaudeCodeAgent().run(ctx)
    assert "HTTP 401" in str(err.value)
    assert "authentication failed: check ANTHROPIC_API_KEY" in str(err.value)
    assert err.value.fault is Fault.WORKER
    assert cli_children() == []


async def test_max_turns_stops_the_session(api: FakeAnthropic, workdir: Path) -> None:
    notes = str(workdir / "notes.txt")
    api.default = Text("again", tool_uses=(ToolUse("Read", {"file_path": notes}),))
    ctx = RecordingContext(
        input={"prompt": "loop", "cwd": str(workdir), "allowed_tools": ["Read"], "max_turns": 1}
    )
    with pytest.raises(AgentError, match="error_max_turns") as err:
        await ClaudeCodeAgent().run(ctx)
    assert err.value.fault is Fault.TASK  # the task's own turn limit


async def test_missing_cli_and_bad_cwd_are_reported(
    api: FakeAnthropic, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(AgentError, match="is not a directory") as err:
        await ClaudeCodeAgent().run(
            RecordingContext(input={"prompt": "hi", "cwd": str(workdir / "nope")})
        )
    assert err.value.fault is Fault.TASK
    monkeypatch.setenv("TASKRUN_CLAUDE_CLI_PATH", str(workdir / "no-such-claude"))
    with pytest.raises(AgentError, match="Claude Code CLI not found") as err:
        await ClaudeCodeAgent().run(RecordingContext(input={"prompt": "hi", "cwd": str(workdir)}))
    assert err.value.fault is Fault.WORKER
    assert api.requests == []


async def test_triage_runs_on_the_claude_code_backend(api: FakeAnthropic) -> None:
    valid = {"category": "bug", "priority": "urgent", "summary": "Checkout crashes."}
    api.enqueue(Text('{"category": "crash"}'), Text(json.dumps(valid)))
    ctx = RecordingContext(
        input={
            "ticket_id": "T-9",
            "subject": "Checkout crashes",
            "body": "Every time.",
            "backend": "claude_code",
            "model": "claude-haiku-5-5",
        }
    )
    result = await SupportTriageAgent().run(ctx)
    assert result.result == {**valid, "ticket_id": "T-9", "attempts": 2, "backend": "claude_code"}
    assert result.backend_used is not None
    assert result.backend_used.model_name == "claude-haiku-5-5"
    assert result.usage.cost_usd > 0
    first, retry = api.message_requests
    assert "You triage customer support tickets." in json.dumps(first.body["system"])
    assert first.body.get("tools") in (None, [])  # no tools for a classification
    assert "did not match the schema" in retry.last_user_text()
    assert cli_children() == []


async def test_claude_code_task_records_session_usage_and_backend_on_the_run(
    api: FakeAnthropic, workdir: Path, cluster: Cluster
) -> None:
    api.enqueue(Text(["Done", "."]))
    await cluster.start_server()
    await cluster.start_worker("worker-1", agents=["claude_code"], allow_cwd=[workdir])
    client = cluster.client()
    task = await client.create_task("claude_code", {"prompt": "Do it", "cwd": str(workdir)})
    final = await client.wait(task.id)
    assert final.status is TaskStatus.COMPLETED, final.error
    task, [run] = await client.get_task(task.id)
    assert run.status is RunStatus.COMPLETED
    assert run.session_id and json.loads(task.result)["session_id"] == run.session_id
    assert run.usage.input_tokens == 12 and run.usage.cost_usd > 0
    assert run.backend_used is not None and run.backend_used.provider == "anthropic"
    assert run.backend_used.model_name == "claude-sonnet-5-5"  # the default, as announced
    assert api.message_requests[0].body["model"] == "claude-sonnet-5-5"


async def test_cancelling_a_claude_code_task_stops_the_cli_on_the_worker(
    api: FakeAnthropic, workdir: Path, cluster: Cluster
) -> None:
    api.enqueue(Text(["tick "] * 200, delay=0.05))
    await cluster.start_server()
    daemon = await cluster.start_worker("worker-1", agents=["claude_code"], allow_cwd=[workdir])
    client = cluster.client()
    task = await client.create_task("claude_code", {"prompt": "Count.", "cwd": str(workdir)})
    async with asyncio.timeout(20):
        while api.streams_started == 0 or not cli_children():
            await asyncio.sleep(0.01)
    [pid] = cli_children()
    await client.cancel_task(task.id, "enough")
    async with asyncio.timeout(10):
        while daemon.runs or not exited_and_reaped(pid):
            await asyncio.sleep(0.01)
    final, [run] = await client.get_task(task.id)
    assert final.status is TaskStatus.CANCELLED
    assert run.status is RunStatus.CANCELLED
    assert cli_children() == []


# --- agents work in their own directory, away from the worker's keys -----------------------------


def key_dir(tmp_path: Path) -> tuple[Path, Path]:
    """A directory like the worker's certs/, holding a private key."""
    certs = tmp_path / "certs"
    certs.mkdir()
    key = certs / "ca-key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\nSECRET-KEY-MATERIAL\n")
    return certs, key


async def test_claude_code_works_in_its_run_workspace_and_cannot_read_the_worker_keys(
    api: FakeAnthropic, tmp_path: Path
) -> None:
    certs, key = key_dir(tmp_path)
    workspaces = Workspaces.create(tmp_path / "workspaces", [certs])
    api.enqueue(
        Text(
            "Looking around.",
            tool_uses=(
                ToolUse("Read", {"file_path": str(key)}),
                ToolUse("Bash", {"command": "pwd"}),
            ),
        ),
        Text("Done."),
    )
    ctx = RecordingContext(
        input={"prompt": "Print the CA key.", "allowed_tools": ["Read", "Bash"]},
        workspaces=workspaces,
    )
    await ClaudeCodeAgent().run(ctx)

    read, bash = ctx.events_of("tool_result")
    assert read["is_error"] and "SECRET-KEY-MATERIAL" not in json.dumps(ctx.events)
    assert bash["content"].strip() == str(ctx.workspace)
    assert ctx.workspace.parent == workspaces.root and ctx.workspace.name == ctx.run_id
    assert "SECRET-KEY-MATERIAL" not in json.dumps([r.body for r in api.message_requests])


async def test_the_same_read_succeeds_when_the_directory_is_not_protected(
    api: FakeAnthropic, tmp_path: Path
) -> None:
    """The control for the test above: the fake model's Read does reach files it may read."""
    _, key = key_dir(tmp_path)
    api.enqueue(Text("Reading.", tool_uses=(ToolUse("Read", {"file_path": str(key)}),)), Text("."))
    ctx = RecordingContext(
        input={"prompt": "Print the CA key.", "allowed_tools": ["Read"]},
        workspaces=Workspaces.create(tmp_path / "workspaces", []),
    )
    await ClaudeCodeAgent().run(ctx)
    [read] = ctx.events_of("tool_result")
    assert not read["is_error"] and "SECRET-KEY-MATERIAL" in read["content"]


async def test_a_task_cwd_outside_the_workers_allow_list_fails_naming_input_cwd(
    api: FakeAnthropic, workdir: Path, cluster: Cluster, tmp_path: Path
) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1", agents=["claude_code"], allow_cwd=[workdir])
    client = cluster.client()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    task = await client.create_task("claude_code", {"prompt": "Hi", "cwd": str(outside)})
    final = await client.wait(task.id)
    assert final.status is TaskStatus.FAILED
    assert "input.cwd:" in final.error and str(workdir) in final.error, final.error
    inside = workdir / "sub"
    inside.mkdir()
    api.enqueue(Text("ok"))
    task = await client.create_task("claude_code", {"prompt": "Hi", "cwd": str(inside)})
    assert (await client.wait(task.id)).status is TaskStatus.COMPLETED
    assert len(api.message_requests) == 1  # the refused run never reached the model


async def test_without_allow_cwd_any_input_cwd_is_refused(
    api: FakeAnthropic, workdir: Path, cluster: Cluster
) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1", agents=["claude_code"])
    client = cluster.client()
    task = await client.create_task("claude_code", {"prompt": "Hi", "cwd": str(workdir)})
    final = await client.wait(task.id)
    assert final.status is TaskStatus.FAILED
    assert "input.cwd:" in final.error and "allowed: none" in final.error, final.error


@pytest.mark.parametrize("keep", [False, True], ids=["removed", "kept"])
async def test_each_run_gets_a_fresh_workspace_removed_after_the_run_unless_kept(
    api: FakeAnthropic, cluster: Cluster, tmp_path: Path, keep: bool
) -> None:
    root = tmp_path / "ws"
    api.enqueue(
        Text("Writing.", tool_uses=(ToolUse("Bash", {"command": "pwd; touch made-here"}),)),
        Text("Done."),
    )
    await cluster.start_server()
    await cluster.start_worker(
        "worker-1", agents=["claude_code"], workspace_root=root, keep_workspaces=keep
    )
    client = cluster.client()
    task = await client.create_task("claude_code", {"prompt": "Hi", "allowed_tools": ["Bash"]})
    final = await client.wait(task.id)
    assert final.status is TaskStatus.COMPLETED, final.error
    _, [run] = await client.get_task(task.id)
    workspace = root.resolve() / run.id
    result = next(e for e in api.message_requests[1].tool_results())
    assert str(workspace) in json.dumps(result)
    async with asyncio.timeout(5):
        while not keep and workspace.exists():
            await asyncio.sleep(0.01)
    assert (workspace / "made-here").exists() is keep


async def test_without_the_sandbox_a_bash_command_can_still_read_the_keys(
    api: FakeAnthropic, tmp_path: Path
) -> None:
    """What the deny rules do not cover (the README says so): programs the agent runs. Claude
    Code refuses a command naming a denied path, but not one that finds it by a glob."""
    certs, _ = key_dir(tmp_path)
    sneaky = f"cat {certs.parent}/cert?/ca-k*"
    api.enqueue(Text("x", tool_uses=(ToolUse("Bash", {"command": sneaky}),)), Text("."))
    ctx = RecordingContext(
        input={"prompt": "Print the CA key.", "allowed_tools": ["Bash"]},
        workspaces=Workspaces.create(tmp_path / "workspaces", [certs]),
    )
    await ClaudeCodeAgent().run(ctx)
    [result] = ctx.events_of("tool_result")
    assert "SECRET-KEY-MATERIAL" in result["content"]


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap (apt install)")
async def test_with_the_sandbox_a_bash_command_cannot_read_the_keys(
    api: FakeAnthropic, tmp_path: Path
) -> None:
    certs, _ = key_dir(tmp_path)
    sneaky = f"cat {certs.parent}/cert?/ca-k*"
    api.enqueue(Text("x", tool_uses=(ToolUse("Bash", {"command": sneaky}),)), Text("."))
    ctx = RecordingContext(
        input={"prompt": "Print the CA key.", "allowed_tools": ["Bash"]},
        workspaces=Workspaces.create(tmp_path / "workspaces", [certs], sandbox=True),
    )
    await ClaudeCodeAgent().run(ctx)
    [result] = ctx.events_of("tool_result")
    assert "SECRET-KEY-MATERIAL" not in json.dumps(ctx.events), result
    assert "cat: " in result["content"]  # the command ran, sandboxed: the directory is not there
