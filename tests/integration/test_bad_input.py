"""Bad input gets the right status, a message naming the field, and changes nothing."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from taskrun.core.ids import WorkerId
from taskrun.core.status import TaskStatus
from taskrun.core.store import TaskQuery
from taskrun.v1 import common_pb2, tasks_pb2, tasks_pb2_grpc, workers_pb2, workers_pb2_grpc
from tests.conftest import Cluster


def channel(cluster: Cluster, identity: str = "operator") -> grpc.aio.Channel:
    pki = cluster.pki
    if identity == "operator":
        cert, key = pki.operator_cert, pki.operator_key
    else:
        cert, key = pki.worker_cert(identity), pki.worker_key(identity)
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.ca_cert.read_bytes(),
        private_key=key.read_bytes(),
        certificate_chain=cert.read_bytes(),
    )
    return grpc.aio.secure_channel(cluster.address, creds)


async def count_tasks(cluster: Cluster) -> int:
    assert cluster.server is not None
    page = await cluster.server.engine.store.list_tasks(TaskQuery(limit=1000))
    return len(page.tasks)


async def expect(call, code: grpc.StatusCode, *needles: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() is code, err.value.details()
    for needle in needles:
        assert needle in (err.value.details() or ""), err.value.details()


BAD_CREATE = [
    pytest.param(dict(agent=""), ("agent", "must not be empty"), id="empty agent"),
    pytest.param(dict(agent="Bad Agent!"), ("agent",), id="agent name syntax"),
    pytest.param(
        dict(input_json="not json"), ("input_json", "not valid JSON"), id="input not json"
    ),
    pytest.param(dict(input_json="[1, 2]"), ("input_json", "JSON object"), id="input array"),
    pytest.param(dict(input_json='"text"'), ("input_json", "JSON object"), id="input string"),
    pytest.param(
        dict(input_json='{"text": "' + "x" * (1 << 20) + '"}'),
        ("input_json", "over the limit"),
        id="input too large",
    ),
    pytest.param(dict(labels={"bad key": "v"}), ("labels", "bad key"), id="label key syntax"),
    pytest.param(dict(labels={"k": "bad value!"}), ("labels",), id="label value syntax"),
    pytest.param(
        dict(policy=common_pb2.TaskPolicy(priority=5000)),
        ("policy.priority",),
        id="priority out of range",
    ),
    pytest.param(
        dict(policy=common_pb2.TaskPolicy(max_attempts=1000)),
        ("policy.max_attempts",),
        id="too many attempts",
    ),
    pytest.param(
        dict(policy=common_pb2.TaskPolicy(required_labels={"a b": "c"})),
        ("policy.required_labels",),
        id="required label syntax",
    ),
    pytest.param(
        dict(policy=common_pb2.TaskPolicy(idempotency_key="k" * 300)),
        ("policy.idempotency_key",),
        id="idempotency key too long",
    ),
    pytest.param(
        dict(policy=common_pb2.TaskPolicy(output_schema_json="{not json")),
        ("policy.output_schema_json", "not valid JSON"),
        id="output schema not json",
    ),
    pytest.param(
        dict(policy=common_pb2.TaskPolicy(output_schema_json="[1]")),
        ("policy.output_schema_json", "JSON Schema object"),
        id="output schema not an object",
    ),
    pytest.param(
        dict(policy=common_pb2.TaskPolicy(output_schema_json='{"type": "banana"}')),
        ("policy.output_schema_json", "not a valid JSON Schema", "type", "banana"),
        id="output schema invalid",
    ),
    pytest.param(
        dict(policy=common_pb2.TaskPolicy(output_schema_json='{"minLength": -1}')),
        ("policy.output_schema_json", "minLength"),
        id="output schema negative minLength",
    ),
    pytest.param(
        dict(policy=common_pb2.TaskPolicy(output_schema_json='{"$ref": "https://x.test/s"}')),
        ("policy.output_schema_json", "outside the schema"),
        id="output schema remote ref",
    ),
    pytest.param(
        dict(policy=common_pb2.TaskPolicy(output_schema_json='{"$ref": "#/$defs/nope"}')),
        ("policy.output_schema_json", "does not point to anything"),
        id="output schema dangling ref",
    ),
    pytest.param(
        dict(policy=common_pb2.TaskPolicy(output_schema_json='{"items":' * 40 + "{}" + "}" * 40)),
        ("policy.output_schema_json", "nested too deep"),
        id="output schema too deep",
    ),
    pytest.param(
        dict(policy=common_pb2.TaskPolicy(output_retries=-1)),
        ("policy.output_retries", "between 0 and 10"),
        id="negative output retries",
    ),
    pytest.param(
        dict(policy=common_pb2.TaskPolicy(max_cost_usd=-0.5)),
        ("policy.max_cost_usd",),
        id="negative max cost",
    ),
    pytest.param(
        dict(policy=common_pb2.TaskPolicy(max_cost_usd=float("nan"))),
        ("policy.max_cost_usd",),
        id="nan max cost",
    ),
    pytest.param(
        dict(policy=common_pb2.TaskPolicy(model_settings=common_pb2.ModelSettings(max_tokens=-5))),
        ("policy.model_settings.max_tokens", "-5"),
        id="negative max tokens",
    ),
    pytest.param(
        dict(policy=common_pb2.TaskPolicy(model_settings=common_pb2.ModelSettings(temperature=3))),
        ("policy.model_settings.temperature", "between 0 and 2"),
        id="temperature out of range",
    ),
    pytest.param(
        dict(
            policy=common_pb2.TaskPolicy(
                model_settings=common_pb2.ModelSettings(stop_sequences=[""])
            )
        ),
        ("policy.model_settings.stop_sequences",),
        id="empty stop sequence",
    ),
    pytest.param(
        dict(
            policy=common_pb2.TaskPolicy(
                model_settings=common_pb2.ModelSettings(
                    env={"ANTHROPIC_BASE_URL": "http://evil.example"}
                )
            )
        ),
        ("policy.model_settings.env", "ANTHROPIC_BASE_URL", "set by the worker"),
        id="env redirects the worker's key",
    ),
    pytest.param(
        dict(
            policy=common_pb2.TaskPolicy(model_settings=common_pb2.ModelSettings(env={"1X": "v"}))
        ),
        ("policy.model_settings.env", "not an environment variable name"),
        id="env name syntax",
    ),
    pytest.param(
        dict(
            policy=common_pb2.TaskPolicy(
                model_settings=common_pb2.ModelSettings(mcp_servers_json='{"db": {"type": "ws"}}')
            )
        ),
        ("policy.model_settings.mcp_servers_json.db", "stdio, sse, http"),
        id="mcp server type",
    ),
    pytest.param(
        dict(
            policy=common_pb2.TaskPolicy(
                model_settings=common_pb2.ModelSettings(mcp_servers_json='{"db": {}}')
            )
        ),
        ("policy.model_settings.mcp_servers_json.db", "'command'"),
        id="mcp stdio server without command",
    ),
    pytest.param(
        dict(
            policy=common_pb2.TaskPolicy(
                model_settings=common_pb2.ModelSettings(allowed_tools=["Read", " "])
            )
        ),
        ("policy.model_settings.allowed_tools",),
        id="blank tool name",
    ),
]


@pytest.mark.parametrize(("fields", "needles"), BAD_CREATE)
async def test_create_task_rejects_bad_input(
    cluster: Cluster, fields: dict[str, object], needles: tuple[str, ...]
) -> None:
    await cluster.start_server()
    request = tasks_pb2.CreateTaskRequest(agent="echo", input_json="{}")
    for name, value in fields.items():
        if isinstance(value, dict):
            getattr(request, name).update(value)
        elif hasattr(value, "CopyFrom"):
            getattr(request, name).CopyFrom(value)
        else:
            setattr(request, name, value)
    async with channel(cluster) as ch:
        stub = tasks_pb2_grpc.TaskServiceStub(ch)
        await expect(stub.CreateTask(request), grpc.StatusCode.INVALID_ARGUMENT, *needles)
    assert await count_tasks(cluster) == 0


async def test_batch_with_one_bad_task_creates_none_and_names_its_index(cluster: Cluster) -> None:
    await cluster.start_server()
    good = tasks_pb2.CreateTaskRequest(agent="echo", input_json="{}")
    bad = tasks_pb2.CreateTaskRequest(agent="echo", input_json="[]")
    async with channel(cluster) as ch:
        stub = tasks_pb2_grpc.TaskServiceStub(ch)
        await expect(
            stub.CreateTasks(tasks_pb2.CreateTasksRequest(tasks=[good, bad, good])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "tasks[1].input_json",
        )
        await expect(
            stub.CreateTasks(tasks_pb2.CreateTasksRequest()),
            grpc.StatusCode.INVALID_ARGUMENT,
            "tasks",
        )
    assert await count_tasks(cluster) == 0


async def test_unknown_task_is_not_found(cluster: Cluster) -> None:
    await cluster.start_server()
    async with channel(cluster) as ch:
        stub = tasks_pb2_grpc.TaskServiceStub(ch)
        missing = "tsk_00000000000000000000000000"
        await expect(
            stub.GetTask(tasks_pb2.GetTaskRequest(task_id=missing)),
            grpc.StatusCode.NOT_FOUND,
            "task_id",
        )
        await expect(
            stub.CancelTask(tasks_pb2.CancelTaskRequest(task_id=missing)),
            grpc.StatusCode.NOT_FOUND,
            "task_id",
        )
        follow = stub.FollowTask(tasks_pb2.FollowTaskRequest(task_id=missing))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in follow:
                pass
        assert err.value.code() is grpc.StatusCode.NOT_FOUND
        await expect(
            stub.GetTask(tasks_pb2.GetTaskRequest(task_id="")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "task_id",
        )


async def test_list_tasks_rejects_bad_paging(cluster: Cluster) -> None:
    await cluster.start_server()
    async with channel(cluster) as ch:
        stub = tasks_pb2_grpc.TaskServiceStub(ch)
        await expect(
            stub.ListTasks(tasks_pb2.ListTasksRequest(page_size=5000)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "page_size",
        )
        await expect(
            stub.ListTasks(tasks_pb2.ListTasksRequest(page_token="garbage!")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "page_token",
        )
        await expect(
            stub.ListTasks(tasks_pb2.ListTasksRequest(labels={"bad key": "x"})),
            grpc.StatusCode.INVALID_ARGUMENT,
            "labels",
        )


async def test_list_tasks_pages_and_filters(cluster: Cluster) -> None:
    await cluster.start_server()
    client = cluster.client()
    made = [
        await client.create_task("echo", {"n": i}, labels={"batch": "b1"}, allow_unknown_agent=True)
        for i in range(7)
    ]
    await client.create_task("echo", {}, labels={"batch": "b2"}, allow_unknown_agent=True)
    seen: list[str] = []
    token = ""
    while True:
        page, token = await client.list_tasks(labels={"batch": "b1"}, limit=3, page_token=token)
        seen.extend(t.id for t in page)
        if not token:
            break
    assert seen == [t.id for t in reversed(made)]
    pending, _ = await client.list_tasks(statuses=[TaskStatus.PENDING], limit=100)
    assert len(pending) == 8


async def test_idempotent_submission(cluster: Cluster) -> None:
    await cluster.start_server()
    client = cluster.client()
    first = await client.create_task(
        "echo", {"text": "a"}, idempotency_key="order-42", allow_unknown_agent=True
    )
    again = await client.create_task(
        "echo", {"text": "a"}, idempotency_key="order-42", allow_unknown_agent=True
    )
    assert again.id == first.id
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.create_task(
            "echo", {"text": "DIFFERENT"}, idempotency_key="order-42", allow_unknown_agent=True
        )
    assert err.value.code() is grpc.StatusCode.ALREADY_EXISTS
    assert "order-42" in (err.value.details() or "")
    assert await count_tasks(cluster) == 1


async def test_worker_certificate_cannot_call_operator_services(cluster: Cluster) -> None:
    await cluster.start_server()
    async with channel(cluster, "worker-1") as ch:
        tasks = tasks_pb2_grpc.TaskServiceStub(ch)
        await expect(
            tasks.CreateTask(tasks_pb2.CreateTaskRequest(agent="echo", input_json="{}")),
            grpc.StatusCode.PERMISSION_DENIED,
            "operator",
        )
        workers = workers_pb2_grpc.WorkerServiceStub(ch)
        await expect(
            workers.ListWorkers(workers_pb2.ListWorkersRequest()),
            grpc.StatusCode.PERMISSION_DENIED,
        )
    assert await count_tasks(cluster) == 0


async def _open_session(
    cluster: Cluster, identity: str, hello: workers_pb2.WorkerHello, pause: float = 0.0
) -> None:
    """Open a worker session and send `hello`, `pause` seconds after opening (a slow client)."""
    async with channel(cluster, identity) as ch:
        call = workers_pb2_grpc.RunServiceStub(ch).StreamConnect()
        await asyncio.sleep(pause)
        await call.write(workers_pb2.WorkerMessage(hello=hello))
        await call.read()


async def test_hello_with_another_workers_id_is_permission_denied(cluster: Cluster) -> None:
    await cluster.start_server()
    hello = workers_pb2.WorkerHello(worker_id="worker-2", max_concurrent_runs=1)
    await expect(
        _open_session(cluster, "worker-1", hello),
        grpc.StatusCode.PERMISSION_DENIED,
        "worker-2",
        "worker-1",
    )
    assert cluster.server is not None and not cluster.server.engine.workers


@pytest.mark.parametrize("pause", [0.0, 0.3], ids=["at once", "hello sent late"])
async def test_operator_certificate_cannot_open_a_worker_session(
    cluster: Cluster, pause: float
) -> None:
    """PERMISSION_DENIED, also for a client whose hello leaves after the server could have
    refused: a refusal before the client's first write turns that write into grpc's own
    INTERNAL ("Internal error from Core"), which says nothing of why."""
    await cluster.start_server()
    hello = workers_pb2.WorkerHello(worker_id="admin", max_concurrent_runs=1)
    await expect(
        _open_session(cluster, "operator", hello, pause),
        grpc.StatusCode.PERMISSION_DENIED,
        "worker",
    )


async def test_hello_with_bad_capacity_is_invalid(cluster: Cluster) -> None:
    await cluster.start_server()
    hello = workers_pb2.WorkerHello(worker_id="worker-1", max_concurrent_runs=0)
    await expect(
        _open_session(cluster, "worker-1", hello),
        grpc.StatusCode.INVALID_ARGUMENT,
        "hello.max_concurrent_runs",
    )


async def test_an_agents_update_with_a_bad_name_ends_the_session_and_changes_nothing(
    cluster: Cluster,
) -> None:
    await cluster.start_server()
    hello = workers_pb2.WorkerHello(
        worker_id="worker-1", max_concurrent_runs=1, agents=[common_pb2.AgentSpec(name="echo")]
    )

    async def update() -> None:
        async with channel(cluster, "worker-1") as ch:
            call = workers_pb2_grpc.RunServiceStub(ch).StreamConnect()
            await call.write(workers_pb2.WorkerMessage(hello=hello))
            await call.read()  # the session parameters
            bad = workers_pb2.AgentsUpdate(agents=[common_pb2.AgentSpec(name="bad name!")])
            await call.write(workers_pb2.WorkerMessage(agents=bad))
            while await call.read() is not grpc.aio.EOF:
                pass
            await call  # raises with the status

    await expect(update(), grpc.StatusCode.INVALID_ARGUMENT, "agents.agents[0].name")
    assert cluster.server is not None
    worker = cluster.server.engine.workers[WorkerId("worker-1")]
    assert [a.name for a in worker.agents] == ["echo"]


async def test_reports_for_a_run_of_another_worker_are_rejected(cluster: Cluster) -> None:
    """worker-2 claims worker-1's run finished: nothing changes."""
    server = await cluster.start_server()
    daemon = await cluster.start_worker("worker-1")
    client = cluster.client()
    task = await client.create_task("echo", {"text": "abc", "chunks": 3, "delay": 0.3})
    async with asyncio.timeout(5):
        while not daemon.runs:
            await asyncio.sleep(0.01)
    run_id = next(iter(daemon.runs))
    before = server.engine.rejected_reports
    async with channel(cluster, "worker-2") as ch:
        call = workers_pb2_grpc.RunServiceStub(ch).StreamConnect()
        await call.write(
            workers_pb2.WorkerMessage(
                hello=workers_pb2.WorkerHello(worker_id="worker-2", max_concurrent_runs=1)
            )
        )
        await call.read()  # session parameters
        forged = workers_pb2.RunStatusUpdate(
            run_id=run_id, attempt=1, status=common_pb2.RUN_STATUS_COMPLETED
        )
        chunk = common_pb2.OutputChunk(run_id=run_id, attempt=1, seq=99, data="evil")
        await call.write(workers_pb2.WorkerMessage(statuses=[forged], chunks=[chunk]))
        async with asyncio.timeout(5):
            while server.engine.rejected_reports < before + 2:
                await asyncio.sleep(0.01)
        await call.done_writing()
    final = await client.wait(task.id)
    assert final.status is TaskStatus.COMPLETED
    _, runs = await client.get_task(task.id)
    assert runs[0].worker_id == "worker-1"
    text = ""
    async for event in client.follow(task.id, follow=False):
        text += getattr(getattr(event, "chunk", None), "data", "")
    assert text == "abc"


async def test_input_is_checked_against_the_announced_agent_schema(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")  # announces echo with its input schema
    client = cluster.client()
    for bad, needle in (({"chunks": 0}, "chunks"), ({"bogus": 1}, "bogus"), ({"text": 5}, "text")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.create_task("echo", bad)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        details = err.value.details() or ""
        assert "input_json" in details and "echo" in details and needle in details, details
    assert await count_tasks(cluster) == 0


async def test_a_task_for_an_agent_no_worker_announced_is_refused_naming_the_known_agents(
    cluster: Cluster,
) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")  # announces echo
    client = cluster.client()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.create_task("ecoh", {"text": "typo"})
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details() or ""
    assert details.startswith("agent: no worker has announced an agent 'ecoh'"), details
    assert "known agents: 'echo'" in details
    assert await count_tasks(cluster) == 0


async def test_allow_unknown_agent_accepts_a_task_that_waits_saying_why(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")  # announces echo only
    client = cluster.client()
    waiting = await client.create_task(
        "someday_agent", {"anything": True}, allow_unknown_agent=True
    )
    assert waiting.status is TaskStatus.PENDING
    assert waiting.waiting_reason == "no online worker offers agent 'someday_agent'"
    shown, _ = await client.get_task(waiting.id)
    assert shown.waiting_reason == "no online worker offers agent 'someday_agent'"


async def test_a_pending_task_says_which_required_label_no_online_worker_has(
    cluster: Cluster,
) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")  # echo, without a gpu label
    client = cluster.client()
    task = await client.create_task("echo", {"text": "g"}, required_labels={"gpu": "a100"})
    (listed,), _ = await client.list_tasks()
    assert listed.id == task.id
    assert listed.waiting_reason == "no online worker offers agent 'echo' with label gpu=a100"


async def test_agent_schemas_are_remembered_across_restarts(cluster: Cluster) -> None:
    await cluster.start_server()
    await cluster.start_worker("worker-1")
    await cluster.stop_worker("worker-1")
    await cluster.stop_server()
    await cluster.start_server()  # no worker connected now
    client = cluster.client()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.create_task("echo", {"chunks": "many"})
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
