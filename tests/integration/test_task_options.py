"""What a task asks of its agent's model, through a real control plane and worker: the output
schema (asked for, re-asked, checked by the worker), model settings reaching the model API,
the per-task cost limit, over gRPC (the client), HTTP and MCP."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskrun.core.models import ModelSettings
from taskrun.core.status import RunStatus, TaskStatus
from taskrun.worker.agents.anthropic_api import AnthropicAgent
from tests.conftest import Cluster
from tests.fakes.anthropic_server import FakeAnthropic, Text
from tests.fakes.run_context import RecordingContext
from tests.integration.test_http_api import api as http_api
from tests.integration.test_http_api import assert_problem, start_http
from tests.integration.test_mcp import error_text, mcp_client, structured

KEY = "sk-ant-test-key"
SCHEMA = {
    "type": "object",
    "properties": {"verdict": {"enum": ["yes", "no"]}, "reason": {"type": "string"}},
    "required": ["verdict", "reason"],
    "additionalProperties": False,
}


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeAnthropic]:
    with FakeAnthropic(api_key=KEY) as fake:
        for name in list(os.environ):
            if name.startswith(("ANTHROPIC_", "TASKRUN_ANTHROPIC_", "TASKRUN_MODEL_PRICES")):
                monkeypatch.delenv(name)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
        monkeypatch.setenv("TASKRUN_ANTHROPIC_MAX_RETRIES", "0")
        monkeypatch.setenv("ANTHROPIC_CONFIG_DIR", str(tmp_path / "anthropic-config"))
        yield fake


async def started(cluster: Cluster, agent: str = "anthropic"):  # type: ignore[no-untyped-def]
    await cluster.start_server()
    await cluster.start_worker("worker-1", agents=[agent])
    return cluster.client()


async def test_output_schema_is_reasked_on_the_worker_then_the_result_is_the_answer(
    api: FakeAnthropic, cluster: Cluster
) -> None:
    api.enqueue(
        Text('{"verdict": "maybe"}', input_tokens=30, output_tokens=4),
        Text('{"verdict": "yes", "reason": "it is"}', input_tokens=60, output_tokens=8),
    )
    client = await started(cluster)
    task = await client.create_task(
        "anthropic", {"prompt": "Is water wet?"}, output_schema=SCHEMA, output_retries=1
    )
    final = await client.wait(task.id)
    assert final.status is TaskStatus.COMPLETED, final.error
    assert json.loads(final.result) == {"verdict": "yes", "reason": "it is"}
    assert final.usage.input_tokens == 90  # both calls counted
    first, again = api.message_requests
    assert json.dumps(SCHEMA) in first.body["system"]
    assert "'maybe' is not one of ['yes', 'no']" in again.last_user_text()
    assert "'reason' is a required property" in again.last_user_text()
    stored, _ = await client.get_task(task.id)
    assert json.loads(stored.policy.output_schema) == SCHEMA


async def test_output_schema_exhausted_fails_the_run_listing_what_did_not_validate(
    api: FakeAnthropic, cluster: Cluster
) -> None:
    api.default = Text("Yes, water is wet.", input_tokens=10, output_tokens=5)
    client = await started(cluster)
    task = await client.create_task(
        "anthropic", {"prompt": "Is water wet?"}, output_schema=SCHEMA, output_retries=2,
        max_attempts=1,
    )  # fmt: skip
    final = await client.wait(task.id)
    assert final.status is TaskStatus.FAILED
    assert "did not match the output schema after 3 attempts" in final.error
    assert "the reply is not valid JSON" in final.error
    assert len(api.message_requests) == 3
    _, [run] = await client.get_task(task.id)
    assert run.usage.input_tokens == 30  # what the failed run spent is kept


async def test_the_worker_checks_the_result_of_any_agent_against_the_schema(
    cluster: Cluster,
) -> None:
    client = await started(cluster, "echo")
    bad = await client.create_task(
        "echo", {"text": "hi"}, output_schema={"required": ["answer"]}, max_attempts=1
    )
    good = await client.create_task("echo", {"text": "hi"}, output_schema={"required": ["chars"]})
    failed, done = await client.wait(bad.id), await client.wait(good.id)
    assert failed.status is TaskStatus.FAILED
    assert failed.error == (
        "the result does not match the task's output schema: (root): 'answer' is a required "
        "property"
    )
    assert done.status is TaskStatus.COMPLETED and json.loads(done.result)["chars"] == 2


async def test_model_settings_reach_the_model_api(api: FakeAnthropic, cluster: Cluster) -> None:
    client = await started(cluster)
    settings = ModelSettings(
        system_prompt="Answer in French.", max_tokens=321, temperature=0.3, stop_sequences=["##"]
    )
    task = await client.create_task(
        "anthropic", {"prompt": "hello", "max_tokens": 50}, model_settings=settings
    )
    assert (await client.wait(task.id)).status is TaskStatus.COMPLETED
    [request] = api.message_requests
    assert request.body["system"] == "Answer in French."
    assert request.body["max_tokens"] == 321  # the setting wins over the input's
    assert request.body["temperature"] == 0.3
    assert request.body["stop_sequences"] == ["##"]
    stored, _ = await client.get_task(task.id)
    assert stored.policy.model_settings == settings


async def test_cost_limit_stops_the_run_and_keeps_its_usage(
    api: FakeAnthropic, cluster: Cluster
) -> None:
    # claude-sonnet-5-5 at $2 per million input tokens: each call costs $0.02 + a little; the
    # limit of $0.03 is crossed by the second call, so the third is never made
    api.default = Text("not json", input_tokens=10_000, output_tokens=1)
    client = await started(cluster)
    task = await client.create_task(
        "anthropic", {"prompt": "hi"}, output_schema=SCHEMA, output_retries=5, max_cost_usd=0.03,
        max_attempts=1,
    )  # fmt: skip
    final = await client.wait(task.id)
    assert final.status is TaskStatus.FAILED
    assert final.error.startswith("cost limit reached: the run spent $0.0400")
    assert "limit of $0.0300" in final.error
    assert len(api.message_requests) == 2
    _, [run] = await client.get_task(task.id)
    assert run.status is RunStatus.FAILED
    assert run.usage.input_tokens == 20_000 and run.usage.cost_usd > 0.03


async def test_cost_limit_applies_to_a_single_call_that_costs_more(
    api: FakeAnthropic, cluster: Cluster
) -> None:
    api.enqueue(Text("a long answer", input_tokens=50_000, output_tokens=1))
    client = await started(cluster)
    task = await client.create_task(
        "anthropic", {"prompt": "hi"}, max_cost_usd=0.01, max_attempts=1
    )
    final = await client.wait(task.id)
    assert final.status is TaskStatus.FAILED and "cost limit reached" in final.error
    assert final.usage.input_tokens == 50_000


async def test_http_takes_the_options_and_names_a_bad_field(cluster: Cluster) -> None:
    async with http_api(cluster, "submit") as client:
        policy = {
            "output_schema_json": json.dumps(SCHEMA),
            "model_settings": {"system_prompt": "be brief", "max_tokens": 10},
            "max_cost_usd": 0.5,
        }
        body = {"agent": "echo", "allow_unknown_agent": True, "input_json": "{}", "policy": policy}
        created = await client.post("/v1/tasks", json=body)
        assert created.status_code == 201, created.text
        got = created.json()["task"]["policy"]
        assert json.loads(got["output_schema_json"]) == SCHEMA
        assert got["model_settings"]["max_tokens"] == 10 and got["max_cost_usd"] == 0.5
        bad = {**body, "policy": {"output_schema_json": '{"type": "banana"}'}}
        problem = assert_problem(await client.post("/v1/tasks", json=bad), 400, "banana")
        assert problem["field"] == "policy.output_schema_json"
        bad = {**body, "policy": {"model_settings": {"max_tokens": -1}}}
        problem = assert_problem(await client.post("/v1/tasks", json=bad), 400)
        assert problem["field"] == "policy.model_settings.max_tokens"


async def test_mcp_create_task_takes_an_output_schema(cluster: Cluster) -> None:
    base = await start_http(cluster)
    await cluster.start_worker("worker-1")
    token, _ = await cluster.client().create_api_token("assistant", ["submit"])
    async with mcp_client(cluster, base, token) as client:
        done = structured(
            await client.call_tool(
                "create_task",
                {
                    "agent": "echo",
                    "input": {"text": "hi"},
                    "output_schema": {"required": ["answer"]},
                    "max_cost_usd": 1,
                    "wait": True,
                },
            )
        )
        assert done["status"] == "failed"
        assert "does not match the task's output schema" in json.dumps(done)
        refused = error_text(
            await client.call_tool(
                "create_task",
                {"agent": "echo", "model_settings": {"max_tokens": -3}},
            )
        )
        assert refused.startswith("INVALID_ARGUMENT") and "model_settings.max_tokens" in refused
        refused = error_text(
            await client.call_tool(
                "create_task", {"agent": "echo", "model_settings": {"no_such": 1}}
            )
        )
        assert refused.startswith("model_settings:") and "no_such" in refused
    [task] = [t for t in (await cluster.client().list_tasks())[0] if t.id == done["task_id"]]
    assert json.loads(task.policy.output_schema) == {"required": ["answer"]}
    assert task.policy.max_cost_usd == 1


async def test_a_model_missing_from_the_price_table_says_its_cost_is_unknown(
    api: FakeAnthropic, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = RecordingContext(input={"prompt": "hi", "model": "claude-mystery-9"})
    result = await AnthropicAgent().run(ctx)
    assert result.usage.cost_usd == 0 and result.usage.input_tokens > 0
    [event] = ctx.events_of("cost_unknown")
    assert event["hint"].startswith("cost unknown: model 'claude-mystery-9' is not in the price")
    assert "TASKRUN_MODEL_PRICES='MODEL=INPUT/OUTPUT'" in event["hint"]
    assert result.result["warnings"] == [event["hint"]]
    monkeypatch.setenv("TASKRUN_MODEL_PRICES", "claude-mystery-9=1000000/0")
    ctx = RecordingContext(input={"prompt": "hi", "model": "claude-mystery-9"})
    priced = await AnthropicAgent().run(ctx)
    assert priced.usage.cost_usd == priced.usage.input_tokens  # $1 a token, as configured
    assert ctx.events_of("cost_unknown") == []
