"""Workflows end to end: a real control plane on loopback (mTLS, SQLite), real workers running
the echo agent, control-plane restarts while steps wait."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypedDict

import grpc
import pytest
import structlog

from taskrun.cli import main as cli
from taskrun.cli.client import EventKind
from taskrun.controlplane.workflows.executor import WorkflowExecutor
from taskrun.core.errors import InvalidArgument, NotFound
from taskrun.core.workflow import StepStatus, WorkflowRun, WorkflowRunStatus
from tests.conftest import Cluster

TWO_STEPS = """
name: two-steps
steps:
  first:
    type: task
    agent: echo
    input: {text: "${input.topic}"}
  second:
    type: task
    agent: echo
    needs: [first]
    input: {text: "the first saw ${steps.first.result.chars} chars of ${input.topic}"}
"""


def executor(cluster: Cluster) -> WorkflowExecutor:
    assert cluster.server is not None and cluster.server.workflows is not None
    return cluster.server.workflows


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


async def finished(cluster: Cluster, run_id: str, timeout: float = 15.0) -> WorkflowRun:
    async def done() -> bool:
        return (await executor(cluster).get_run(run_id)).status.finished

    await eventually(done, timeout)
    return await executor(cluster).get_run(run_id)


async def step_is(cluster: Cluster, run_id: str, step: str, status: StepStatus) -> None:
    async def check() -> bool:
        return (await executor(cluster).get_run(run_id)).steps[step].status is status

    await eventually(check)


async def test_two_task_steps_pass_data(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    workflow, created = await executor(cluster).put_workflow(TWO_STEPS)
    assert created and workflow.version == 1
    run, _ = await executor(cluster).start_run("two-steps", {"topic": "tides"})
    done = await finished(cluster, run.id)
    assert done.status is WorkflowRunStatus.COMPLETED, done.error
    assert done.steps["first"].result == {"chars": 5, "chunks": 1}
    client = cluster.client()
    second, _ = await client.get_task(done.steps["second"].task_id)
    assert '"the first saw 5 chars of tides"' in second.input
    first = done.steps["first"]
    assert first.finished_at is not None and done.steps["second"].started_at is not None
    assert first.finished_at <= done.steps["second"].started_at


async def test_invalid_definitions_name_the_path(cluster: Cluster) -> None:
    await cluster.start_server()
    bad = {
        "name: x\nsteps:\n  a: {type: task}\n": ("steps.a", "'agent' is a required property"),
        "name: x\nsteps:\n  a: {type: task, agent: echo, needs: [b]}\n": (
            "steps.a.needs[0]",
            "names no step 'b'",
        ),
        "name: x\nsteps:\n  a: {type: bogus}\n": ("steps.a.type", "is not one of"),
        (
            "name: x\nsteps:\n  a: {type: condition, expression: 'a ==', then: [b]}\n"
            "  b: {type: wait, duration: 1}\n"
        ): (
            "steps.a.expression",
            "JMESPath",
        ),
        "name: x\nsteps:\n  a: {type: wait, until: '07:00', timezone: Mars/Base}\n": (
            "steps.a.timezone",
            "IANA",
        ),
        (
            "name: x\nsteps:\n  a: {type: task, agent: e, needs: [b]}\n"
            "  b: {type: task, agent: e, needs: [a]}\n"
        ): (
            "steps.a.needs",
            "cycle",
        ),
    }
    for text, (field, message) in bad.items():
        with pytest.raises(InvalidArgument) as info:
            await executor(cluster).put_workflow(text)
        assert info.value.field == field, text
        assert message in info.value.message, (text, info.value.message)


async def restart(cluster: Cluster) -> None:
    await cluster.stop_server()
    await cluster.start_server()


async def step_tasks(cluster: Cluster, run_id: str, step: str) -> list[Any]:
    tasks, _ = await cluster.client().list_tasks(
        labels={"workflow_run": run_id, "step": step}, limit=100
    )
    return list(tasks)


APPROVAL = """
name: publish
steps:
  draft:
    type: task
    agent: echo
    input: {text: "${input.topic}"}
  review:
    type: approval
    needs: [draft]
    question: "Publish the ${steps.draft.result.chars}-char draft about ${input.topic}?"
    choices: [publish, shelve]
    timeout: 600
    branches:
      publish: [send]
      shelve: [archive]
      rejected: [archive]
  send:
    type: task
    agent: echo
    input: {text: "sent"}
  archive:
    type: task
    agent: echo
    input: {text: "archived"}
"""


async def test_approval_survives_a_restart_and_takes_the_chosen_branch(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    await executor(cluster).put_workflow(APPROVAL)
    run, _ = await executor(cluster).start_run("publish", {"topic": "owls"})
    await step_is(cluster, run.id, "review", StepStatus.WAITING)
    [item] = executor(cluster).inbox()
    assert item.question == "Publish the 4-char draft about owls?"
    assert item.choices == ("publish", "shelve") and item.run_id == run.id
    await restart(cluster)
    [again] = executor(cluster).inbox()
    assert again == item  # the same item, still waiting
    with pytest.raises(InvalidArgument) as info:
        await executor(cluster).answer(item.id, approve=True, choice="maybe")
    assert info.value.field == "choice" and "publish, shelve" in info.value.message
    await executor(cluster).answer(item.id, approve=True, choice="publish", comment="ship it")
    done = await finished(cluster, run.id)
    assert done.status is WorkflowRunStatus.COMPLETED, done.error
    assert done.steps["send"].status is StepStatus.COMPLETED
    assert done.steps["archive"].status is StepStatus.SKIPPED
    assert done.steps["review"].result == {
        "decision": "approved",
        "choice": "publish",
        "comment": "ship it",
    }
    assert executor(cluster).inbox() == []
    with pytest.raises(NotFound, match="no open inbox item"):  # answered once only
        await executor(cluster).answer(item.id, approve=False)


async def test_approval_timeout_takes_its_branch(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    await executor(cluster).put_workflow(
        """
name: gate
steps:
  ask:
    type: approval
    question: go?
    timeout: 0.5
    branches: {timeout: [fallback], approved: [go]}
  go: {type: task, agent: echo, input: {text: go}}
  fallback: {type: task, agent: echo, input: {text: fallback}}
"""
    )
    run, _ = await executor(cluster).start_run("gate", {})
    done = await finished(cluster, run.id)
    assert done.status is WorkflowRunStatus.COMPLETED, done.error
    ask = done.steps["ask"]
    assert ask.result["decision"] == "timeout" and ask.branch == "timeout"
    assert ask.finished_at is not None and ask.started_at is not None
    assert (ask.finished_at - ask.started_at).total_seconds() >= 0.5
    assert done.steps["fallback"].status is StepStatus.COMPLETED
    assert done.steps["go"].status is StepStatus.SKIPPED


async def test_rejection_without_a_branch_fails_the_run_naming_the_step(cluster: Cluster) -> None:
    await cluster.start_server()
    await executor(cluster).put_workflow(
        "name: ask\nsteps:\n  ok: {type: approval, question: 'fine?'}\n"
        "  then: {type: wait, duration: 0, needs: [ok]}\n"
    )
    run, _ = await executor(cluster).start_run("ask", {})
    await step_is(cluster, run.id, "ok", StepStatus.WAITING)
    [item] = executor(cluster).inbox()
    await executor(cluster).answer(item.id, approve=False, comment="not now", by="ana")
    done = await finished(cluster, run.id)
    assert done.status is WorkflowRunStatus.FAILED
    assert done.error == "step 'ok': rejected by ana: not now"
    assert done.steps["then"].status is StepStatus.CANCELLED


WAIT = """
name: later
steps:
  pause: {type: wait, duration: 2}
  after: {type: task, agent: echo, needs: [pause], input: {text: after}}
"""


async def test_wait_step_across_a_restart_fires_once(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    await executor(cluster).put_workflow(WAIT)
    run, _ = await executor(cluster).start_run("later", {})
    await step_is(cluster, run.id, "pause", StepStatus.WAITING)
    await restart(cluster)
    assert (await executor(cluster).get_run(run.id)).steps["pause"].status is StepStatus.WAITING
    done = await finished(cluster, run.id)
    assert done.status is WorkflowRunStatus.COMPLETED, done.error
    pause = done.steps["pause"]
    assert pause.started_at is not None and pause.finished_at is not None
    assert pause.due_at is not None and pause.finished_at >= pause.due_at
    assert (pause.finished_at - pause.started_at).total_seconds() >= 2
    await restart(cluster)
    again = await executor(cluster).get_run(run.id)
    assert again.steps["pause"].finished_at == pause.finished_at  # not fired again
    assert len(await step_tasks(cluster, run.id, "after")) == 1


async def test_crash_between_task_creation_and_recording_finds_the_task(cluster: Cluster) -> None:
    await cluster.start_server()
    await executor(cluster).put_workflow(TWO_STEPS)
    crashed = asyncio.Event()

    def crash(run_id: str, step: str) -> None:
        crashed.set()
        raise RuntimeError("simulated crash after the task was created")

    executor(cluster).after_task_created = crash
    run, _ = await executor(cluster).start_run("two-steps", {"topic": "once"})
    await asyncio.wait_for(crashed.wait(), 10)
    [task] = await step_tasks(cluster, run.id, "first")
    assert task.policy.idempotency_key == f"wf:{run.id}:first:1"
    stored = await executor(cluster).get_run(run.id)
    assert stored.steps["first"].task_id == ""  # created, never recorded
    await restart(cluster)  # the new executor has no crash hook
    await cluster.start_worker("worker-1")
    done = await finished(cluster, run.id)
    assert done.status is WorkflowRunStatus.COMPLETED, done.error
    assert done.steps["first"].task_id == task.id
    assert [t.id for t in await step_tasks(cluster, run.id, "first")] == [task.id]


async def test_condition_chooses_a_branch_and_parallel_branches_join(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    await executor(cluster).put_workflow(
        """
name: fan
steps:
  left: {type: task, agent: echo, input: {text: "${input.left}"}}
  right: {type: task, agent: echo, input: {text: "${input.right}"}}
  longer:
    type: condition
    needs: [left, right]
    expression: "steps.left.result.chars > steps.right.result.chars"
    then: [praise_left]
    else: [praise_right]
  praise_left: {type: task, agent: echo, input: {text: left}}
  praise_right: {type: task, agent: echo, input: {text: right}}
  join: {type: wait, duration: 0, needs: [praise_left, praise_right]}
"""
    )
    run, _ = await executor(cluster).start_run("fan", {"left": "ab", "right": "abcdef"})
    done = await finished(cluster, run.id)
    assert done.status is WorkflowRunStatus.COMPLETED, done.error
    steps = done.steps
    assert steps["longer"].result is False and steps["longer"].branch == "else"
    assert steps["praise_left"].status is StepStatus.SKIPPED
    assert steps["praise_right"].status is StepStatus.COMPLETED
    assert steps["join"].status is StepStatus.COMPLETED
    # both branches ran before the join, which started after the later of them
    assert steps["left"].finished_at and steps["right"].finished_at and steps["longer"].started_at
    assert steps["longer"].started_at >= max(steps["left"].finished_at, steps["right"].finished_at)
    assert steps["join"].started_at and steps["praise_right"].finished_at
    assert steps["join"].started_at >= steps["praise_right"].finished_at


async def test_cancel_in_the_middle_cancels_the_running_step(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    await executor(cluster).put_workflow(
        """
name: slow
steps:
  long: {type: task, agent: echo, input: {text: xxxxxxxxxx, chunks: 10, delay: 1}}
  next: {type: task, agent: echo, needs: [long], input: {text: next}}
"""
    )
    run, _ = await executor(cluster).start_run("slow", {})
    await step_is(cluster, run.id, "long", StepStatus.RUNNING)
    cancelled = await executor(cluster).cancel_run(run.id, "changed my mind")
    assert cancelled.status is WorkflowRunStatus.CANCELLED
    assert cancelled.steps["long"].status is StepStatus.CANCELLED
    assert cancelled.steps["next"].status is StepStatus.CANCELLED
    task, _ = await cluster.client().get_task(cancelled.steps["long"].task_id)
    assert task.status.name == "CANCELLED"
    assert await step_tasks(cluster, run.id, "next") == []


async def test_a_failing_step_fails_the_run_after_its_retries(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    await executor(cluster).put_workflow(
        """
name: doomed
steps:
  bad:
    type: task
    agent: echo
    input: {text: x, fail: boom}
    policy: {max_attempts: 2, retry_on_failure: true}
  never: {type: task, agent: echo, needs: [bad], input: {text: never}}
"""
    )
    run, _ = await executor(cluster).start_run("doomed", {})
    done = await finished(cluster, run.id)
    assert done.status is WorkflowRunStatus.FAILED
    assert done.error.startswith("step 'bad': task ") and "boom" in done.error
    _, runs = await cluster.client().get_task(done.steps["bad"].task_id)
    assert len(runs) == 2  # the task policy's retries ran first
    assert done.steps["never"].status is StepStatus.CANCELLED


# --- the CLI and the event stream ---------------------------------------------------------------


@pytest.fixture
def quiet_logs() -> Iterator[None]:
    """The server and worker log to stdout in this process; keep that out of the CLI's output."""
    before = structlog.get_config()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(io.StringIO()))
    try:
        yield
    finally:
        structlog.configure(**before)


async def test_approval_answered_from_the_cli_across_a_restart(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], tmp_path: Path, quiet_logs: None
) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    pki = cluster.pki

    async def run(*argv: str) -> tuple[int, str, str]:
        connection = ["--server", cluster.address, "--ca", str(pki.ca_cert)]
        connection += ["--cert", str(pki.operator_cert), "--key", str(pki.operator_key)]
        code = await asyncio.to_thread(cli.main, [*argv, *connection])
        out, err = capsys.readouterr()
        return code, out, err

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: broken\nsteps:\n  a: {type: task, agent: echo, needs: [zzz]}\n")
    code, out, err = await run("workflow", "apply", str(bad))
    assert code != 0 and "steps.a.needs[0]" in err and "'zzz'" in err, err
    good = tmp_path / "publish.yaml"
    good.write_text(APPROVAL)
    code, out, err = await run("workflow", "apply", str(good))
    assert code == 0 and out == "workflow publish stored as version 1\n", err
    code, out, _ = await run("workflow", "apply", str(good))
    assert out == "workflow publish unchanged at version 1\n"
    code, out, _ = await run("workflow", "list")
    assert code == 0 and "publish" in out and "STEPS" in out
    code, out, _ = await run("workflow", "get", "publish", "--output", "json")
    assert json.loads(out)["definition"]["steps"]["review"]["choices"] == ["publish", "shelve"]
    code, out, err = await run("workflow", "get", "nope")
    assert code != 0 and "no workflow 'nope' (workflows: publish)" in err

    client = cluster.client()
    watching: list[Any] = []

    async def watch() -> None:
        async for event in client.watch_events(
            kinds=[EventKind.INBOX_ITEM_CREATED], snapshot=False
        ):
            watching.append(event)

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.2)  # the subscription is open before the item exists
    code, out, err = await run(
        "workflow", "run", "publish", "--input", '{"topic": "bees"}', "--output", "json"
    )
    assert code == 0, err
    run_id = json.loads(out)["id"]
    await step_is(cluster, run_id, "review", StepStatus.WAITING)
    code, out, _ = await run("inbox", "--output", "json")
    [item] = json.loads(out)
    assert item["workflow_run_id"] == run_id and item["choices"] == ["publish", "shelve"]
    await eventually(lambda: _true(bool(watching)))
    assert watching[0].inbox_item.id == item["id"]
    watcher.cancel()

    await restart(cluster)
    code, out, _ = await run("inbox", "--output", "json")
    assert [i["id"] for i in json.loads(out)] == [item["id"]]
    code, out, err = await run("approve", item["id"], "--choice", "nope")
    assert code != 0 and "publish, shelve" in err
    code, out, err = await run("reject", item["id"], "--comment", "not about bees")
    assert code == 0, err
    done = await finished(cluster, run_id)
    assert done.status is WorkflowRunStatus.COMPLETED, done.error
    assert done.steps["review"].result["decision"] == "rejected"
    assert done.steps["review"].comment == "not about bees"
    assert "operator" in done.steps["review"].answered_by
    assert done.steps["archive"].status is StepStatus.COMPLETED
    assert done.steps["send"].status is StepStatus.SKIPPED
    code, out, _ = await run("workflow", "show", run_id)
    assert "archive" in out and "completed" in out
    code, out, _ = await run("workflow", "runs", "--output", "json")
    assert [r["id"] for r in json.loads(out)] == [run_id]
    code, out, _ = await run("inbox")
    assert out == "the inbox is empty\n"


async def test_run_follow_and_cancel_from_the_cli(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], tmp_path: Path, quiet_logs: None
) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    pki = cluster.pki

    async def run(*argv: str) -> tuple[int, str, str]:
        connection = ["--server", cluster.address, "--ca", str(pki.ca_cert)]
        connection += ["--cert", str(pki.operator_cert), "--key", str(pki.operator_key)]
        code = await asyncio.to_thread(cli.main, [*argv, *connection])
        out, err = capsys.readouterr()
        return code, out, err

    (tmp_path / "two.yaml").write_text(TWO_STEPS)
    assert (await run("workflow", "apply", str(tmp_path / "two.yaml")))[0] == 0
    code, out, err = await run(
        "workflow", "run", "two-steps", "--input", '{"topic": "x"}', "--follow"
    )
    assert code == 0, err
    assert "first: completed" in out and "second: completed" in out
    assert out.index("first: completed") < out.index("second: completed")
    assert out.rstrip().endswith("completed")
    (tmp_path / "wait.yaml").write_text(WAIT)
    await run("workflow", "apply", str(tmp_path / "wait.yaml"))
    code, out, _ = await run("workflow", "run", "later", "--output", "json")
    run_id = json.loads(out)["id"]
    code, out, err = await run("workflow", "cancel", run_id, "--reason", "not today")
    assert code == 0, err
    done = await executor(cluster).get_run(run_id)
    assert done.status is WorkflowRunStatus.CANCELLED and "not today" in done.error
    code, out, err = await run("workflow", "cancel", run_id)
    assert code != 0 and "already cancelled" in err


async def _true(value: bool) -> bool:
    return value


async def test_workflows_over_the_http_api(cluster: Cluster) -> None:
    from tests.integration.test_http_api import api, assert_problem

    async with api(cluster, "submit") as http:
        await cluster.start_worker("worker-1")
        bad = await http.post("/v1/workflows", json={"definition": "name: x\nsteps: {a: {}}"})
        assert_problem(bad, 400, "steps.a", "'type' is a required property")
        put = await http.post("/v1/workflows", json={"definition": APPROVAL})
        assert put.status_code == 201, put.text
        assert put.json()["workflow"]["version"] == 1
        again = await http.post("/v1/workflows", json={"definition": APPROVAL})
        assert again.status_code == 200 and again.json().get("created", False) is False
        got = await http.get("/v1/workflows/publish", params={"version": "1"})
        assert json.loads(got.json()["definition_json"])["name"] == "publish"
        started = await http.post(
            "/v1/workflows/publish/runs",
            json={"input_json": '{"topic": "moss"}', "idempotency_key": "http-1"},
        )
        assert started.status_code == 201, started.text
        run_id = started.json()["run"]["id"]
        await step_is(cluster, run_id, "review", StepStatus.WAITING)
        [item] = (await http.get("/v1/inbox")).json()["items"]
        assert item["workflow_run_id"] == run_id and item["choices"] == ["publish", "shelve"]
        answered = await http.post(
            f"/v1/inbox/{item['id']}/answer", json={"approve": True, "choice": "shelve"}
        )
        assert answered.status_code == 200, answered.text
        done = await finished(cluster, run_id)
        assert done.status is WorkflowRunStatus.COMPLETED, done.error
        shown = (await http.get(f"/v1/workflow-runs/{run_id}")).json()
        assert shown["status"] == "WORKFLOW_RUN_STATUS_COMPLETED"
        steps = {s["name"]: s["status"] for s in shown["steps"]}
        assert (
            steps["archive"] == "STEP_STATUS_COMPLETED" and steps["send"] == "STEP_STATUS_SKIPPED"
        )
        listed = (await http.get("/v1/workflow-runs", params={"workflow": "publish"})).json()
        assert [r["id"] for r in listed["runs"]] == [run_id]
        late = await http.post(f"/v1/workflow-runs/{run_id}/cancel", json={})
        assert_problem(late, 412, "already completed")


async def test_concurrent_starts_with_one_key_make_one_run(cluster: Cluster) -> None:
    await cluster.start_server()
    await executor(cluster).put_workflow(WAIT)
    client = cluster.client()
    results = await asyncio.gather(
        *(client.start_workflow_run("later", {}, idempotency_key="same") for _ in range(5))
    )
    assert len({run.id for run, _ in results}) == 1
    assert sorted(created for _, created in results) == [False, False, False, False, True]
    assert cluster.server is not None and not cluster.server.engine.store_error
    assert cluster.server.engine.recoveries == 0
    with pytest.raises(Exception, match="belongs to a run of 'later'"):
        await executor(cluster).put_workflow(TWO_STEPS)
        await client.start_workflow_run("two-steps", {"topic": "x"}, idempotency_key="same")


async def test_a_new_inbox_item_is_sent_to_a_webhook_once_even_across_a_restart(
    cluster: Cluster,
) -> None:
    from taskrun.core.webhooks import DeliveryStatus
    from tests.integration.test_webhooks import LOOPBACK, delivered, receiver

    settings = {"webhook_allow_networks": LOOPBACK, "webhook_retry_base": 0.05}
    await cluster.start_server(**settings)
    admin = cluster.client()
    async with receiver() as hook:
        webhook, hook.secret = await admin.create_webhook(
            hook.url, ["inbox.item_created"], labels={"workflow": "ask"}
        )
        await executor(cluster).put_workflow(
            "name: ask\nsteps:\n  ok: {type: approval, question: 'Ship ${input.what}?'}\n"
        )
        await executor(cluster).put_workflow(  # another workflow: not for this webhook
            "name: other\nsteps:\n  ok: {type: approval, question: 'other?'}\n"
        )
        await executor(cluster).start_run("other", {})
        run, _ = await executor(cluster).start_run("ask", {"what": "v2"})
        await hook.wait_for(1)
        body = json.loads(hook.requests[0].body)
        assert hook.requests[0].verified
        assert body["type"] == "inbox.item_created"
        item = body["data"]["inbox_item"]
        assert item["workflow_run_id"] == run.id and item["question"] == "Ship v2?"
        await delivered(cluster, webhook.id, DeliveryStatus.SUCCEEDED)  # recorded as sent
        await cluster.stop_server()
        await cluster.start_server(**settings)  # announces the waiting item again
        await asyncio.sleep(1.0)  # time for a second delivery, which must not come
        assert len(hook.requests) == 1, [r.headers["webhook-id"] for r in hook.requests]
        [only] = await admin.list_webhook_deliveries(webhook.id)
        assert only.event_key == f"{item['id']}:created"


async def test_runs_refuse_bad_input_and_a_step_for_an_unoffered_agent_waits_saying_why(
    cluster: Cluster,
) -> None:
    await cluster.start_server()
    client = cluster.client()
    await client.put_workflow(
        """
name: typed
input_schema: {type: object, required: [topic], properties: {topic: {type: string}}}
steps:
  research: {type: task, agent: nobody-offers-this, input: {q: "${input.topic}"}}
"""
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.start_workflow_run("typed", {"topic": 3})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "input_json: input.topic: 3 is not of type 'string'"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.start_workflow_run("typo", {})
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no workflow 'typo' (workflows: typed)" in (info.value.details() or "")
    run, created = await client.start_workflow_run("typed", {"topic": "moss"})
    assert created and run.version == 1
    await step_is(cluster, run.id, "research", StepStatus.RUNNING)
    run = await client.get_workflow_run(run.id)
    task, _ = await client.get_task(run.steps["research"].task_id)
    assert task.status.name == "PENDING" and "nobody-offers-this" in task.waiting_reason
    # a new version does not change the running run
    await client.put_workflow("name: typed\nsteps:\n  other: {type: wait, duration: 0}\n")
    assert [w.version for w in await client.list_workflows()] == [2]
    assert (await client.get_workflow("typed", 1)).steps["research"][
        "agent"
    ] == "nobody-offers-this"
    still = await client.get_workflow_run(run.id)
    assert still.version == 1 and list(still.steps) == ["research"]
    await client.cancel_workflow_run(run.id)


class Every(TypedDict):
    """When a schedule fires, as keyword arguments of Schedule."""

    timezone: str
    rrule: str


async def test_a_schedule_starts_a_workflow_at_each_occurrence_once(cluster: Cluster) -> None:
    from taskrun.core.schedule import OverlapPolicy, Schedule

    await cluster.start_server()
    await cluster.start_worker("worker-1")
    client = cluster.client()
    await client.put_workflow(TWO_STEPS)
    await client.put_workflow(WAIT)  # a run of it lasts two seconds
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.create_schedule(
            Schedule(name="bad", agent="", workflow="nope", timezone="UTC", rrule="FREQ=DAILY")
        )
    assert (
        info.value.details()
        == "schedule.workflow: no workflow 'nope' (workflows: later, two-steps)"
    )
    every = Every(timezone="UTC", rrule="FREQ=SECONDLY")
    await client.create_schedule(
        Schedule(name="tick", agent="", workflow="two-steps", input='{"topic": "t"}', **every)
    )
    await client.create_schedule(
        Schedule(name="slow", agent="", workflow="later", overlap=OverlapPolicy.SKIP, **every)
    )

    async def runs_of(name: str) -> list[WorkflowRun]:
        return [r for r in await client.list_workflow_runs(name) if r.idempotency_key]

    async def two_completed() -> bool:
        runs = await runs_of("two-steps")
        return sum(r.status is WorkflowRunStatus.COMPLETED for r in runs) >= 2

    await eventually(two_completed)
    runs = await runs_of("two-steps")
    keys = [r.idempotency_key for r in runs]
    assert len(set(keys)) == len(keys) and all(k.startswith("schedule:tick:") for k in keys)
    tick = await client.get_schedule("tick")
    assert tick.workflow == "two-steps" and "workflow run" in tick.last_outcome

    async def skipped() -> bool:
        return (await client.get_schedule("slow")).last_outcome.startswith(
            "skipped: previous workflow run still running"
        )

    await eventually(skipped)
    await client.delete_schedule("tick")
    await client.delete_schedule("slow")
    slow_runs = await runs_of("later")
    assert len(slow_runs) <= 2  # one at a time: the others were skipped
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.create_schedule(Schedule(name="both", agent="echo", workflow="later", **every))
    assert (info.value.details() or "").startswith("schedule.agent: must be empty")
