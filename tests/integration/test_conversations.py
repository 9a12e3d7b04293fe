"""Conversations: turns are tasks, the transcript lives in the control plane, and the next turn runs
on any worker that offers the agent, after any failure, with each turn's own cost.

The `anthropic` agent runs against the fake Messages API; `claude_code` runs the Claude Code CLI
bundled with the SDK against the same fake, offline (see test_agents_claude_code.py). Everything
else is real: the control plane on loopback with mTLS and SQLite, workers, the typed client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from taskrun.cli.client import OutputReceived, TaskChanged, TurnEnded, TurnStarted
from taskrun.core.status import RunStatus, TaskStatus
from tests.conftest import Cluster
from tests.fakes.anthropic_server import ErrorMidStream, FakeAnthropic, Overloaded, Text
from tests.integration.test_bad_input import expect
from tests.integration.test_enrollment import start
from tests.integration.test_metrics import scrape, value
from tests.integration.test_security import token_client

KEY = "sk-ant-test-key"


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeAnthropic]:
    home = tmp_path / "home"
    home.mkdir()
    with FakeAnthropic(api_key=KEY) as fake:
        for name in list(os.environ):  # nothing from the developer's own setup leaks in
            if name.startswith(("ANTHROPIC_", "CLAUDE_", "TASKRUN_ANTHROPIC_", "TASKRUN_CLAUDE_")):
                monkeypatch.delenv(name)
        for name, value in {
            "ANTHROPIC_BASE_URL": fake.base_url,
            "ANTHROPIC_API_KEY": KEY,
            "ANTHROPIC_CONFIG_DIR": str(tmp_path / "anthropic-config"),
            "TASKRUN_ANTHROPIC_MAX_RETRIES": "0",
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
    return path


def roles_and_texts(messages: list[dict[str, object]]) -> list[tuple[object, str]]:
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = "".join(b.get("text", "") for b in content if isinstance(b, dict))
        out.append((m["role"], str(content)))
    return out


async def answer(client: object, conversation_id: str, message: str) -> list[object]:
    """Send a message and collect the chat events until the turn ended."""
    events: list[object] = []
    async with contextlib.aclosing(
        client.chat(message, conversation_id=conversation_id)  # type: ignore[attr-defined]
    ) as stream:
        async for event in stream:
            events.append(event)
    return events


async def test_a_turn_that_failed_with_529_is_history_and_the_next_message_sends_all_of_it(
    api: FakeAnthropic, cluster: Cluster
) -> None:
    server = await cluster.start_server(metrics_listen="127.0.0.1:0")
    await cluster.start_worker("worker-1", agents=["anthropic"])
    client = cluster.client()
    api.enqueue(Text("Hi Ana.", input_tokens=10, output_tokens=3))
    events = [e async for e in client.chat("My name is Ana.", agent="anthropic")]
    started, ended = events[0], events[-1]
    assert isinstance(started, TurnStarted) and started.conversation is not None
    assert isinstance(ended, TurnEnded) and ended.turn.status is TaskStatus.COMPLETED
    assert ended.turn.answer == "Hi Ana."
    conversation_id = started.conversation.id

    api.enqueue(Overloaded())  # no retries left in the SDK: the turn fails
    failed = await answer(client, conversation_id, "What is 2+2?")
    assert isinstance(failed[-1], TurnEnded)
    assert failed[-1].turn.status is TaskStatus.FAILED and "529" in failed[-1].turn.error

    api.enqueue(Text("You are Ana; 2+2 is 4.", input_tokens=40, output_tokens=9))
    third = await answer(client, conversation_id, "Who am I, and what is 2+2?")
    assert isinstance(third[-1], TurnEnded) and third[-1].turn.status is TaskStatus.COMPLETED
    text = "".join(e.chunk.data for e in third if isinstance(e, OutputReceived))
    assert text == "You are Ana; 2+2 is 4."

    sent = roles_and_texts(api.message_requests[-1].messages)
    assert sent[0] == ("user", "My name is Ana.")
    assert sent[1] == ("assistant", "Hi Ana.")
    assert sent[2] == ("user", "What is 2+2?")
    assert sent[3][0] == "assistant" and "failed" in sent[3][1]
    assert sent[4] == ("user", "Who am I, and what is 2+2?")
    assert len(sent) == 5

    conversation, turns = await client.get_conversation(conversation_id)
    assert [t.index for t in turns] == [1, 2, 3]
    assert [t.status for t in turns] == [
        TaskStatus.COMPLETED,
        TaskStatus.FAILED,
        TaskStatus.COMPLETED,
    ]
    assert [t.message for t in turns] == [
        "My name is Ana.",
        "What is 2+2?",
        "Who am I, and what is 2+2?",
    ]
    assert [t.usage.input_tokens for t in turns] == [10, 0, 40]
    assert conversation.turns == 3
    assert conversation.usage.input_tokens == 50 and conversation.usage.output_tokens == 12
    # every turn is its own task, and each keeps its terminal state
    tasks = [(await client.get_task(t.task_id))[0] for t in turns]
    assert len({t.id for t in tasks}) == 3
    assert [t.status for t in tasks] == [t.status for t in turns]
    assert all(t.conversation_id == conversation_id for t in tasks)
    assert [t.turn for t in tasks] == [1, 2, 3]

    # Prometheus: tokens and cost per agent and model, each run counted once
    assert server.metrics_server is not None
    _, body = await scrape(server.metrics_server.port)
    model = api.message_requests[0].body["model"]

    def tokens(kind: str) -> str:
        return f'taskrun_tokens_total{{agent="anthropic",kind="{kind}",model="{model}"}}'

    assert value(body, tokens("input")) == 50
    assert value(body, tokens("output")) == 12
    cost = f'taskrun_cost_usd_total{{agent="anthropic",model="{model}"}}'
    assert value(body, cost) == pytest.approx(conversation.usage.cost_usd)
    assert conversation.usage.cost_usd > 0


async def test_a_cancelled_turn_is_history_and_the_conversation_goes_on(
    api: FakeAnthropic, cluster: Cluster
) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1", agents=["anthropic"])
    client = cluster.client()
    api.enqueue(Text(["tick "] * 200, delay=0.05))  # ten seconds if left alone
    conversation, turn = await client.create_conversation("anthropic", "Count slowly.")
    async with asyncio.timeout(20):
        while api.streams_started == 0:
            await asyncio.sleep(0.01)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await answer(client, conversation.id, "Are you there?")  # the first turn still runs
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert turn.task_id in (refused.value.details() or "")
    await client.cancel_task(turn.task_id, "too slow")

    api.enqueue(Text("Stopped; how can I help?"))
    events = await answer(client, conversation.id, "Stop counting.")
    assert isinstance(events[-1], TurnEnded) and events[-1].turn.status is TaskStatus.COMPLETED
    sent = roles_and_texts(api.message_requests[-1].messages)
    assert sent[0] == ("user", "Count slowly.")
    assert sent[1][0] == "assistant" and "cancelled" in sent[1][1]
    assert sent[2] == ("user", "Stop counting.")
    _, turns = await client.get_conversation(conversation.id)
    assert [t.status for t in turns] == [TaskStatus.CANCELLED, TaskStatus.COMPLETED]


async def test_a_cancelled_turn_records_what_it_spent_and_the_totals_add_up(
    api: FakeAnthropic, cluster: Cluster
) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1", agents=["anthropic"])
    client = cluster.client()
    # the stream's message_start bills 300 input tokens before the first word
    api.enqueue(Text(["tick "] * 200, input_tokens=300, delay=0.05))
    conversation, turn = await client.create_conversation("anthropic", "Count slowly.")
    async with asyncio.timeout(20):
        while api.streams_started == 0:
            await asyncio.sleep(0.01)
        while (await client.get_task(turn.task_id))[1][0].status is not RunStatus.RUNNING:
            await asyncio.sleep(0.01)
    await client.cancel_task(turn.task_id, "too slow")
    async with asyncio.timeout(20):  # the worker's last report comes after the cancel
        while (await client.get_task(turn.task_id))[0].usage.input_tokens == 0:
            await asyncio.sleep(0.02)
    task, [run] = await client.get_task(turn.task_id)
    assert task.status is TaskStatus.CANCELLED  # still, and for good
    assert run.status is RunStatus.CANCELLED
    assert run.usage.input_tokens == task.usage.input_tokens == 300
    assert task.usage.cost_usd > 0

    api.enqueue(Text("Stopped.", input_tokens=40, output_tokens=3))
    events = await answer(client, conversation.id, "Stop counting.")
    assert isinstance(events[-1], TurnEnded) and events[-1].turn.status is TaskStatus.COMPLETED
    stored, turns = await client.get_conversation(conversation.id)
    assert [t.usage.input_tokens for t in turns] == [300, 40]
    assert stored.usage.input_tokens == 340
    assert stored.usage.cost_usd == pytest.approx(sum(t.usage.cost_usd for t in turns))


async def test_a_completed_task_stays_completed_when_the_conversation_continues(
    api: FakeAnthropic, cluster: Cluster
) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1", agents=["anthropic"])
    client = cluster.client()
    api.enqueue(Text("Blue."))
    task = await client.create_task("anthropic", {"prompt": "Pick a colour.", "max_tokens": 50})
    first = await client.wait(task.id)
    assert first.status is TaskStatus.COMPLETED and first.conversation_id is None
    watched: list[TaskStatus] = []

    async def watch() -> None:
        async for event in client.follow(task.id):
            if isinstance(event, TaskChanged):
                watched.append(event.task.status)

    api.enqueue(Text("Because it is calm."), Text("Green, then."))
    second = await client.continue_task(task.id, "Why?")
    assert second.id != task.id and second.turn == 2 and second.conversation_id
    assert (await client.wait(second.id)).status is TaskStatus.COMPLETED
    third = await client.continue_task(task.id, "Another one?")  # any turn's task continues it
    assert (await client.wait(third.id)).status is TaskStatus.COMPLETED
    await asyncio.wait_for(watch(), 5)  # the original task: its stream ends at once, COMPLETED

    after, runs = await client.get_task(task.id)
    assert after.status is TaskStatus.COMPLETED and watched == [TaskStatus.COMPLETED]
    assert [r.status for r in runs] == [RunStatus.COMPLETED] and after.attempts == 1
    assert after.finished_at == first.finished_at and after.result == first.result
    assert after.conversation_id == second.conversation_id and after.turn == 1
    sent = roles_and_texts(api.message_requests[-1].messages)
    assert sent == [
        ("user", "Pick a colour."),
        ("assistant", "Blue."),
        ("user", "Why?"),
        ("assistant", "Because it is calm."),
        ("user", "Another one?"),
    ]
    assert api.message_requests[-1].body["max_tokens"] == 50  # the first task's options carry on
    _, turns = await client.get_conversation(second.conversation_id)
    assert [t.task_id for t in turns] == [task.id, second.id, third.id]


async def test_conversation_requests_are_checked_and_deleting_keeps_the_tasks(
    api: FakeAnthropic, cluster: Cluster
) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1", agents=["anthropic"])
    client = cluster.client()

    async def refused(code: grpc.StatusCode, needle: str, call: object) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call  # type: ignore[misc]
        assert err.value.code() is code, err.value.details()
        assert needle in (err.value.details() or ""), err.value.details()

    await refused(
        grpc.StatusCode.INVALID_ARGUMENT,
        "input_json",
        client.create_conversation("anthropic", "hi", options={"prompt": "x"}),
    )
    await refused(
        grpc.StatusCode.INVALID_ARGUMENT, "message", client.create_conversation("anthropic", " ")
    )
    await refused(
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_tokens",
        client.create_conversation("anthropic", "hi", options={"max_tokens": "many"}),
    )
    await refused(grpc.StatusCode.NOT_FOUND, "conversation_id", answer(client, "cnv_nope", "hello"))
    await refused(grpc.StatusCode.NOT_FOUND, "conversation_id", client.get_conversation("cnv_nope"))
    api.enqueue(Text("one"))
    conversation, turn = await client.create_conversation(
        "anthropic", "first", labels={"team": "x"}, title="Greeting"
    )
    await client.wait(turn.task_id)
    listed = await client.list_conversations(labels={"team": "x"})
    assert [(c.id, c.title, c.turns) for c in listed] == [(conversation.id, "Greeting", 1)]
    await client.delete_conversation(conversation.id)
    await refused(
        grpc.StatusCode.NOT_FOUND, "conversation_id", client.get_conversation(conversation.id)
    )
    task, _ = await client.get_task(turn.task_id)
    assert task.status is TaskStatus.COMPLETED  # the turn's task stays, as history


async def test_a_conversation_with_an_agent_or_model_nobody_offers_is_refused_unless_allowed(
    api: FakeAnthropic, cluster: Cluster
) -> None:
    """As CreateTask: refused at the start, naming the field and what is offered, nothing
    stored; with allow_unknown_agent it starts and its first turn waits for such a worker."""
    await cluster.start_server()
    await cluster.start_worker("worker-1", agents=["anthropic"])
    client = cluster.client()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.create_conversation("ghost", "hi")
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details() or ""
    assert details.startswith("agent:") and "'anthropic'" in details, details
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.create_conversation("anthropic", "hi", options={"model": "no-such-model"})
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("input_json.model:"), err.value.details()
    assert await client.list_conversations() == []  # nothing was stored

    conversation, turn = await client.create_conversation("ghost", "hi", allow_unknown_agent=True)
    task, _ = await client.get_task(turn.task_id)
    assert task.status is TaskStatus.PENDING and task.agent == "ghost"
    assert [c.id for c in await client.list_conversations()] == [conversation.id]


# --- claude_code: the session moves through the control plane -----------------------------


def claude_sdk() -> None:
    pytest.importorskip("claude_agent_sdk", reason="needs the taskrun[claude] extra")


async def test_claude_code_conversation_continues_on_another_worker_after_the_first_is_killed(
    api: FakeAnthropic, workdir: Path, cluster: Cluster
) -> None:
    claude_sdk()
    await cluster.start_server()
    await cluster.start_worker("worker-1", agents=["claude_code"], allow_cwd=[workdir])
    client = cluster.client()
    api.enqueue(Text("I will remember 7."))
    conversation, turn = await client.create_conversation(
        "claude_code", "Remember the number 7.", options={"cwd": str(workdir)}
    )
    first = await client.wait(turn.task_id)
    assert first.status is TaskStatus.COMPLETED, first.error
    stored, _ = await client.get_conversation(conversation.id)
    assert stored.session_id  # the session's file went to the control plane with the result

    # worker-1 dies without a word, and its disk with it (the session files are gone)
    daemon_task = cluster.workers.pop("worker-1")[1]
    daemon_task.cancel()
    with contextlib.suppress(BaseException):
        await daemon_task
    shutil.rmtree(Path(os.environ["HOME"]) / ".claude" / "projects")
    await cluster.start_worker("worker-2", agents=["claude_code"], allow_cwd=[workdir])

    api.enqueue(Text("The number was 7."))
    events = await answer(client, conversation.id, "Which number?")
    ended = events[-1]
    assert isinstance(ended, TurnEnded) and ended.turn.status is TaskStatus.COMPLETED
    assert ended.turn.answer == "The number was 7."
    _, [run] = await client.get_task(ended.turn.task_id)
    assert run.worker_id == "worker-2"
    assert run.session_id == stored.session_id  # resumed the same session, not a new one
    request = api.message_requests[-1]
    conversation_text = json.dumps(request.messages)
    assert "Remember the number 7." in conversation_text
    assert "I will remember 7." in conversation_text
    assert "conversation so far" not in conversation_text  # the session, not a preamble
    assert request.last_user_text() == "Which number?"


async def test_claude_code_cost_per_turn_is_what_the_turn_spent_not_the_running_total(
    api: FakeAnthropic, workdir: Path, cluster: Cluster
) -> None:
    claude_sdk()
    await cluster.start_server()
    await cluster.start_worker("worker-1", agents=["claude_code"], allow_cwd=[workdir])
    client = cluster.client()
    # the bundled CLI prices claude-sonnet-5-5 at $2 per million input tokens, $10 per million
    # output tokens (measured with the fake); turn k spends 1000k input and 100k output tokens
    api.enqueue(
        *(Text(f"answer {k}", input_tokens=1000 * k, output_tokens=100 * k) for k in range(1, 6))
    )
    conversation, turn = await client.create_conversation(
        "claude_code", "turn 1", options={"cwd": str(workdir)}
    )
    assert (await client.wait(turn.task_id)).status is TaskStatus.COMPLETED
    for k in range(2, 6):
        events = await answer(client, conversation.id, f"turn {k}")
        assert isinstance(events[-1], TurnEnded)
        assert events[-1].turn.status is TaskStatus.COMPLETED, events[-1].turn.error
    stored, turns = await client.get_conversation(conversation.id)
    expected = [(1000 * k * 2 + 100 * k * 10) / 1e6 for k in range(1, 6)]
    assert [t.usage.input_tokens for t in turns] == [1000 * k for k in range(1, 6)]
    assert [t.usage.output_tokens for t in turns] == [100 * k for k in range(1, 6)]
    assert [t.usage.cost_usd for t in turns] == pytest.approx(expected)
    assert stored.usage.cost_usd == pytest.approx(sum(expected))  # $0.045, not the $0.105 of
    # summing running totals
    for t in turns:
        task, runs = await client.get_task(t.task_id)
        assert task.usage.cost_usd == pytest.approx(t.usage.cost_usd)
        assert len(runs) == 1


async def test_a_turn_that_broke_mid_stream_records_what_it_spent(
    api: FakeAnthropic, cluster: Cluster
) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1", agents=["anthropic"])
    client = cluster.client()
    api.enqueue(ErrorMidStream(before=["Half an ans"]))
    conversation, turn = await client.create_conversation("anthropic", "Tell me a story.")
    final = await client.wait(turn.task_id)
    assert final.status is TaskStatus.FAILED and "mid-response" in final.error
    _, [run] = await client.get_task(turn.task_id)
    assert run.usage.input_tokens == 12  # from message_start, as the fake reports
    stored, [failed] = await client.get_conversation(conversation.id)
    assert failed.usage.input_tokens == 12 and failed.usage.cost_usd > 0
    assert stored.usage == failed.usage
    assert final.attempts == 1


async def test_a_turn_waiting_for_a_worker_keeps_its_history_across_a_restart(
    api: FakeAnthropic, cluster: Cluster
) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1", agents=["anthropic"])
    client = cluster.client()
    api.enqueue(Text("Noted: 7."))
    conversation, turn = await client.create_conversation("anthropic", "Remember 7.")
    assert (await client.wait(turn.task_id)).status is TaskStatus.COMPLETED
    await cluster.stop_worker("worker-1")
    async with contextlib.aclosing(client.send_message(conversation.id, "Which number?")) as events:
        started = await anext(events)  # no worker: the turn waits in the queue
    assert isinstance(started, TurnStarted)

    await cluster.stop_server()
    await cluster.start_server()  # the same SQLite file: the view is loaded from it
    client = cluster.client()
    api.enqueue(Text("7."))
    await cluster.start_worker("worker-2", agents=["anthropic"])
    final = await client.wait(started.turn.task_id)
    assert final.status is TaskStatus.COMPLETED, final.error
    assert roles_and_texts(api.message_requests[-1].messages) == [
        ("user", "Remember 7."),
        ("assistant", "Noted: 7."),
        ("user", "Which number?"),
    ]
    stored, turns = await client.get_conversation(conversation.id)
    assert [t.answer for t in turns] == ["Noted: 7.", "7."] and stored.turns == 2


async def test_a_transcript_beyond_the_context_window_is_compacted_by_the_model(
    api: FakeAnthropic, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the worker announces a 200-token window; compaction starts beyond half of it
    monkeypatch.setenv("TASKRUN_ANTHROPIC_CONTEXT_WINDOW", "200")
    await cluster.start_server()
    await cluster.start_worker("worker-1", agents=["anthropic"])
    client = cluster.client()
    first, answer1 = "My plan: " + "a" * 300, "Noted: " + "b" * 300
    api.enqueue(
        Text(answer1),
        Text("Second answer."),
        Text("The user has a plan of many a's; the assistant noted it."),  # the summary
        Text("Third answer."),
    )
    conversation, turn = await client.create_conversation("anthropic", first)
    await client.wait(turn.task_id)
    await answer(client, conversation.id, "Second question?")
    assert len(api.message_requests) == 2  # turn 2 kept turn 1 verbatim (the newest turn)
    events = await answer(client, conversation.id, "Third question?")
    assert isinstance(events[-1], TurnEnded) and events[-1].turn.answer == "Third answer."

    summary_request, answer_request = api.message_requests[2:]
    asked = summary_request.last_user_text()
    assert asked.startswith("Summarize this conversation so far")
    assert first in asked and answer1 in asked and "Second question?" not in asked
    assert roles_and_texts(answer_request.messages) == [
        (
            "user",
            "Summary of our conversation so far:\n"
            "The user has a plan of many a's; the assistant noted it.",
        ),
        ("assistant", "Understood."),
        ("user", "Second question?"),
        ("assistant", "Second answer."),
        ("user", "Third question?"),
    ]
    stored, turns = await client.get_conversation(conversation.id)
    assert stored.summarized_through == 1
    assert turns[2].usage.input_tokens == 24  # the summary call and the answer, 12 each
    assert [t.message for t in turns] == [first, "Second question?", "Third question?"]


async def test_claude_code_turn_that_failed_with_529_then_the_next_message_has_all_of_it(
    api: FakeAnthropic, workdir: Path, cluster: Cluster
) -> None:
    claude_sdk()
    await cluster.start_server()
    await cluster.start_worker("worker-1", agents=["claude_code"], allow_cwd=[workdir])
    client = cluster.client()
    api.enqueue(Text("Noted: blue.", input_tokens=1000, output_tokens=100))
    conversation, turn = await client.create_conversation(
        "claude_code", "My colour is blue.", options={"cwd": str(workdir)}
    )
    assert (await client.wait(turn.task_id)).status is TaskStatus.COMPLETED
    api.enqueue(Overloaded())  # the CLI's retries are off: the turn fails
    failed = await answer(client, conversation.id, "And my number is 7.")
    assert isinstance(failed[-1], TurnEnded) and failed[-1].turn.status is TaskStatus.FAILED
    assert "529" in failed[-1].turn.error

    api.enqueue(Text("Blue and 7.", input_tokens=2000, output_tokens=200))
    ended = (await answer(client, conversation.id, "What do you know about me?"))[-1]
    assert isinstance(ended, TurnEnded) and ended.turn.status is TaskStatus.COMPLETED
    sent = json.dumps(api.message_requests[-1].messages)
    for said in ("My colour is blue.", "Noted: blue.", "And my number is 7."):
        assert said in sent, said
    # the failed turn's session (sent back with the failure) holds its unanswered message, which
    # Claude Code sends with the new one
    last = api.message_requests[-1].last_user_text()
    assert last.endswith("What do you know about me?") and "And my number is 7." in last
    _, turns = await client.get_conversation(conversation.id)
    # prices of the bundled CLI for claude-sonnet-5-5: $2 / $10 per million in / out tokens
    assert [t.usage.cost_usd for t in turns] == pytest.approx([0.003, 0.0, 0.006])


async def test_claude_code_cancelled_turn_followed_by_another_tells_the_session_what_it_missed(
    api: FakeAnthropic, workdir: Path, cluster: Cluster
) -> None:
    claude_sdk()
    await cluster.start_server()
    await cluster.start_worker("worker-1", agents=["claude_code"], allow_cwd=[workdir])
    client = cluster.client()
    api.enqueue(Text("Noted: blue."))
    conversation, turn = await client.create_conversation(
        "claude_code", "My colour is blue.", options={"cwd": str(workdir)}
    )
    assert (await client.wait(turn.task_id)).status is TaskStatus.COMPLETED
    api.enqueue(Text(["tick "] * 200, delay=0.05))
    stream = client.send_message(conversation.id, "Count to 200 slowly.")
    cancelled = False
    async with contextlib.aclosing(stream) as events:
        async for event in events:
            # it answers: stop it (on its answer, not on output that comes before the request,
            # or the slow answer would be left for the next turn)
            if isinstance(event, OutputReceived) and "tick" in event.chunk.data and not cancelled:
                assert event.chunk.task_id is not None
                await client.cancel_task(event.chunk.task_id, "enough")
                cancelled = True
            if isinstance(event, TurnEnded):
                assert event.turn.status is TaskStatus.CANCELLED
    assert cancelled
    api.enqueue(Text("Your colour is blue."))
    ended = (await answer(client, conversation.id, "What is my colour?"))[-1]
    assert isinstance(ended, TurnEnded) and ended.turn.status is TaskStatus.COMPLETED
    assert ended.turn.answer == "Your colour is blue."
    request = api.message_requests[-1]
    sent = json.dumps(request.messages)
    assert "My colour is blue." in sent and "Noted: blue." in sent  # the resumed session
    prompt = request.last_user_text()
    assert "not in this session" in prompt and "Count to 200 slowly." in prompt
    assert "(this turn cancelled: cancelled: enough)" in prompt
    assert prompt.endswith("What is my colour?")
    _, turns = await client.get_conversation(conversation.id)
    assert [t.status for t in turns] == [
        TaskStatus.COMPLETED,
        TaskStatus.CANCELLED,
        TaskStatus.COMPLETED,
    ]


async def test_a_read_only_api_token_reads_conversations_but_cannot_send_a_message(
    api: FakeAnthropic, cluster: Cluster
) -> None:
    await start(cluster)  # with the public (TLS-only) port that serves API-token callers
    await cluster.start_worker("worker-1", agents=["anthropic"])
    admin = cluster.client()
    api.enqueue(Text("Hi."))
    conversation, turn = await admin.create_conversation("anthropic", "Hello.")
    await admin.wait(turn.task_id)
    secret, info = await admin.create_api_token("dashboard", ["read"])
    reader = token_client(cluster, secret)
    _, turns = await reader.get_conversation(conversation.id)
    assert [t.answer for t in turns] == ["Hi."]
    assert [c.id for c in await reader.list_conversations()] == [conversation.id]
    for refused in (
        answer(reader, conversation.id, "More?"),
        reader.create_conversation("anthropic", "Mine?"),
        reader.delete_conversation(conversation.id),
    ):
        await expect(
            refused,
            grpc.StatusCode.PERMISSION_DENIED,
            f"api-token {info.token_id} (dashboard) holds scopes [read]",
            "needs 'submit'",
        )
    stored, turns = await admin.get_conversation(conversation.id)
    assert stored.turns == 1 and len(turns) == 1
    writer = token_client(cluster, (await admin.create_api_token("bot", ["submit"]))[0])
    api.enqueue(Text("Sure."))
    events = await answer(writer, conversation.id, "More?")
    assert isinstance(events[-1], TurnEnded) and events[-1].turn.answer == "Sure."
