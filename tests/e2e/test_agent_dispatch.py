"""Dispatch by what an agent can really do, with real worker processes against a fake Messages API.

Each worker process has its own environment (one without a key, one with a wrong key, one with
the right key), as on separate machines; the control plane is a real process too. What the
workers received is checked at the fake API (the model of each request), where the runs ran and
how they ended at the control plane (stored runs and timestamps).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from taskrun.cli.client import Client
from taskrun.core.models import ModelSettings, Worker
from taskrun.core.status import Fault, RunStatus, TaskStatus
from tests.e2e.test_faults import Processes, online, procs
from tests.fakes.anthropic_server import FakeAnthropic, InvalidRequest, RecordedRequest, Reply, Text

pytestmark = pytest.mark.e2e

__all__ = ["procs"]  # the fixture, imported for these tests

KEY = "sk-ant-test-key"
NO_KEY: dict[str, str | None] = {"ANTHROPIC_API_KEY": None}


@pytest.fixture
def api(procs: Processes, tmp_path: Path) -> Iterator[FakeAnthropic]:
    home = tmp_path / "home"
    home.mkdir()
    with FakeAnthropic(api_key=KEY) as fake:
        fake.default = Text(["ok"])
        for name in list(procs.env):
            if name.startswith(("ANTHROPIC_", "CLAUDE_", "TASKRUN_ANTHROPIC_")):
                del procs.env[name]
        procs.env.update(
            {
                "ANTHROPIC_BASE_URL": fake.base_url,
                "ANTHROPIC_API_KEY": KEY,
                "HOME": str(home),  # no `claude login` credentials of the developer
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
                "CLAUDE_CODE_MAX_RETRIES": "0",
                "TASKRUN_ANTHROPIC_MAX_RETRIES": "0",
            }
        )
        yield fake


async def worker(client: Client, worker_id: str) -> Worker:
    found, _ = await client.get_worker(worker_id)
    return found


async def taskrun(procs: Processes, *args: str) -> str:
    """The `taskrun` command's standard output (it must succeed)."""
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "taskrun.cli.main", *args],
        env=procs.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def agent(w: Worker, name: str):  # type: ignore[no-untyped-def]
    return next(a for a in w.agents if a.name == name)


async def test_a_keyless_worker_next_to_a_good_one_gets_none_of_eight_tasks(
    procs: Processes, api: FakeAnthropic
) -> None:
    procs.start_server()
    procs.start_worker("worker-1", 4, agents="anthropic,echo", env=NO_KEY)
    procs.start_worker("worker-2", 2, agents="anthropic,echo")
    async with procs.client() as client:
        await online(client, "worker-1", "worker-2")
        keyless = agent(await worker(client, "worker-1"), "anthropic")
        assert not keyless.available
        assert "ANTHROPIC_API_KEY" in keyless.unavailable_reason
        assert agent(await worker(client, "worker-1"), "echo").available
        assert agent(await worker(client, "worker-2"), "anthropic").available

        tasks = [
            await client.create_task(
                "anthropic", {"prompt": f"n{i}"}, retry_on_failure=True, max_attempts=3
            )
            for i in range(8)
        ]
        for task in tasks:
            final = await client.wait(task.id)
            assert final.status is TaskStatus.COMPLETED, final.error
            _, runs = await client.get_task(task.id)
            assert [(r.status, r.worker_id) for r in runs] == [(RunStatus.COMPLETED, "worker-2")]
        assert len(api.message_requests) == 8

    shown = await taskrun(procs, "workers", "get", "worker-1")
    assert "[UNAVAILABLE: no Anthropic credentials" in shown
    echo = "  echo - Streams its input text back in chunks (optional delay between chunks)."
    assert f"{echo} [available]\n" in shown
    assert "Health:" in shown
    listed = await taskrun(procs, "workers", "list")
    assert "anthropic!,echo" in listed and "HEALTH" in listed
    usage = await taskrun(procs, "usage", "--days", "1")
    [row] = [line.split() for line in usage.splitlines() if "worker-2" in line]
    assert row[1:5] == ["anthropic", "claude-sonnet-5-5", "worker-2", "8"]
    report = json.loads(await taskrun(procs, "usage", "--days", "1", "-o", "json"))
    [doc] = [r for r in report["rows"] if r["worker_id"] == "worker-2"]
    assert (doc["agent"], doc["runs"], doc["usage"]["turns"]) == ("anthropic", 8, 8)
    assert int(doc["usage"]["input_tokens"]) > 0  # int64: a string in the protobuf JSON mapping


async def test_require_model_runs_where_the_agent_offers_it_and_the_api_receives_it(
    procs: Processes, api: FakeAnthropic
) -> None:
    procs.start_server()
    procs.start_worker(
        "worker-1", 4, agents="anthropic,echo", flags=("--models", "claude-sonnet-5-5")
    )
    procs.start_worker(
        "worker-2", 1, agents="anthropic", flags=("--models", "claude-haiku-5-5,claude-opus-5-5")
    )
    async with procs.client() as client:
        await online(client, "worker-1", "worker-2")
        offered = [
            b.model_name for b in agent(await worker(client, "worker-2"), "anthropic").backends
        ]
        assert offered == ["claude-haiku-5-5", "claude-opus-5-5"]  # not the whole price table

        task = await client.create_task(
            "anthropic", {"prompt": "hi"}, required_model="claude-opus-5-5"
        )
        final = await client.wait(task.id)
        assert final.status is TaskStatus.COMPLETED, final.error
        _, runs = await client.get_task(task.id)
        assert [r.worker_id for r in runs] == ["worker-2"]
        assert runs[0].backend_used is not None
        assert runs[0].backend_used.model_name == "claude-opus-5-5"
        assert [r.body["model"] for r in api.message_requests] == ["claude-opus-5-5"]
        assert json.loads(final.result)["model"] == "claude-opus-5-5"

        # the required model wins over the input's own choice
        task = await client.create_task(
            "anthropic",
            {"prompt": "hi", "model": "claude-haiku-5-5"},
            required_model="claude-opus-5-5",
        )
        assert (await client.wait(task.id)).status is TaskStatus.COMPLETED
        assert api.message_requests[-1].body["model"] == "claude-opus-5-5"

        # nobody offers it: refused at submission, naming the field and what is offered
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.create_task("anthropic", {"prompt": "x"}, required_model="claude-opus-9")
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        details = refused.value.details() or ""
        assert "policy.required_model" in details
        assert "anthropic/claude-opus-5-5" in details and "anthropic/claude-sonnet-5-5" in details

        # echo offers no anthropic backend, even on a worker whose other agent does
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.create_task("echo", {"text": "x"}, required_provider="anthropic")
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "policy.required_provider" in (refused.value.details() or "")

        # a task that may wait does, and says why
        waiting = await client.create_task(
            "anthropic", {"prompt": "x"}, required_model="claude-opus-9", allow_unknown_agent=True
        )
        got, _ = await client.get_task(waiting.id)
        assert got.status is TaskStatus.PENDING
        assert got.waiting_reason == (
            "no online worker offers agent 'anthropic' with a claude-opus-9 model backend"
        )


async def test_claude_code_calls_the_required_model(procs: Processes, api: FakeAnthropic) -> None:
    pytest.importorskip("claude_agent_sdk", reason="needs the taskrun[claude] extra")
    procs.start_server()
    procs.start_worker(
        "worker-1",
        1,
        agents="claude_code",
        flags=("--models", "claude-sonnet-5-5,claude-haiku-5-5"),
    )
    async with procs.client() as client:
        await online(client, "worker-1")
        task = await client.create_task(
            "claude_code", {"prompt": "hi", "max_turns": 1}, required_model="claude-haiku-5-5"
        )
        final = await client.wait(task.id)
        assert final.status is TaskStatus.COMPLETED, final.error
        models = {r.body.get("model") for r in api.message_requests}
        assert models == {"claude-haiku-5-5"}, models


async def test_a_flapping_worker_is_quarantined_and_its_tasks_complete_elsewhere(
    procs: Processes, api: FakeAnthropic
) -> None:
    procs.start_server("--quarantine-after", "2", "--quarantine-base", "60")
    # a wrong key: the agent looks ready, and every run fails at once (HTTP 401)
    procs.start_worker("worker-1", 4, agents="anthropic", env={"ANTHROPIC_API_KEY": "sk-wrong"})
    procs.start_worker("worker-2", 1, agents="anthropic")
    async with procs.client() as client:
        await online(client, "worker-1", "worker-2")
        tasks = [
            await client.create_task(
                "anthropic", {"prompt": f"n{i}"}, retry_on_failure=True, max_attempts=3
            )
            for i in range(6)
        ]
        for task in tasks:
            final = await client.wait(task.id)
            assert final.status is TaskStatus.COMPLETED, final.error
        flapping = await worker(client, "worker-1")
        assert flapping.quarantined_until is not None
        assert flapping.quarantined_until > datetime.now(UTC)
        assert "runs in a row failed within 10s" in flapping.quarantine_reason
        assert "authentication failed" in flapping.quarantine_reason
        assert flapping.consecutive_failures >= 2
        opened = flapping.quarantined_until - timedelta(seconds=60)  # --quarantine-base

        failed_there: list[datetime] = []
        for task in tasks:
            _, runs = await client.get_task(task.id)
            assert runs[-1].status is RunStatus.COMPLETED and runs[-1].worker_id == "worker-2"
            for run in runs[:-1]:  # a retry never went back to the worker that failed it
                assert (run.status, run.worker_id) == (RunStatus.FAILED, "worker-1")
                assert run.fault is Fault.WORKER  # a 401: the worker's key
                assert run.finished_at is not None and run.assigned_at is not None
                # given to it before the breaker opened (a slot freed by its first failure may
                # have been refilled before the second one tripped it), never after
                assert run.assigned_at <= opened
                failed_there.append(run.finished_at)
        assert len(failed_there) >= 2

        # while quarantined it gets nothing, though it has three times the free slots
        later = [await client.create_task("anthropic", {"prompt": "more"}) for _ in range(3)]
        for task in later:
            assert (await client.wait(task.id)).status is TaskStatus.COMPLETED
            _, runs = await client.get_task(task.id)
            assert [r.worker_id for r in runs] == ["worker-2"]
            assert runs[0].assigned_at is not None and runs[0].assigned_at > max(failed_there)


async def test_bad_tasks_in_a_row_do_not_quarantine_a_healthy_worker(
    procs: Processes, api: FakeAnthropic
) -> None:
    """Failures that are the task's (a request the API refuses, an output schema never met, a
    cost limit, a temperature the provider does not take, the agent's own failure) leave the
    breaker alone: the worker still gets the next task."""
    procs.start_server("--quarantine-after", "2", "--quarantine-base", "60")
    procs.start_worker("worker-1", 1, agents="anthropic,echo")

    def reply(request: RecordedRequest) -> Reply:
        if "huge" in request.last_user_text():
            return InvalidRequest("prompt is too long: 1000001 tokens > 1000000 maximum")
        return Text(["not json"])

    api.default = reply
    async with procs.client() as client:
        await online(client, "worker-1")
        bad = [
            client.create_task("anthropic", {"prompt": "huge"}),
            client.create_task(
                "anthropic", {"prompt": "x"}, output_schema={"type": "object"}, output_retries=0
            ),
            client.create_task("anthropic", {"prompt": "x"}, max_cost_usd=0.000001),
            client.create_task(
                "anthropic", {"prompt": "x"}, model_settings=ModelSettings(temperature=1.5)
            ),
            client.create_task("echo", {"text": "x", "fail": "the ticket was empty"}),
        ]
        errors = []
        for create in bad:  # one after the other: a streak of five on one worker
            final = await client.wait((await create).id)
            assert final.status is TaskStatus.FAILED
            _, runs = await client.get_task(final.id)
            assert [(r.status, r.worker_id, r.fault) for r in runs] == [
                (RunStatus.FAILED, "worker-1", Fault.TASK)
            ]
            errors.append(final.error)
        assert "invalid request (HTTP 400)" in errors[0]
        assert "output schema" in errors[1]
        assert "cost limit reached" in errors[2]
        assert "temperature 1.5" in errors[3]
        assert errors[4] == "the ticket was empty"

        shown = await taskrun(procs, "task", "get", final.id)
        assert "FAULT" in shown and " task " in shown

        healthy = await worker(client, "worker-1")
        assert healthy.consecutive_failures == 0
        assert healthy.quarantined_until is None and healthy.quarantine_reason == ""
        good = await client.create_task("anthropic", {"prompt": "fine"})
        assert (await client.wait(good.id)).status is TaskStatus.COMPLETED


async def test_a_model_named_only_in_the_input_binds_dispatch_like_require_model(
    procs: Processes, api: FakeAnthropic
) -> None:
    procs.start_server()
    # worker-1 is the emptier one, but its anthropic agent does not announce haiku
    procs.start_worker("worker-1", 4, agents="anthropic", flags=("--models", "claude-sonnet-5-5"))
    procs.start_worker("worker-2", 1, agents="anthropic", flags=("--models", "claude-haiku-5-5"))
    async with procs.client() as client:
        await online(client, "worker-1", "worker-2")
        tasks = [
            await client.create_task("anthropic", {"prompt": f"n{i}", "model": "claude-haiku-5-5"})
            for i in range(4)
        ]
        for task in tasks:
            final = await client.wait(task.id)
            assert final.status is TaskStatus.COMPLETED, final.error
            _, runs = await client.get_task(task.id)
            assert [r.worker_id for r in runs] == ["worker-2"]
        assert [r.body["model"] for r in api.message_requests] == ["claude-haiku-5-5"] * 4

        # nobody offers it: refused at submission, naming the input's field and what is offered
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.create_task("anthropic", {"prompt": "x", "model": "claude-opus-9"})
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        details = refused.value.details() or ""
        assert "input_json.model" in details and "claude-opus-9" in details
        assert "anthropic/claude-haiku-5-5" in details

        # a task that may wait does, says why, and no worker gets it
        waiting = await client.create_task(
            "anthropic", {"prompt": "x", "model": "claude-opus-9"}, allow_unknown_agent=True
        )
        got, runs = await client.get_task(waiting.id)
        assert got.status is TaskStatus.PENDING
        assert got.waiting_reason == (
            "no online worker offers agent 'anthropic' with a claude-opus-9 model backend"
        )
        assert [r.worker_id for r in runs] == [None]
        assert len(api.message_requests) == 4

        # listed on one page, each waiting task names its own model
        other = await client.create_task(
            "anthropic", {"prompt": "x", "model": "claude-opus-8"}, allow_unknown_agent=True
        )
        listed, _ = await client.list_tasks(statuses=[TaskStatus.PENDING])
        reasons = {t.id: t.waiting_reason for t in listed}
        assert "claude-opus-9" in reasons[waiting.id]
        assert "claude-opus-8" in reasons[other.id]


async def test_support_triage_runs_on_claude_code_where_that_is_all_the_worker_has(
    procs: Processes, api: FakeAnthropic
) -> None:
    pytest.importorskip("claude_agent_sdk", reason="needs the taskrun[claude] extra")
    procs.start_server("--quarantine-after", "2")
    only_cli = {"ANTHROPIC_API_KEY": None, "CLAUDE_CODE_OAUTH_TOKEN": KEY}
    procs.start_worker("worker-1", 1, agents="anthropic,support_triage", env=only_cli)
    triage = {"category": "bug", "priority": "high", "summary": "Checkout crashes."}
    api.default = Text(json.dumps(triage))
    ticket = {"ticket_id": "T-1", "subject": "Checkout", "body": "It crashes."}
    async with procs.client() as client:
        await online(client, "worker-1")
        announced = await worker(client, "worker-1")
        assert not agent(announced, "anthropic").available
        assert agent(announced, "support_triage").available

        for asked in ({"backend": "claude_code"}, {}):  # named, or the one this worker has
            task = await client.create_task("support_triage", {**ticket, **asked})
            final = await client.wait(task.id)
            assert final.status is TaskStatus.COMPLETED, final.error
            assert json.loads(final.result)["backend"] == "claude_code"
        assert len(api.message_requests) == 2
        assert all("Bearer" in r.headers.get("authorization", "") for r in api.message_requests)

        # a backend it cannot use: a clear failure before any call, and not the worker's fault
        for _ in range(2):
            task = await client.create_task("support_triage", {**ticket, "backend": "anthropic"})
            final = await client.wait(task.id)
            assert final.status is TaskStatus.FAILED
            assert final.error.startswith("input.backend: 'anthropic' cannot run on this worker")
        assert len(api.message_requests) == 2
        assert (await worker(client, "worker-1")).quarantined_until is None
