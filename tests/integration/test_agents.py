"""The `anthropic` and `support_triage` agents against a fake Messages API on loopback.

The fake (tests/fakes/anthropic_server.py) is a real HTTP server speaking the API's JSON and SSE
formats; the real `anthropic` client reaches it through ANTHROPIC_BASE_URL. Agents run directly
with a recording RunContext, and through a real control plane and worker (Cluster).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskrun.cli.client import OutputReceived
from taskrun.core.agent import AgentError, AgentResult
from taskrun.core.status import Fault, RunStatus, TaskStatus
from taskrun.worker.agents.anthropic_api import AnthropicAgent
from taskrun.worker.agents.support_triage import SupportTriageAgent
from tests.conftest import Cluster
from tests.fakes.anthropic_server import (
    DropMidStream,
    ErrorMidStream,
    FakeAnthropic,
    InvalidRequest,
    Overloaded,
    Text,
)
from tests.fakes.run_context import RecordingContext
from tests.ports import refusing_port

KEY = "sk-ant-test-key"


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeAnthropic]:
    """The fake API, with the worker environment pointing at it."""
    with FakeAnthropic(api_key=KEY) as fake:
        for name in list(os.environ):  # nothing from the developer's own setup leaks in
            if name.startswith(("ANTHROPIC_", "TASKRUN_ANTHROPIC_")):
                monkeypatch.delenv(name)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
        monkeypatch.setenv("TASKRUN_ANTHROPIC_MAX_RETRIES", "2")
        monkeypatch.setenv("ANTHROPIC_CONFIG_DIR", str(tmp_path / "anthropic-config"))
        yield fake


async def run_anthropic(**input: object) -> tuple[RecordingContext, AgentResult]:
    ctx = RecordingContext(input=dict(input))
    return ctx, await AnthropicAgent().run(ctx)


async def fails_with(
    agent_input: dict[str, object], *needles: str, fault: Fault = Fault.TASK
) -> RecordingContext:
    """The run fails saying each of `needles`, and whose fault it is (only the worker's count
    towards its quarantine)."""
    ctx = RecordingContext(input=agent_input)
    with pytest.raises(AgentError) as err:
        await AnthropicAgent().run(ctx)
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    assert err.value.fault is fault, str(err.value)
    return ctx


# -- anthropic: success --------------------------------------------------------------------------


async def test_anthropic_streams_each_delta_and_records_usage_and_result(
    api: FakeAnthropic,
) -> None:
    api.enqueue(
        Text(
            ["Hel", "lo, ", "world"],
            input_tokens=25,
            output_tokens=3,
            cache_read_input_tokens=1000,
            cache_creation_input_tokens=200,
        )
    )
    ctx = RecordingContext(input={"prompt": "Say hello"})
    result = await AnthropicAgent().run(ctx)

    assert ctx.texts == ["Hel", "lo, ", "world"]
    assert result.result == {
        "text": "Hello, world",
        "stop_reason": "end_turn",
        "model": "claude-sonnet-5-5",
    }
    u = result.usage
    assert (u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_creation_tokens) == (
        25,
        3,
        1000,
        200,
    )
    # list price of claude-sonnet-5-5: $2 in, $10 out per MTok; cache read 0.1x, write 1.25x
    assert u.cost_usd == pytest.approx((25 * 2 + 3 * 10 + 1000 * 0.2 + 200 * 2.5) / 1e6)
    assert result.backend_used is not None
    assert result.backend_used.provider == "anthropic"
    assert result.backend_used.model_name == "claude-sonnet-5-5"
    assert result.backend_used.context_window == 1_000_000

    [request] = api.message_requests
    assert request.stream
    assert request.body["model"] == "claude-sonnet-5-5"
    assert request.body["max_tokens"] == 1024
    assert request.body["messages"] == [{"role": "user", "content": "Say hello"}]
    assert "system" not in request.body and "temperature" not in request.body
    # anthropic 2.x sends the key as a bearer token; the Claude Code CLI as x-api-key
    assert request.headers.get("authorization") == f"Bearer {KEY}"


async def test_anthropic_sends_system_model_max_tokens_and_temperature(api: FakeAnthropic) -> None:
    await run_anthropic(
        prompt="Summarise", system="Be terse.", model="claude-haiku-5-5", max_tokens=50,
        temperature=0.2,
    )  # fmt: skip
    body = api.message_requests[0].body
    assert (body["system"], body["model"], body["max_tokens"], body["temperature"]) == (
        "Be terse.",
        "claude-haiku-5-5",
        50,
        0.2,
    )


async def test_anthropic_default_model_comes_from_the_environment(
    api: FakeAnthropic, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKRUN_ANTHROPIC_MODEL", "claude-opus-5-5")
    assert AnthropicAgent().spec.backends[0].model_name == "claude-opus-5-5"
    _, result = await run_anthropic(prompt="hi")
    assert api.message_requests[0].body["model"] == "claude-opus-5-5"
    assert result.backend_used is not None
    assert result.backend_used.model_name == "claude-opus-5-5"


async def test_anthropic_text_is_emitted_while_the_stream_is_still_open(
    api: FakeAnthropic,
) -> None:
    api.enqueue(Text(["first "] + ["more "] * 10, delay=0.05))
    ctx = RecordingContext(input={"prompt": "go"})
    run = asyncio.create_task(AnthropicAgent().run(ctx))
    await asyncio.wait_for(ctx.first_text.wait(), 5)
    assert api.streams_finished == 0  # the first delta arrived before the model finished
    await run
    assert ctx.output == "first " + "more " * 10


async def test_anthropic_retries_when_overloaded_then_succeeds(api: FakeAnthropic) -> None:
    api.enqueue(Overloaded(), Text("fine now"))
    ctx, _ = await run_anthropic(prompt="hi")
    assert ctx.output == "fine now"
    assert [r.headers.get("x-stainless-retry-count") for r in api.message_requests] == ["0", "1"]


# -- anthropic: failures -------------------------------------------------------------------------


async def test_anthropic_overloaded_after_all_retries_fails_saying_so(
    api: FakeAnthropic, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKRUN_ANTHROPIC_MAX_RETRIES", "1")
    api.enqueue(Overloaded(), Overloaded(), Text("never sent"))
    await fails_with(
        {"prompt": "hi"}, "overloaded (HTTP 529) after 1 retries", "Overloaded", fault=Fault.WORKER
    )
    assert len(api.message_requests) == 2


async def test_anthropic_bad_key_fails_with_authentication_failed(
    api: FakeAnthropic, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-wrong")
    await fails_with(
        {"prompt": "hi"},
        "authentication failed: check ANTHROPIC_API_KEY",
        "invalid x-api-key",
        fault=Fault.WORKER,
    )
    assert len(api.requests) == 1  # a 401 is not retried


async def test_anthropic_missing_key_says_how_to_fix_it(
    api: FakeAnthropic, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    # with a config dir the SDK looks for a profile there; without one it finds nothing at all
    missing = "no Anthropic credentials: set ANTHROPIC_API_KEY"
    await fails_with({"prompt": "hi"}, missing, fault=Fault.WORKER)
    monkeypatch.delenv("ANTHROPIC_CONFIG_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    await fails_with({"prompt": "hi"}, missing, fault=Fault.WORKER)
    assert api.requests == []


async def test_anthropic_invalid_request_carries_the_api_message(api: FakeAnthropic) -> None:
    api.enqueue(InvalidRequest("max_tokens: 200000 > 128000, the maximum for this model"))
    await fails_with(
        {"prompt": "hi"},
        "invalid request (HTTP 400): max_tokens: 200000 > 128000, the maximum for this model",
    )
    assert len(api.requests) == 1


async def test_anthropic_error_event_mid_stream_fails_the_run(api: FakeAnthropic) -> None:
    api.enqueue(ErrorMidStream(before=["partial "], type="overloaded_error", message="Overloaded"))
    ctx = await fails_with(
        {"prompt": "hi"}, "stream failed mid-response (overloaded_error)", fault=Fault.WORKER
    )
    assert ctx.texts == ["partial "]  # what came before the error was streamed
    # an error about the request itself is the task's, mid-stream too
    api.enqueue(ErrorMidStream(type="invalid_request_error", message="bad image"))
    await fails_with({"prompt": "hi"}, "(invalid_request_error): bad image", fault=Fault.TASK)


async def test_anthropic_connection_failure_names_the_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with refusing_port() as port:  # nothing listens there, nothing can while it is held
        monkeypatch.setenv("ANTHROPIC_BASE_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
        monkeypatch.setenv("TASKRUN_ANTHROPIC_MAX_RETRIES", "0")
        await fails_with(
            {"prompt": "hi"},
            f"could not connect to the Anthropic API at http://127.0.0.1:{port}",
            fault=Fault.WORKER,
        )


async def test_anthropic_connection_dropped_mid_stream_fails_the_run(api: FakeAnthropic) -> None:
    api.enqueue(DropMidStream(before=["partial "]))
    ctx = await fails_with(
        {"prompt": "hi"},
        f"the connection to the Anthropic API at {api.base_url} broke mid-response",
        fault=Fault.WORKER,
    )
    assert ctx.texts == ["partial "]


async def test_anthropic_bad_input_is_refused_before_any_request(api: FakeAnthropic) -> None:
    await fails_with({"prompt": "hi", "max_tokens": "lots"}, "invalid input: max_tokens")
    await fails_with({"system": "no prompt"}, "invalid input", "'prompt' is a required property")
    await fails_with({"prompt": "hi", "colour": "red"}, "invalid input", "colour")
    assert api.requests == []


async def test_anthropic_bad_retry_setting_is_reported(
    api: FakeAnthropic, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKRUN_ANTHROPIC_MAX_RETRIES", "many")
    await fails_with({"prompt": "hi"}, "TASKRUN_ANTHROPIC_MAX_RETRIES", fault=Fault.WORKER)


async def test_anthropic_cancel_mid_stream_stops_promptly(api: FakeAnthropic) -> None:
    api.enqueue(Text(["tick "] * 200, delay=0.05))  # ten seconds if left alone
    ctx = RecordingContext(input={"prompt": "count slowly"})
    run = asyncio.create_task(AnthropicAgent().run(ctx))
    await asyncio.wait_for(ctx.first_text.wait(), 5)
    started = time.monotonic()
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert time.monotonic() - started < 0.5
    emitted = len(ctx.texts)
    assert await asyncio.to_thread(api.client_gone.wait, 5)  # the HTTP stream was closed
    await asyncio.sleep(0.2)
    assert len(ctx.texts) == emitted < 200
    assert api.streams_finished == 0


# -- support_triage ------------------------------------------------------------------------------

TICKET = {"ticket_id": "T-1", "subject": "Cannot login", "body": "The password reset link 404s."}
VALID = {"category": "account", "priority": "high", "summary": "Password reset link is broken."}


async def test_triage_valid_answer_first_time(api: FakeAnthropic) -> None:
    api.enqueue(Text(json.dumps(VALID), input_tokens=100, output_tokens=20))
    ctx = RecordingContext(input=dict(TICKET))
    result = await SupportTriageAgent().run(ctx)
    assert result.result == {"ticket_id": "T-1", **VALID, "attempts": 1, "backend": "anthropic"}
    assert json.loads(ctx.output) == VALID
    assert [(e["attempt"], e["valid"]) for e in ctx.events_of("triage_attempt")] == [(1, True)]
    assert (result.usage.input_tokens, result.usage.output_tokens) == (100, 20)
    [request] = api.message_requests
    assert '"maxLength": 200' in request.body["system"]  # the schema is in the prompt
    assert "Cannot login" in request.last_user_text()


async def test_triage_retries_with_what_was_wrong_then_succeeds(api: FakeAnthropic) -> None:
    wrong = {"category": "hardware", "priority": "high", "summary": "x" * 250}
    api.enqueue(
        Text(json.dumps(wrong), input_tokens=100, output_tokens=20),
        Text("```json\n" + json.dumps(VALID) + "\n```", input_tokens=150, output_tokens=20),
    )
    ctx = RecordingContext(input=dict(TICKET))
    result = await SupportTriageAgent().run(ctx)
    assert result.result["attempts"] == 2
    attempts = ctx.events_of("triage_attempt")
    assert [(e["attempt"], e["valid"]) for e in attempts] == [(1, False), (2, True)]
    assert any("category" in e and "hardware" in e for e in attempts[0]["errors"])
    assert any("summary" in e and "too long" in e for e in attempts[0]["errors"])
    assert (result.usage.input_tokens, result.usage.turns) == (250, 2)
    retry = api.message_requests[1]
    assert [m["role"] for m in retry.messages] == ["user", "assistant", "user"]
    assert retry.messages[1]["content"] == json.dumps(wrong)
    assert "did not match the schema" in retry.last_user_text()
    assert "hardware" in retry.last_user_text()


async def test_triage_fails_clearly_after_two_retries(api: FakeAnthropic) -> None:
    api.enqueue(
        Text("I think this is an account problem."),
        Text(json.dumps({**VALID, "priority": "critical"})),
        Text(json.dumps({"category": "account"})),
    )
    ctx = RecordingContext(input=dict(TICKET))
    with pytest.raises(AgentError, match="did not match the triage schema after 3 attempts") as err:
        await SupportTriageAgent().run(ctx)
    assert "'priority' is a required property" in str(err.value)
    assert err.value.fault is Fault.TASK  # the model never met the schema: not the worker's doing
    assert len(api.message_requests) == 3
    assert [e["valid"] for e in ctx.events_of("triage_attempt")] == [False, False, False]
    assert "not valid JSON" in ctx.events_of("triage_attempt")[0]["errors"][0]


async def test_triage_bad_input_is_refused(api: FakeAnthropic) -> None:
    ctx = RecordingContext(input={"ticket_id": "T-1", "subject": "s", "backend": "gpt"})
    with pytest.raises(AgentError, match="invalid input"):
        await SupportTriageAgent().run(ctx)
    assert api.requests == []


# -- through the control plane and a worker ------------------------------------------------------


async def output_of(client, task_id: str) -> str:  # type: ignore[no-untyped-def]
    return "".join(
        [
            e.chunk.data
            async for e in client.follow(task_id, follow=False)
            if isinstance(e, OutputReceived)
        ]
    )


async def test_anthropic_task_runs_end_to_end_on_a_worker(
    api: FakeAnthropic, cluster: Cluster
) -> None:
    api.enqueue(Text(["Summary: ", "all ", "good."], input_tokens=40, output_tokens=3))
    await cluster.start_server()
    await cluster.start_worker("worker-1", agents=["anthropic"])
    client = cluster.client()
    task = await client.create_task("anthropic", {"prompt": "Summarise", "max_tokens": 100})
    final = await client.wait(task.id)
    assert final.status is TaskStatus.COMPLETED, final.error
    assert await output_of(client, task.id) == "Summary: all good."
    task, runs = await client.get_task(task.id)
    assert json.loads(task.result)["text"] == "Summary: all good."
    [run] = runs
    assert run.status is RunStatus.COMPLETED
    assert (run.usage.input_tokens, run.usage.output_tokens) == (40, 3)
    assert run.usage.cost_usd > 0
    assert run.backend_used is not None and run.backend_used.model_name == "claude-sonnet-5-5"
    assert task.usage.input_tokens == 40
    assert api.message_requests[0].body["max_tokens"] == 100


async def test_anthropic_failure_fails_the_task_with_the_reason(
    api: FakeAnthropic, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-wrong")
    await cluster.start_server()
    await cluster.start_worker("worker-1", agents=["anthropic"])
    client = cluster.client()
    task = await client.create_task("anthropic", {"prompt": "hi"}, max_attempts=1)
    final = await client.wait(task.id)
    assert final.status is TaskStatus.FAILED
    assert "authentication failed: check ANTHROPIC_API_KEY" in final.error


async def test_triage_task_runs_end_to_end_with_a_retry(
    api: FakeAnthropic, cluster: Cluster
) -> None:
    api.enqueue(Text('{"category": "login"}'), Text(json.dumps(VALID)))
    await cluster.start_server()
    await cluster.start_worker("worker-1", agents=["support_triage"])
    client = cluster.client()
    task = await client.create_task("support_triage", TICKET)
    final = await client.wait(task.id)
    assert final.status is TaskStatus.COMPLETED, final.error
    assert json.loads(final.result) == {
        "ticket_id": "T-1",
        **VALID,
        "attempts": 2,
        "backend": "anthropic",
    }


async def test_the_fake_api_also_answers_non_streaming_requests(api: FakeAnthropic) -> None:
    import anthropic

    api.enqueue(Text(["Hel", "lo"], input_tokens=7, output_tokens=2))
    async with anthropic.AsyncAnthropic(max_retries=0) as client:
        message = await client.messages.create(
            model="claude-haiku-5-5",
            max_tokens=10,
            messages=[{"role": "user", "content": "hi"}],
        )
    assert [b.text for b in message.content if b.type == "text"] == ["Hello"]
    assert (message.stop_reason, message.usage.input_tokens, message.model) == (
        "end_turn",
        7,
        "claude-haiku-5-5",
    )
    assert not api.message_requests[0].stream
