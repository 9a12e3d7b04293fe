"""Answers larger than one gRPC message are cut into pages and updates that each fit, never
refused (real server on loopback with mTLS and SQLite, a real worker session).

The server's message budget is set to its smallest (64 KiB: it may send 1 MiB more), so that
a few tasks of a few hundred kB reach it.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import pytest

from taskrun.cli.client import OutputReceived, TaskChanged
from taskrun.cli.usage_cmd import get_usage
from taskrun.controlplane.store.sqlite import SqliteStore
from taskrun.core.access import AuditEvent, AuditKind
from taskrun.core.agent import AgentError, AgentResult, RunContext
from taskrun.core.ids import RunId, TaskId, WorkerId
from taskrun.core.models import (
    AgentSpec,
    ModelBackend,
    Run,
    Task,
    TaskPolicy,
    TaskSpec,
    Usage,
    utcnow,
)
from taskrun.core.schedule import Schedule
from taskrun.core.status import Fault, RunStatus, TaskStatus
from taskrun.core.store import ChangeSet
from taskrun.core.workflow import StepStatus, WorkflowRunStatus
from taskrun.v1 import (
    common_pb2,
    conversations_pb2,
    schedules_pb2,
    security_pb2,
    tasks_pb2,
    workers_pb2,
    workers_pb2_grpc,
    workflows_pb2,
)
from tests.conftest import WORKERS, Cluster
from tests.integration.test_bad_input import channel
from tests.integration.test_http_api import http_client
from tests.integration.test_security import raw_worker, status
from tests.integration.test_subtasks import setup as subtask_setup
from tests.integration.test_workflows import finished as workflow_finished

SMALL = 64 * 1024
SEND_LIMIT = SMALL + 1024 * 1024  # a page: the budget and room for one large item (sizing.py)


async def test_a_page_of_large_tasks_is_cut_to_fit_and_paging_returns_each_task_once(
    cluster: Cluster,
) -> None:
    await cluster.start_server(max_message_bytes=SMALL)
    await cluster.start_worker("worker-1", capacity=8)
    client = cluster.client()
    made = [
        (await client.create_task("echo", {"text": f"{i}" + "x" * 300_000})).id for i in range(6)
    ]
    await asyncio.gather(*(client.wait(t) for t in made))
    listed, pages, token = [], 0, ""
    while True:
        page, token = await client.list_tasks(limit=100, page_token=token)
        listed += [t.id for t in page]
        pages += 1
        if not token:
            break
    assert listed == made[::-1]  # newest first, each once
    assert pages > 1
    # each page as sent fits the server's own limit
    stub = client._task_stub()
    token = ""
    while True:
        reply = await stub.ListTasks(tasks_pb2.ListTasksRequest(page_size=100, page_token=token))
        assert reply.ByteSize() <= SEND_LIMIT
        assert reply.tasks
        if not (token := reply.next_page_token):
            break


async def test_output_too_large_for_one_update_is_replayed_and_followed_in_several(
    cluster: Cluster,
) -> None:
    await cluster.start_server(max_message_bytes=SMALL)
    await cluster.start_worker("worker-1")
    client = cluster.client()
    text = "".join(f"<{i:06d}>" for i in range(100_000))  # 800 kB, in 60 kB chunks
    live, status = "", TaskStatus.PENDING
    spec = TaskSpec(agent="echo", input=json.dumps({"text": text, "chunks": 14}))
    async for event in client.submit_and_follow(spec):  # followed as it runs
        if isinstance(event, OutputReceived):
            live += event.chunk.data
        elif isinstance(event, TaskChanged):
            status = event.task.status
    assert status is TaskStatus.COMPLETED and live == text
    (task,) = (await client.list_tasks(limit=1))[0]
    replayed = ""
    async for event in client.follow(task.id, follow=False):  # replayed once it ended
        if isinstance(event, OutputReceived):
            replayed += event.chunk.data
    assert replayed == text
    stub = client._task_stub()
    call = stub.FollowTask(tasks_pb2.FollowTaskRequest(task_id=task.id))
    updates = [u async for u in call]
    assert await call.code() is grpc.StatusCode.OK
    assert len(updates) > 1 and all(u.ByteSize() <= SEND_LIMIT for u in updates)
    assert updates[0].task.id == task.id  # a replay opens with the task
    assert updates[-1].last and updates[-1].task.status == TaskStatus.COMPLETED


class Big:
    """An agent whose result (or error) is as large as its input asks."""

    spec = AgentSpec(name="echo")

    async def run(self, ctx: RunContext) -> AgentResult:
        if "error" in ctx.input:
            raise AgentError("e" * int(ctx.input["error"]))
        return AgentResult(result={"blob": "r" * int(ctx.input["size"])})


async def test_results_and_errors_too_large_fail_the_run_saying_so_and_the_task_stays_readable(
    cluster: Cluster,
) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1", running={"echo": Big()})
    client = cluster.client()
    fits = await client.run(TaskSpec(agent="echo", input=json.dumps({"size": 1000})))
    assert fits.status is TaskStatus.COMPLETED
    task = await client.create_task("echo", {"size": 3_000_000}, max_attempts=1)
    final = await asyncio.wait_for(client.wait(task.id), 20)
    assert final.status is TaskStatus.FAILED
    assert "result" in final.error and "1 MiB" in final.error, final.error
    got, runs = await client.get_task(task.id)
    assert [r.status for r in runs] == [RunStatus.FAILED] and got.result == ""
    # results that fit, side by side: the worker's messages stay within the server's limit
    specs = [TaskSpec(agent="echo", input=json.dumps({"size": 1_000_000})) for _ in range(6)]
    done = await asyncio.wait_for(asyncio.gather(*(client.run(s) for s in specs)), 30)
    assert [t.status for t in done] == [TaskStatus.COMPLETED] * 6
    # an error of 6 MB: the run fails with its start, and how long it was
    task = await client.create_task("echo", {"error": 6_000_000}, max_attempts=1)
    final = await asyncio.wait_for(client.wait(task.id), 20)
    assert final.status is TaskStatus.FAILED
    assert len(final.error) == 16_384 + len("… (6000000 characters)")
    assert final.error.endswith("… (6000000 characters)")


async def test_a_worker_that_reports_a_result_over_the_limit_fails_the_run_not_the_server(
    cluster: Cluster,
) -> None:
    await cluster.start_server()
    client = cluster.client()
    async with raw_worker(cluster, "worker-1") as worker:
        task = await client.create_task("echo", {"text": "x"}, max_attempts=1)
        run = await worker.assignment()
        completed = status(run.run_id, run.attempt, common_pb2.RUN_STATUS_COMPLETED)
        completed.result_json = json.dumps({"blob": "r" * 1_200_000})
        await worker.report(completed, heartbeat=workers_pb2.Heartbeat(seq=1))
        final = await asyncio.wait_for(client.wait(task.id), 10)
    assert final.status is TaskStatus.FAILED and final.result == ""
    assert final.error.startswith("the result is 1,200,012 bytes as JSON, over the limit of 1 MiB")
    _, runs = await client.get_task(task.id)
    assert [(r.status, r.fault, r.result) for r in runs] == [(RunStatus.FAILED, Fault.TASK, "")]


async def test_a_worker_that_reports_a_huge_error_has_it_clipped(cluster: Cluster) -> None:
    await cluster.start_server()
    client = cluster.client()
    async with raw_worker(cluster, "worker-1") as worker:
        task = await client.create_task("echo", {"text": "x"}, max_attempts=1)
        run = await worker.assignment()
        failed = status(run.run_id, run.attempt, common_pb2.RUN_STATUS_FAILED)
        failed.error = "e" * 3_000_000
        await worker.report(failed, heartbeat=workers_pb2.Heartbeat(seq=1))
        final = await asyncio.wait_for(client.wait(task.id), 10)
    assert final.status is TaskStatus.FAILED
    assert len(final.error) == 16_384 + len("… (3000000 characters)")
    assert final.error.endswith("e… (3000000 characters)")
    _, runs = await client.get_task(task.id)  # task and run, each with the error: one message
    assert runs[0].error == final.error


async def test_a_long_conversation_comes_in_several_replies_that_the_client_joins(
    cluster: Cluster,
) -> None:
    await cluster.start_server(max_message_bytes=SMALL)
    client = cluster.client()
    stub = client._conversation_stub()
    messages = [f"{i}:" + "m" * 300_000 for i in range(5)]
    conversation, turn = await client.create_conversation(
        "nobody", messages[0], allow_unknown_agent=True
    )
    await client.cancel_task(turn.task_id)  # ended: the next message may follow
    for message in messages[1:]:
        call = stub.SendMessage(
            conversations_pb2.SendMessageRequest(conversation_id=conversation.id, message=message)
        )
        started = await call.read()
        await client.cancel_task(started.turn.task_id)
        call.cancel()
    _, turns = await client.get_conversation(conversation.id)
    assert [(t.index, t.message) for t in turns] == list(enumerate(messages, 1))
    request = conversations_pb2.GetConversationRequest(conversation_id=conversation.id)
    latest = await stub.GetConversation(request)
    assert latest.ByteSize() <= SEND_LIMIT and latest.earlier_turns > 0
    assert [t.index for t in latest.turns] == list(range(latest.earlier_turns + 1, 6))
    request.before_turn = 3
    earlier = await stub.GetConversation(request)
    assert [t.index for t in earlier.turns][-1] == 2
    request.before_turn = -1
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.GetConversation(request)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith("before_turn: ")


async def test_a_page_of_conversations_with_large_options_is_cut_to_fit(cluster: Cluster) -> None:
    await cluster.start_server(max_message_bytes=SMALL)
    client = cluster.client()
    made = []
    for i in range(6):
        conversation, _ = await client.create_conversation(
            "nobody", "hi", options={"note": f"{i}" + "o" * 300_000}, allow_unknown_agent=True
        )
        made.append(conversation.id)
    listed = await client.list_conversations(limit=100)
    assert [c.id for c in listed] == made[::-1]
    page = await client._conversation_stub().ListConversations(
        conversations_pb2.ListConversationsRequest(page_size=100)
    )
    assert page.ByteSize() <= SEND_LIMIT and page.next_page_token


async def test_a_task_whose_sub_tasks_are_large_is_read_with_as_many_as_fit(
    cluster: Cluster,
) -> None:
    base, probe = await subtask_setup(cluster, max_message_bytes=SMALL)
    admin = cluster.client()
    parent = await admin.create_task("probe", {}, allow_subtasks=True)
    access = await probe.credential(parent.id)
    async with http_client(cluster, base, access.token) as http:
        for i in range(5):
            text = f"{i}" + "s" * (300_000 if i else 10)  # the oldest small, the rest large
            made = await http.post(
                "/v1/tasks", json={"agent": "echo", "input_json": json.dumps({"text": text})}
            )
            assert made.status_code == 201, made.text
    task, _, below = await admin.get_task_tree(parent.id)
    assert task.id == parent.id
    assert [t.input for t in below] == ['{"text": "0ssssssssss"}']  # the oldest, which fits
    reply = await admin._task_stub().GetTask(tasks_pb2.GetTaskRequest(task_id=parent.id))
    assert reply.ByteSize() <= SEND_LIMIT
    children, token = await admin.list_tasks(parent_task_id=parent.id, limit=100)
    while token:  # every one, paged
        page, token = await admin.list_tasks(parent_task_id=parent.id, page_token=token)
        children += page
    assert len(children) == 5
    probe.release(parent.id)


async def test_a_page_of_schedules_with_large_inputs_is_cut_to_fit(cluster: Cluster) -> None:
    await cluster.start_server(max_message_bytes=SMALL)
    await cluster.start_worker("worker-1")  # a schedule names an agent some worker announced
    client = cluster.client()
    names = [f"big-{i}" for i in range(6)]
    for name in names:
        text = json.dumps({"text": name + "s" * 300_000})
        await client.create_schedule(
            Schedule(name=name, agent="echo", timezone="UTC", cron="0 0 1 1 *", input=text)
        )
    assert [s.name for s in await client.list_schedules()] == names  # every one, paged
    page = await client._schedule_stub().ListSchedules(
        schedules_pb2.ListSchedulesRequest(page_size=100)
    )
    assert page.ByteSize() <= SEND_LIMIT and page.next_page_token


async def test_a_failed_run_keeps_no_result_so_many_attempts_stay_readable(
    cluster: Cluster,
) -> None:
    await cluster.start_server(retry_backoff_base=0)
    client = cluster.client()
    async with raw_worker(cluster, "worker-1") as worker:
        task = await client.create_task(
            "echo", {"text": "x"}, max_attempts=6, retry_on_failure=True
        )
        for seq in range(1, 7):  # six failures, each reporting a result of 1 MB
            run = await worker.assignment()
            failed = status(run.run_id, run.attempt, common_pb2.RUN_STATUS_FAILED)
            failed.error, failed.result_json = "no", json.dumps({"blob": "r" * 1_000_000})
            failed.fault = common_pb2.RUN_FAULT_TASK  # not the worker's: no quarantine
            await worker.report(failed, heartbeat=workers_pb2.Heartbeat(seq=seq))
        final = await asyncio.wait_for(client.wait(task.id), 10)
    assert final.status is TaskStatus.FAILED and final.result == ""
    _, runs = await client.get_task(task.id)
    assert [(r.attempt, r.status, r.result) for r in runs] == [
        (i, RunStatus.FAILED, "") for i in range(1, 7)
    ]


async def test_a_task_with_many_long_failures_is_read_latest_runs_first_and_joined(
    cluster: Cluster,
) -> None:
    server = await cluster.start_server(
        max_message_bytes=SMALL, retry_backoff_base=0, http_listen="127.0.0.1:0"
    )
    client = cluster.client()
    attempts = 80  # 80 errors of 16 kB: more than the server may send in one message
    async with raw_worker(cluster, "worker-1") as worker:
        task = await client.create_task(
            "echo", {"text": "x"}, max_attempts=attempts, retry_on_failure=True
        )
        for seq in range(1, attempts + 1):
            run = await worker.assignment()
            failed = status(run.run_id, run.attempt, common_pb2.RUN_STATUS_FAILED)
            failed.error = f"{run.attempt}:" + "e" * 16_000
            failed.fault = common_pb2.RUN_FAULT_TASK
            await worker.report(failed, heartbeat=workers_pb2.Heartbeat(seq=seq))
        final = await asyncio.wait_for(client.wait(task.id), 10)
    assert final.status is TaskStatus.FAILED
    got, runs = await client.get_task(task.id)  # the client joins the replies
    assert got.attempts == attempts
    assert [r.attempt for r in runs] == list(range(1, attempts + 1))
    assert [r.error.split(":")[0] for r in runs] == [str(i) for i in range(1, attempts + 1)]
    _, runs, _ = await client.get_task_tree(task.id)
    assert [r.attempt for r in runs] == list(range(1, attempts + 1))
    stub = client._task_stub()
    latest = await stub.GetTask(tasks_pb2.GetTaskRequest(task_id=task.id))
    assert latest.ByteSize() <= SEND_LIMIT and latest.earlier_runs > 0
    assert [r.attempt for r in latest.runs] == list(range(latest.earlier_runs + 1, attempts + 1))
    earlier = await stub.GetTask(tasks_pb2.GetTaskRequest(task_id=task.id, before_attempt=3))
    assert [r.attempt for r in earlier.runs] == [1, 2] and earlier.earlier_runs == 0
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.GetTask(tasks_pb2.GetTaskRequest(task_id=task.id, before_attempt=-1))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith("before_attempt: ")
    token, _ = await client.create_api_token("reader", ["read"])
    base = f"https://127.0.0.1:{server.http_port}"
    async with http_client(cluster, base, token) as http:
        page = (await http.get(f"/v1/tasks/{task.id}", params={"before_attempt": 3})).json()
        assert [r["attempt"] for r in page["runs"]] == [1, 2]
        bad = await http.get(f"/v1/tasks/{task.id}", params={"before_attempt": -1})
        assert bad.status_code == 400 and "before_attempt" in bad.text


WIDE = "name: wide\nsteps:\n" + "".join(
    f"  {name}: {{type: task, agent: echo, input: {{size: 1000000}}}}\n" for name in "abcdef"
)


async def test_a_workflow_run_whose_results_pass_one_message_is_read_whole(
    cluster: Cluster,
) -> None:
    await cluster.start_server()  # may send 5 MiB; six results of 1 MB
    await cluster.start_worker("worker-1", capacity=6, running={"echo": Big()})
    client = cluster.client()
    await client.put_workflow(WIDE)
    started, _ = await client.start_workflow_run("wide")
    done = await workflow_finished(cluster, started.id)
    assert done.status is WorkflowRunStatus.COMPLETED, done.error
    blob = {"blob": "r" * 1_000_000}
    read = await client.get_workflow_run(started.id)  # the client asks for what was left out
    assert {name: step.result for name, step in read.steps.items()} == dict.fromkeys("abcdef", blob)
    (listed,) = await client.list_workflow_runs("wide")
    assert [step.result for step in listed.steps.values()] == [blob] * 6
    stub = client._workflow_stub()
    whole = await stub.GetWorkflowRun(workflows_pb2.GetWorkflowRunRequest(id=started.id))
    assert whole.ByteSize() <= 4 * 1024 * 1024 + 1024 * 1024
    assert [s.name for s in whole.steps] == list("abcdef")  # every step, in order
    left_out = [s.name for s in whole.steps if s.result_left_out]
    assert left_out and all(not s.result_json for s in whole.steps if s.result_left_out)
    one = await stub.GetWorkflowRun(
        workflows_pb2.GetWorkflowRunRequest(id=started.id, step=left_out[0])
    )
    assert [(s.name, json.loads(s.result_json)) for s in one.steps] == [(left_out[0], blob)]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.GetWorkflowRun(workflows_pb2.GetWorkflowRunRequest(id=started.id, step="z"))
    assert refused.value.code() is grpc.StatusCode.NOT_FOUND
    assert (refused.value.details() or "").startswith("step: ")
    page = await stub.ListWorkflowRuns(workflows_pb2.ListWorkflowRunsRequest(workflow="wide"))
    assert page.ByteSize() <= 4 * 1024 * 1024 + 1024 * 1024


GROWING = """
name: growing
steps:
  a: {type: task, agent: echo, input: {size: 600000}}
  b: {type: task, agent: echo, input: {size: 600000}}
  ask: {type: approval, needs: [a], question: "Keep ${steps.a.result.blob}?"}
  both: {type: condition, needs: [a, b], expression: "steps.*.result", then: [after]}
  after: {type: wait, duration: 0}
"""


async def test_a_condition_value_over_the_limit_fails_its_step_and_a_long_question_is_clipped(
    cluster: Cluster,
) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1", capacity=2, running={"echo": Big()})
    client = cluster.client()
    await client.put_workflow(GROWING)
    started, _ = await client.start_workflow_run("growing")
    done = await workflow_finished(cluster, started.id)
    assert done.status is WorkflowRunStatus.FAILED
    both = done.steps["both"]
    assert both.status is StepStatus.FAILED and both.result is None
    assert both.error.startswith("the value is 1,200,") and "over the limit of 1 MiB" in both.error
    assert "both" in done.error
    question = done.steps["ask"].question
    assert question.startswith("Keep rrr") and question.endswith("… (600006 characters)")
    assert len(question) == 16_384 + len("… (600006 characters)")


async def test_workflows_runs_and_inbox_items_too_large_for_one_message_come_in_pages(
    cluster: Cluster,
) -> None:
    await cluster.start_server(max_message_bytes=SMALL)
    client = cluster.client()
    stub = client._workflow_stub()
    names = [f"big-{i}" for i in range(6)]
    for name in names:  # definitions of 200 kB each
        await client.put_workflow(
            f"name: {name}\nsteps:\n  a: {{type: task, agent: echo, input: {{t: {'d' * 200_000}}}}}"
            "\n"
        )
    assert [w.name for w in await client.list_workflows()] == names
    page = await stub.ListWorkflows(workflows_pb2.ListWorkflowsRequest())
    assert page.ByteSize() <= SEND_LIMIT and page.next_page_token
    await client.put_workflow(
        "name: waits\nsteps:\n  ask: {type: approval, question: '${input.q}'}\n"
    )
    started = []
    for i in range(6):  # each run holds its input, each question is clipped to 16 kB
        run, _ = await client.start_workflow_run("waits", {"q": f"{i}" + "q" * 300_000})
        started.append(run.id)
    assert [r.id for r in await client.list_workflow_runs("waits")] == started[::-1]
    page = await stub.ListWorkflowRuns(workflows_pb2.ListWorkflowRunsRequest(workflow="waits"))
    assert page.ByteSize() <= SEND_LIMIT and page.next_page_token
    assert len(page.runs) < 6
    items = await client.list_inbox()
    assert [i.run_id for i in items] == started  # oldest first, each once
    assert all(len(i.question) < 17_000 for i in items)
    inbox = await stub.ListInboxItems(workflows_pb2.ListInboxItemsRequest(page_size=2))
    assert len(inbox.items) == 2 and inbox.next_page_token
    for call, request in [
        (stub.ListWorkflowRuns, workflows_pb2.ListWorkflowRunsRequest(page_token="bogus")),
        (stub.ListInboxItems, workflows_pb2.ListInboxItemsRequest(page_token="bogus")),
        (stub.ListWorkflows, workflows_pb2.ListWorkflowsRequest(page_token="bogus")),
        (stub.ListWorkflows, workflows_pb2.ListWorkflowsRequest(page_size=-1)),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(request)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert (refused.value.details() or "").split(":")[0] in {"page_token", "page_size"}


async def hello(
    cluster: Cluster, worker_id: str, agents: list[common_pb2.AgentSpec]
) -> tuple[grpc.aio.Channel, Any]:
    """A session that announced `agents`, and what its hello got back (the session's
    parameters or the refusal)."""
    ch = channel(cluster, worker_id)
    call = workers_pb2_grpc.RunServiceStub(ch).StreamConnect()
    message = workers_pb2.WorkerHello(worker_id=worker_id, max_concurrent_runs=1, agents=agents)
    await call.write(workers_pb2.WorkerMessage(hello=message))
    return ch, call


async def test_a_fleet_too_large_for_one_message_is_listed_in_pages(cluster: Cluster) -> None:
    await cluster.start_server(max_message_bytes=SMALL)
    client = cluster.client()
    schema = json.dumps({"type": "object", "description": "s" * 100_000})
    ids = list(WORKERS)  # six, each announcing two agents of 100 kB
    sessions = []
    try:
        for worker_id in ids:
            agents = [common_pb2.AgentSpec(name=n, input_schema_json=schema) for n in ("a", "b")]
            ch, call = await hello(cluster, worker_id, agents)
            sessions.append(ch)
            assert (await call.read()).HasField("params")
        assert [w.id for w, _ in await client.list_workers()] == ids  # every one, paged
        stub = client._worker_stub()
        page = await stub.ListWorkers(workers_pb2.ListWorkersRequest())
        assert page.ByteSize() <= SEND_LIMIT and page.next_page_token
        page = await stub.ListWorkers(workers_pb2.ListWorkersRequest(page_size=1))
        assert [w.id for w in page.workers] == ids[:1]
        page = await stub.ListWorkers(
            workers_pb2.ListWorkersRequest(page_size=1, page_token=page.next_page_token)
        )
        assert [w.id for w in page.workers] == ids[1:2]
    finally:
        for ch in sessions:
            await ch.close()


async def test_announcements_past_their_bounds_are_refused_naming_the_field(
    cluster: Cluster,
) -> None:
    await cluster.start_server()
    huge = json.dumps({"type": "object", "description": "s" * 200_000})
    fits_one = json.dumps({"type": "object", "description": "s" * 120_000})
    cases = [
        (
            "hello.agents: must be at most 256",
            [common_pb2.AgentSpec(name=f"a{i}") for i in range(300)],
        ),
        (
            "hello.agents[1]: is ",
            [
                common_pb2.AgentSpec(name="small"),
                common_pb2.AgentSpec(name="echo", input_schema_json=huge),
            ],
        ),
        (
            "hello.agents[0].description: is longer",
            [common_pb2.AgentSpec(name="echo", description="d" * 5000)],
        ),
        (  # each fits, five do not: 600 kB together
            "hello.agents: are over 524,288 bytes together",
            [common_pb2.AgentSpec(name=f"a{i}", input_schema_json=fits_one) for i in range(5)],
        ),
    ]
    for start, agents in cases:
        ch, call = await hello(cluster, "worker-1", agents)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call.read()
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert (refused.value.details() or "").startswith(start), start
        finally:
            await ch.close()
    assert await cluster.client().list_workers() == []


async def test_what_a_worker_reports_beside_a_result_is_bounded_so_the_task_stays_readable(
    cluster: Cluster,
) -> None:
    await cluster.start_server(max_message_bytes=SMALL, retry_backoff_base=0)
    client = cluster.client()
    async with raw_worker(cluster, "worker-1") as worker:
        task = await client.create_task(
            "echo", {"text": "x"}, max_attempts=4, retry_on_failure=True
        )
        for attempt in range(1, 5):  # three failures, then an answer; each names a long model
            run = await worker.assignment()
            if attempt < 4:
                update = status(run.run_id, run.attempt, common_pb2.RUN_STATUS_FAILED)
                update.error, update.fault = "no", common_pb2.RUN_FAULT_TASK
            else:
                update = status(run.run_id, run.attempt, common_pb2.RUN_STATUS_COMPLETED)
                update.result_json = "{}"
            update.session_id = "s" * 200_000
            used = update.backend_used
            used.provider, used.model_name = "p" * 1000, f"{attempt}" + "m" * 300_000
            used.tools.extend(f"tool-{i}-" + "t" * 300 for i in range(1000))
            used.modalities.extend(["text"] * 1000)
            update.usage.cost_usd = 0.01
            await worker.report(update, heartbeat=workers_pb2.Heartbeat(seq=attempt))
        final = await asyncio.wait_for(client.wait(task.id), 10)
    assert final.status is TaskStatus.COMPLETED
    report = await client._task_stub().GetUsage(tasks_pb2.GetUsageRequest(days=1))
    assert sorted(row.model for row in report.rows) == [f"{i}" + "m" * 255 for i in range(1, 5)]
    _, runs = await client.get_task(task.id)
    kept = runs[-1]
    assert kept.session_id == ""  # no session id is that long: not kept
    assert kept.backend_used is not None
    assert (
        kept.backend_used.model_name == "4" + "m" * 255 and kept.backend_used.provider == "p" * 64
    )
    assert len(kept.backend_used.tools) == 64 and len(kept.backend_used.modalities) == 64
    assert all(len(t) <= 256 for t in kept.backend_used.tools)


async def test_a_usage_report_too_large_for_one_message_comes_in_pages(cluster: Cluster) -> None:
    await cluster.start_server(max_message_bytes=SMALL)
    await cluster.stop_server()
    # 3,000 runs that ended today, each on its own model: a row each of 400 bytes, 1.2 MB of
    # rows. Written underneath, with the server stopped: running them would take half a minute.
    store = SqliteStore(cluster.tmp / "taskrun.db")
    await store.open()
    now = utcnow()
    tasks, runs = [], []
    for n in range(3000):
        task = Task(
            id=TaskId(f"tsk_{n:026d}"),
            agent="a" * 64,
            input="{}",
            labels={},
            policy=TaskPolicy(),
            status=TaskStatus.COMPLETED,
            created_at=now,
            updated_at=now,
            finished_at=now,
        )
        tasks.append(task)
        runs.append(
            Run(
                id=RunId(f"run_{n:026d}"),
                task_id=task.id,
                attempt=1,
                status=RunStatus.COMPLETED,
                created_at=now,
                worker_id=WorkerId("w" * 64),
                finished_at=now,
                usage=Usage(cost_usd=0.001),
                backend_used=ModelBackend("meter", f"{n}-" + "m" * 240),
            )
        )
    await store.apply(ChangeSet(tasks=tasks, runs=runs))
    await store.close()
    await cluster.start_server(max_message_bytes=SMALL)
    client = cluster.client()
    report = await get_usage(client, 1)  # the CLI's: every page
    assert sorted(int(row.model.split("-")[0]) for row in report.rows) == list(range(3000))
    assert all(row.runs == 1 for row in report.rows)
    stub = client._task_stub()
    first = await stub.GetUsage(tasks_pb2.GetUsageRequest(days=1))
    assert first.ByteSize() <= SEND_LIMIT and first.next_page_token
    rest = await stub.GetUsage(tasks_pb2.GetUsageRequest(days=1, page_token=first.next_page_token))
    assert rest.rows and {r.model for r in first.rows}.isdisjoint(r.model for r in rest.rows)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.GetUsage(tasks_pb2.GetUsageRequest(days=1, page_token="bogus"))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith("page_token: ")


async def test_a_batch_as_large_as_the_server_takes_is_created_and_answered_whole(
    cluster: Cluster,
) -> None:
    """The reply to CreateTasks holds every task as created: a little more than the request
    held. Refusing it after the tasks were created would invite a retry that doubles them."""
    await cluster.start_server()
    client = cluster.client()
    takes = 4 * 1024 * 1024 + 1024 * 1024  # what the server receives (app.py)
    request = tasks_pb2.CreateTasksRequest()
    for _ in range(5):
        request.tasks.add(agent="nobody", input_json='{"text": ""}', allow_unknown_agent=True)
    each = (takes - request.ByteSize() - 100) // 5
    for task in request.tasks:
        task.input_json = json.dumps({"text": "x" * each})
    assert takes - 200 < request.ByteSize() <= takes
    reply = await client._task_stub().CreateTasks(request)
    assert [r.created for r in reply.results] == [True] * 5
    assert all(r.task.input_json == request.tasks[0].input_json for r in reply.results)


async def test_a_refusal_that_lists_many_choices_still_arrives_with_its_status(
    cluster: Cluster,
) -> None:
    """A status message travels in a trailer, which a client takes up to 16 KiB of: a longer
    one became RESOURCE_EXHAUSTED "received metadata size exceeds hard limit"."""
    await cluster.start_server()
    client = cluster.client()
    for i in range(400):  # 22 kB of names, which a refusal lists
        name = f"w{i:03d}" + "x" * 50
        await client.put_workflow(f"name: {name}\nsteps:\n  a: {{type: wait, duration: 1}}\n")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client._workflow_stub().StartWorkflowRun(
            workflows_pb2.StartWorkflowRunRequest(name="nope")
        )
    assert refused.value.code() is grpc.StatusCode.NOT_FOUND
    details = refused.value.details() or ""
    assert details.startswith("name: no workflow 'nope'") and "w000" in details
    assert details.endswith(" characters)") and len(details) < 2100


async def test_a_page_of_audit_events_too_large_for_one_message_is_cut_and_goes_on(
    cluster: Cluster,
) -> None:
    await cluster.start_server(max_message_bytes=SMALL)
    await cluster.stop_server()
    store = SqliteStore(cluster.tmp / "taskrun.db")  # 800 events of 1.8 kB, written underneath
    await store.open()
    events = [
        AuditEvent(
            time=utcnow(),
            kind=AuditKind.WORKER_REVOKED,
            principal="p" * 256,
            subject=f"worker-{n:04d}" + "s" * 245,
            peer="e" * 256,
            detail="d" * 1024,
        )
        for n in range(800)
    ]
    await store.apply(ChangeSet(audit_events=events))
    await store.close()
    await cluster.start_server(max_message_bytes=SMALL)
    client = cluster.client()
    reply = await client._access_stub().ListAuditEvents(
        security_pb2.ListAuditEventsRequest(limit=1000)
    )
    assert reply.ByteSize() <= SEND_LIMIT and 0 < len(reply.events) < 800
    seen = await client.list_audit_events(limit=1000)  # the client goes on with before_id
    revoked = [e.subject[:11] for e in seen if e.kind is AuditKind.WORKER_REVOKED]
    assert revoked == [f"worker-{n:04d}" for n in reversed(range(800))]


async def test_token_lists_too_large_for_one_message_come_in_pages(cluster: Cluster) -> None:
    """Every enrollment leaves its bootstrap token behind (used): a fleet that comes and goes
    piles them up. Each here carries 64 labels, 8 kB."""
    await cluster.start_server(max_message_bytes=SMALL)
    client = cluster.client()
    labels = {f"k{i:02d}-" + "k" * 58: "v" * 63 for i in range(64)}
    made = [
        (await client.create_bootstrap_token(worker_id=f"w-{n:03d}", labels=labels)).info.token_id
        for n in range(150)
    ]
    for n in range(3):
        await client.create_api_token(f"api-{n}", ["read"])
    assert [t.token_id for t in await client.list_bootstrap_tokens(include_inactive=True)] == made
    stub = client._access_stub()
    page = await stub.ListBootstrapTokens(
        security_pb2.ListBootstrapTokensRequest(include_inactive=True)
    )
    assert page.ByteSize() <= SEND_LIMIT and page.next_page_token
    page = await stub.ListApiTokens(security_pb2.ListApiTokensRequest(page_size=2))
    assert len(page.tokens) == 2 and page.next_page_token
    assert len(await client.list_api_tokens()) == 3
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ListApiTokens(security_pb2.ListApiTokensRequest(page_token="bogus"))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith("page_token: ")
