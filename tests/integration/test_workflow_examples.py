"""The workflows in examples/ run end to end against the fake Anthropic Messages API: a real
control plane (mTLS, SQLite), a real worker running the `anthropic` and `echo` agents, and the
approvals answered through the client as a person would."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskrun.core.workflow import StepStatus, WorkflowRun, WorkflowRunStatus
from tests.conftest import Cluster
from tests.fakes.anthropic_server import FakeAnthropic, RecordedRequest, Reply, Text

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
KEY = "sk-ant-test-key"


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeAnthropic]:
    with FakeAnthropic(api_key=KEY) as fake:
        for name in list(os.environ):
            if name.startswith(("ANTHROPIC_", "TASKRUN_ANTHROPIC_")):
                monkeypatch.delenv(name)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
        monkeypatch.setenv("TASKRUN_ANTHROPIC_MAX_RETRIES", "0")
        monkeypatch.setenv("ANTHROPIC_CONFIG_DIR", str(tmp_path / "anthropic-config"))
        yield fake


async def run_until(
    client: object, run_id: str, done: object, timeout: float = 20.0
) -> WorkflowRun:
    async with asyncio.timeout(timeout):
        while True:
            run: WorkflowRun = await client.get_workflow_run(run_id)  # type: ignore[attr-defined]
            if done(run):  # type: ignore[operator]
                return run
            await asyncio.sleep(0.05)


def waiting(step: str) -> object:
    return lambda run: run.steps[step].status is StepStatus.WAITING or run.status.finished


async def test_morning_briefing_summarizes_into_checked_json_and_asks_before_sending(
    cluster: Cluster, api: FakeAnthropic
) -> None:
    def reply(request: RecordedRequest) -> Reply:
        prompt = request.last_user_text()
        if "headlines about" in prompt:
            return Text("1. Grid storage doubles. 2. A new model. 3. Wind beats gas.")
        if "weather in Lisbon" in prompt:
            return Text("Sunny, 19 degrees.")
        assert "Grid storage doubles" in prompt and "Sunny, 19 degrees." in prompt, prompt
        return Text(
            ['```json\n{"headline": "Storage day", ', '"summary": "Sunny; grid news."}\n```']
        )

    api.default = reply
    await cluster.start_server()
    await cluster.start_worker("worker-1", agents=["anthropic", "echo"])
    client = cluster.client()
    workflow, _ = await client.put_workflow((EXAMPLES / "morning-briefing.yaml").read_text())
    run, _ = await client.start_workflow_run(
        workflow.name, {"city": "Lisbon", "topics": "energy"}, idempotency_key="brief-1"
    )
    again, created = await client.start_workflow_run(
        workflow.name, {"city": "Lisbon", "topics": "energy"}, idempotency_key="brief-1"
    )
    assert again.id == run.id and not created
    run = await run_until(client, run.id, waiting("review"))
    assert run.steps["summarize"].result == {
        "headline": "Storage day",
        "summary": "Sunny; grid news.",
    }
    [item] = await client.list_inbox()
    assert item.question == "Send today's briefing? Storage day" and item.choices == ("send",)
    news, weather = run.steps["news"], run.steps["weather"]
    assert news.finished_at and weather.finished_at and run.steps["summarize"].started_at
    assert run.steps["summarize"].started_at >= max(news.finished_at, weather.finished_at)
    await client.answer_inbox_item(item.id, approve=True, choice="send")
    run = await run_until(client, run.id, lambda r: r.status.finished)
    assert run.status is WorkflowRunStatus.COMPLETED, run.error
    sent, _ = await client.get_task(run.steps["send"].task_id)
    assert json.loads(sent.input) == {"text": "Storage day: Sunny; grid news."}


async def test_morning_briefing_fails_naming_the_step_when_the_model_breaks_the_schema(
    cluster: Cluster, api: FakeAnthropic
) -> None:
    api.default = lambda request: Text(
        '{"headline": ""}' if "briefing as JSON" in request.last_user_text() else "fine"
    )
    await cluster.start_server()
    await cluster.start_worker("worker-1", agents=["anthropic", "echo"])
    client = cluster.client()
    await client.put_workflow((EXAMPLES / "morning-briefing.yaml").read_text())
    run, _ = await client.start_workflow_run("morning-briefing", {"city": "Oslo", "topics": "x"})
    run = await run_until(client, run.id, lambda r: r.status.finished)
    assert run.status is WorkflowRunStatus.FAILED
    assert run.error.startswith("step 'summarize': output schema: result")
    assert run.steps["review"].status is StepStatus.CANCELLED
    assert await client.list_inbox() == []


async def test_code_review_loop_goes_back_with_the_comment_then_applies(
    cluster: Cluster, api: FakeAnthropic
) -> None:
    rounds: list[str] = []

    def reply(request: RecordedRequest) -> Reply:
        rounds.append(request.last_user_text())
        return Text(f"--- patch v{len(rounds)}")

    api.default = reply
    await cluster.start_server()
    await cluster.start_worker("worker-1", agents=["anthropic", "echo"])
    client = cluster.client()
    await client.put_workflow((EXAMPLES / "code-review.yaml").read_text())
    run, _ = await client.start_workflow_run("code-review", {"task": "add retries"})
    run = await run_until(client, run.id, waiting("review_1"))
    [item] = await client.list_inbox()
    assert item.step == "review_1" and "--- patch v1" in item.question
    await client.answer_inbox_item(item.id, approve=False, comment="handle 429 too")
    run = await run_until(client, run.id, waiting("review_2"))
    assert "patch v1" in rounds[1] and "handle 429 too" in rounds[1]
    [item] = await client.list_inbox()
    await client.answer_inbox_item(item.id, approve=True)
    run = await run_until(client, run.id, lambda r: r.status.finished)
    assert run.status is WorkflowRunStatus.COMPLETED, run.error
    statuses = {name: step.status.name.lower() for name, step in run.steps.items()}
    assert statuses == {
        "propose_1": "completed",
        "review_1": "completed",
        "propose_2": "completed",
        "review_2": "completed",
        "propose_3": "skipped",
        "review_3": "skipped",
        "apply": "completed",
    }
    applied, _ = await client.get_task(run.steps["apply"].task_id)
    assert json.loads(applied.input) == {"text": "--- patch v2"}
    assert len(rounds) == 2


async def test_code_review_rejected_three_times_fails_naming_the_last_round(
    cluster: Cluster, api: FakeAnthropic
) -> None:
    api.default = lambda request: Text("--- patch")
    await cluster.start_server()
    await cluster.start_worker("worker-1", agents=["anthropic", "echo"])
    client = cluster.client()
    await client.put_workflow((EXAMPLES / "code-review.yaml").read_text())
    run, _ = await client.start_workflow_run("code-review", {"task": "t"})
    for n in (1, 2, 3):
        run = await run_until(client, run.id, waiting(f"review_{n}"))
        [item] = await client.list_inbox()
        assert item.step == f"review_{n}"
        await client.answer_inbox_item(item.id, approve=False, comment=f"no {n}")
    run = await run_until(client, run.id, lambda r: r.status.finished)
    assert run.status is WorkflowRunStatus.FAILED
    assert run.error.startswith("step 'review_3': rejected by ") and run.error.endswith(": no 3")
    assert run.steps["apply"].status is StepStatus.CANCELLED


async def test_a_schedule_starts_the_morning_briefing(cluster: Cluster, api: FakeAnthropic) -> None:
    from taskrun.core.schedule import Schedule

    api.default = lambda request: Text(
        '{"headline": "H", "summary": "S"}'
        if "briefing as JSON" in request.last_user_text()
        else "ok"
    )
    await cluster.start_server()
    await cluster.start_worker("worker-1", agents=["anthropic", "echo"])
    client = cluster.client()
    await client.put_workflow((EXAMPLES / "morning-briefing.yaml").read_text())
    await client.create_schedule(
        Schedule(
            name="briefing",
            agent="",
            workflow="morning-briefing",
            input='{"city": "Lisbon", "topics": "energy"}',
            timezone="Europe/Lisbon",
            rrule="FREQ=SECONDLY",
        )
    )
    async with asyncio.timeout(20):
        while not (items := await client.list_inbox()):
            await asyncio.sleep(0.05)
    await client.delete_schedule("briefing")  # later occurrences were skipped (overlap)
    run = await client.get_workflow_run(items[0].run_id)
    assert run.idempotency_key.startswith("schedule:briefing:")
    await client.answer_inbox_item(items[0].id, approve=True, choice="send")
    run = await run_until(client, run.id, lambda r: r.status.finished)
    assert run.status is WorkflowRunStatus.COMPLETED, run.error
    runs = await client.list_workflow_runs("morning-briefing")
    assert [r.id for r in runs] == [run.id]  # overlap skip: one run at a time


async def test_a_condition_branches_on_a_models_schema_checked_output(
    cluster: Cluster, api: FakeAnthropic
) -> None:
    api.default = lambda request: Text(
        '{"severity": 9, "why": "outage"}' if "Rate" in request.last_user_text() else "paged"
    )
    await cluster.start_server()
    await cluster.start_worker("worker-1", agents=["anthropic", "echo"])
    client = cluster.client()
    await client.put_workflow(
        """
name: triage
steps:
  rate:
    type: task
    agent: anthropic
    input: {prompt: "Rate this ticket as JSON {severity, why}: ${input.ticket}"}
    json_field: text
    output_schema:
      type: object
      required: [severity]
      properties: {severity: {type: integer, minimum: 0, maximum: 10}}
  urgent:
    type: condition
    needs: [rate]
    expression: "steps.rate.result.severity >= `7`"
    then: [page]
    else: [queue]
  page: {type: task, agent: anthropic, input: {prompt: "Page on-call: ${steps.rate.result.why}"}}
  queue: {type: task, agent: echo, input: {text: later}}
"""
    )
    run, _ = await client.start_workflow_run("triage", {"ticket": "site down"})
    run = await run_until(client, run.id, lambda r: r.status.finished)
    assert run.status is WorkflowRunStatus.COMPLETED, run.error
    assert run.steps["rate"].result == {"severity": 9, "why": "outage"}
    assert run.steps["urgent"].result is True and run.steps["urgent"].branch == "then"
    assert run.steps["page"].status is StepStatus.COMPLETED
    assert run.steps["queue"].status is StepStatus.SKIPPED
    page, _ = await client.get_task(run.steps["page"].task_id)
    assert json.loads(page.input) == {"prompt": "Page on-call: outage"}
