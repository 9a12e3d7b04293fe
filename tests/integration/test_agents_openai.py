"""The `openai` agent against a fake OpenAI-compatible chat completions API on loopback.

The fake (tests/fakes/openai_server.py) is a real HTTP server speaking the chat completions JSON
and SSE formats; the real `openai` SDK reaches it through OPENAI_BASE_URL, as it would vLLM,
llama.cpp or Ollama. The agent runs directly with a recording RunContext, and through a real
control plane and worker (Cluster).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator

import pytest

from taskrun.cli.client import OutputReceived
from taskrun.core.agent import AgentError, CostLimitReached
from taskrun.core.ids import ConversationId
from taskrun.core.models import ModelSettings, RunOptions, TranscriptMessage, TurnContext
from taskrun.core.status import Fault, RunStatus, TaskStatus
from taskrun.worker.agents.openai_api import OpenAIAgent
from tests.conftest import Cluster
from tests.fakes.openai_server import Chat, Error, FakeOpenAI
from tests.fakes.run_context import RecordingContext

KEY = "sk-openai-test"
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "population": {"type": "integer", "minimum": 0}},
    "required": ["city", "population"],
    "additionalProperties": False,
}


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_key=KEY) as fake:
        for name in list(os.environ):
            if name.startswith(("OPENAI_", "TASKRUN_OPENAI_", "TASKRUN_MODEL_PRICES")):
                monkeypatch.delenv(name)
        monkeypatch.setenv("OPENAI_BASE_URL", fake.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        monkeypatch.setenv("TASKRUN_OPENAI_MAX_RETRIES", "0")
        yield fake


async def test_openai_streams_each_delta_and_reports_usage_and_cost(api: FakeOpenAI) -> None:
    api.enqueue(Chat(["Hel", "lo ", "there."], prompt_tokens=1000, completion_tokens=500))
    ctx = RecordingContext(input={"prompt": "hi", "model": "gpt-4.1-mini"})
    result = await OpenAIAgent().run(ctx)
    assert ctx.texts == ["Hel", "lo ", "there."]
    assert result.result == {"text": "Hello there.", "stop_reason": "stop", "model": "gpt-4.1-mini"}
    assert (result.usage.input_tokens, result.usage.output_tokens) == (1000, 500)
    # gpt-4.1-mini: $0.40 in, $1.60 out per million tokens
    assert result.usage.cost_usd == pytest.approx((1000 * 0.40 + 500 * 1.60) / 1e6)
    assert result.backend_used is not None and result.backend_used.provider == "openai"
    [request] = api.chat_requests
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.body["stream"] is True
    assert request.body["stream_options"] == {"include_usage": True}
    assert request.body["messages"] == [{"role": "user", "content": "hi"}]
    assert ctx.events_of("cost_unknown") == []


async def test_openai_model_settings_reach_the_api(api: FakeOpenAI) -> None:
    settings = ModelSettings(
        system_prompt="You are terse.", max_tokens=77, temperature=1.5, stop_sequences=["END"]
    )
    ctx = RecordingContext(
        input={"prompt": "hi", "system": "ignored: the task's setting wins"},
        options=RunOptions(model_settings=settings),
    )
    await OpenAIAgent().run(ctx)
    [request] = api.chat_requests
    assert request.body["messages"][0] == {"role": "system", "content": "You are terse."}
    assert request.body["max_completion_tokens"] == 77
    assert request.body["temperature"] == 1.5
    assert request.body["stop"] == ["END"]


async def test_openai_older_servers_get_max_tokens(
    api: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKRUN_OPENAI_MAX_TOKENS_FIELD", "max_tokens")
    await OpenAIAgent().run(RecordingContext(input={"prompt": "hi", "max_tokens": 12}))
    [request] = api.chat_requests
    assert request.body["max_tokens"] == 12 and "max_completion_tokens" not in request.body


async def test_openai_continues_a_conversation_from_its_transcript(api: FakeOpenAI) -> None:
    turn = TurnContext(
        conversation_id=ConversationId("cnv_1"),
        turn=2,
        history=(
            TranscriptMessage("user", "My name is Ana.", 1),
            TranscriptMessage("assistant", "Hi Ana.", 1),
        ),
    )
    ctx = RecordingContext(input={"prompt": "What is my name?"}, conversation=turn)
    await OpenAIAgent().run(ctx)
    [request] = api.chat_requests
    assert request.body["messages"] == [
        {"role": "user", "content": "My name is Ana."},
        {"role": "assistant", "content": "Hi Ana."},
        {"role": "user", "content": "What is my name?"},
    ]


async def test_openai_output_schema_is_asked_for_then_reasked_with_the_errors(
    api: FakeOpenAI,
) -> None:
    api.enqueue(
        Chat('{"city": "Lyon"}', prompt_tokens=50, completion_tokens=5),
        Chat('{"city": "Lyon", "population": 522250}', prompt_tokens=80, completion_tokens=9),
    )
    ctx = RecordingContext(input={"prompt": "Biggest city on the Rhone?"})
    ctx.options = RunOptions(output_schema=SCHEMA, output_retries=2)
    result = await OpenAIAgent().run(ctx)
    assert result.result == {"city": "Lyon", "population": 522250}
    assert [(e["attempt"], e["valid"]) for e in ctx.events_of("output_attempt")] == [
        (1, False),
        (2, True),
    ]
    assert "'population' is a required property" in ctx.events_of("output_attempt")[0]["errors"][0]
    assert (result.usage.input_tokens, result.usage.turns) == (130, 2)
    first, again = api.chat_requests
    assert first.body["response_format"]["json_schema"]["schema"] == SCHEMA
    assert json.dumps(SCHEMA) in first.body["messages"][0]["content"]  # also in the prompt
    assert [m["role"] for m in again.body["messages"]] == ["system", "user", "assistant", "user"]
    assert "'population' is a required property" in again.body["messages"][-1]["content"]
    # the output is the valid answer, not the rejected one
    assert json.loads(ctx.output) == {"city": "Lyon", "population": 522250}


async def test_openai_unknown_model_says_its_cost_is_unknown_and_how_to_add_it(
    api: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = RecordingContext(input={"prompt": "hi", "model": "llama-3.3-70b"})
    result = await OpenAIAgent().run(ctx)
    assert result.usage.cost_usd == 0
    [event] = ctx.events_of("cost_unknown")
    assert "llama-3.3-70b" in event["hint"] and "TASKRUN_MODEL_PRICES" in event["hint"]
    assert result.result["warnings"] == [event["hint"]]

    monkeypatch.setenv("TASKRUN_MODEL_PRICES", "llama-3.3-70b=1/2")
    api.enqueue(Chat("x", prompt_tokens=1_000_000, completion_tokens=1_000_000))
    ctx = RecordingContext(input={"prompt": "hi", "model": "llama-3.3-70b"})
    result = await OpenAIAgent().run(ctx)
    assert result.usage.cost_usd == pytest.approx(3.0)
    assert ctx.events_of("cost_unknown") == [] and "warnings" not in result.result


async def test_openai_bad_key_fails_saying_so(
    api: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    with pytest.raises(AgentError, match="authentication failed: check OPENAI_API_KEY") as err:
        await OpenAIAgent().run(RecordingContext(input={"prompt": "hi"}))
    assert "Incorrect API key provided" in str(err.value)
    assert err.value.fault is Fault.WORKER  # counts towards the worker's quarantine


async def test_openai_without_key_or_base_url_says_how_to_configure(
    api: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.delenv("OPENAI_BASE_URL")
    with pytest.raises(AgentError, match="set OPENAI_API_KEY on the worker") as err:
        await OpenAIAgent().run(RecordingContext(input={"prompt": "hi"}))
    assert err.value.fault is Fault.WORKER
    assert api.requests == []


async def test_openai_local_server_needs_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeOpenAI() as local:  # like Ollama: any key or none
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        monkeypatch.setenv("OPENAI_BASE_URL", local.base_url)
        result = await OpenAIAgent().run(RecordingContext(input={"prompt": "hi"}))
    assert result.result["text"] == "Hello from the fake OpenAI API."


async def test_openai_server_error_carries_the_message(api: FakeOpenAI) -> None:
    api.enqueue(Error(500, "the GPU fell over", "server_error"))
    with pytest.raises(AgentError, match=r"HTTP 500\) \(retries off\): the GPU fell over") as err:
        await OpenAIAgent().run(RecordingContext(input={"prompt": "hi"}))
    assert err.value.fault is Fault.WORKER


async def test_openai_cost_limit_stops_between_calls_with_usage_kept(api: FakeOpenAI) -> None:
    # each call costs (100000 * 0.40 + 10 * 1.60) / 1e6 = $0.040016; the limit is crossed by
    # the first, so the re-ask is never sent
    api.enqueue(Chat("not json", prompt_tokens=100_000, completion_tokens=10))
    ctx = RecordingContext(input={"prompt": "hi", "model": "gpt-4.1-mini"})
    ctx.options = RunOptions(output_schema=SCHEMA, output_retries=2, max_cost_usd=0.01)
    with pytest.raises(CostLimitReached, match=r"cost limit reached.*\$0\.0400.*\$0\.0100") as err:
        await OpenAIAgent().run(ctx)
    assert err.value.usage is not None and err.value.usage.input_tokens == 100_000
    assert len(api.chat_requests) == 1
    assert err.value.fault is Fault.TASK  # the task's own limit: not the worker's doing


async def test_openai_stream_cut_mid_response_fails_saying_so(api: FakeOpenAI) -> None:
    api.enqueue(Chat(["one ", "two ", "three"], drop_after=2))
    ctx = RecordingContext(input={"prompt": "hi"})
    with pytest.raises(AgentError, match="broke mid-response after 3 chunks") as err:
        await OpenAIAgent().run(ctx)
    assert api.base_url in str(err.value)
    assert err.value.fault is Fault.WORKER
    assert ctx.texts == ["one ", "two "]  # what arrived was streamed


async def test_openai_server_without_usage_still_answers(api: FakeOpenAI) -> None:
    api.enqueue(Chat("hi", usage=False))
    result = await OpenAIAgent().run(RecordingContext(input={"prompt": "hi"}))
    assert result.result["text"] == "hi"
    assert (result.usage.input_tokens, result.usage.turns) == (0, 1)


async def test_openai_cancel_mid_stream_stops_reading(api: FakeOpenAI) -> None:
    api.enqueue(Chat(["tick "] * 200, delay=0.05))
    ctx = RecordingContext(input={"prompt": "count"})
    run = asyncio.create_task(OpenAIAgent().run(ctx))
    while not ctx.texts:
        await asyncio.sleep(0.01)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    emitted = len(ctx.texts)
    await asyncio.sleep(0.3)  # several deltas' worth: none arrives after the cancel
    assert len(ctx.texts) == emitted < 200


# -- through the control plane and a worker -----------------------------------------------------


async def test_openai_task_on_a_worker_streams_and_continues_the_conversation(
    api: FakeOpenAI, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    api.enqueue(Chat(["Hi ", "Ana."], prompt_tokens=20, completion_tokens=2))
    # the input's model binds dispatch: the worker must announce it
    monkeypatch.setenv("TASKRUN_OPENAI_MODELS", "gpt-4.1-mini,gpt-4o")
    await cluster.start_server()
    await cluster.start_worker("worker-1", agents=["openai"])
    client = cluster.client()
    task = await client.create_task("openai", {"prompt": "My name is Ana.", "model": "gpt-4o"})
    final = await client.wait(task.id)
    assert final.status is TaskStatus.COMPLETED, final.error
    texts = [
        e.chunk.data
        async for e in client.follow(task.id, follow=False)
        if isinstance(e, OutputReceived) and e.chunk.kind.name == "TEXT"
    ]
    assert "".join(texts) == "Hi Ana."
    _, [run] = await client.get_task(task.id)
    assert run.status is RunStatus.COMPLETED
    assert (run.usage.input_tokens, run.usage.output_tokens) == (20, 2)
    assert run.usage.cost_usd == pytest.approx((20 * 2.50 + 2 * 10.0) / 1e6)
    assert run.backend_used is not None and run.backend_used.provider == "openai"

    api.enqueue(Chat("Ana.", prompt_tokens=30, completion_tokens=1))
    turn = await client.continue_task(task.id, "What is my name?")
    done = await client.wait(turn.id)
    assert done.status is TaskStatus.COMPLETED, done.error
    second = api.chat_requests[-1]
    assert second.body["model"] == "gpt-4o"  # the conversation's options carry over
    assert second.body["messages"] == [
        {"role": "user", "content": "My name is Ana."},
        {"role": "assistant", "content": "Hi Ana."},
        {"role": "user", "content": "What is my name?"},
    ]
