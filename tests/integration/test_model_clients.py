"""What a model call costs the worker's event loop, against the fake APIs on loopback.

The worker's event loop also carries its heartbeats: whatever blocks it inside a run can cost
the worker its lease. The SDKs do work on first use (imports, building their response models)
and on every new client (an SSL context, a connection pool); the agents do the first when they
load and keep one client per endpoint, so a model call does neither.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
import structlog.testing

from taskrun.worker.agents import clients
from taskrun.worker.agents.backends import AnthropicBackend
from taskrun.worker.agents.clients import MAX_CLIENTS, rehearse, shared
from taskrun.worker.agents.openai_api import OpenAIBackend
from tests.fakes.anthropic_server import FakeAnthropic, Text
from tests.fakes.openai_server import Chat, FakeOpenAI
from tests.ports import refusing_port

KEY = "sk-test-key"

# Run in a fresh interpreter (what the SDKs build once stays built for the whole process): load
# the agent unless told "cold" (with proxy settings that would fail its rehearsal), then count
# the modules imported during the first model call, and how many more calls into pydantic's
# model building it made than the second.
FIRST_CALL = textwrap.dedent(
    """
    import asyncio, json, sys

    import structlog

    kind, mode, proxy = sys.argv[1], sys.argv[2], sys.argv[3]
    if kind == "anthropic":
        from taskrun.worker.agents.anthropic_api import AnthropicAgent as Agent
        from taskrun.worker.agents.backends import AnthropicBackend as Backend
    else:
        from taskrun.worker.agents.openai_api import OpenAIAgent as Agent
        from taskrun.worker.agents.openai_api import OpenAIBackend as Backend
    if mode == "warm":
        import os

        # the rehearsal must not go through a proxy: this one refuses every connection
        proxies = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy")
        os.environ.update(dict.fromkeys(proxies, proxy))
        Agent()
        for name in proxies:
            del os.environ[name]

    building = 0

    def profile(frame, event, arg):
        global building
        if event == "call" and "pydantic" in frame.f_code.co_filename and (
            frame.f_code.co_name in ("complete_model_class", "generate_schema")
        ):
            building += 1

    async def call():
        global building
        building = 0
        backend = Backend.from_env(structlog.get_logger())
        sys.setprofile(profile)
        await backend.complete(
            system="", messages=[{"role": "user", "content": "hi"}], model="m", max_tokens=8
        )
        sys.setprofile(None)
        return building

    async def main():
        before = set(sys.modules)
        first = await call()
        imported = sorted(set(sys.modules) - before)
        # the SDKs also build a little on every call (a TypeAdapter for a field): not first use
        later = await call()
        print(json.dumps({"imported": imported, "built": first - later}))

    asyncio.run(main())
    """
)


@pytest.fixture
def apis(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[tuple[FakeAnthropic, FakeOpenAI]]:
    with FakeAnthropic(api_key=KEY) as anthropic_api, FakeOpenAI(api_key=KEY) as openai_api:
        for name in list(os.environ):
            if name.startswith(("ANTHROPIC_", "OPENAI_", "TASKRUN_ANTHROPIC_", "TASKRUN_OPENAI_")):
                monkeypatch.delenv(name)
        anthropic_api.default = Text("hello")
        openai_api.default = Chat("hello")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", anthropic_api.base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
        monkeypatch.setenv("ANTHROPIC_CONFIG_DIR", str(tmp_path / "anthropic-config"))
        monkeypatch.setenv("OPENAI_BASE_URL", openai_api.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        yield anthropic_api, openai_api


async def first_call(kind: str, mode: str, proxy: str) -> dict[str, object]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        FIRST_CALL,
        kind,
        mode,
        proxy,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    found: dict[str, object] = json.loads(out.decode().strip().splitlines()[-1])
    return found


@pytest.mark.parametrize("kind", ["anthropic", "openai"])
async def test_the_first_model_call_imports_and_builds_nothing_once_the_agent_loaded(
    apis: tuple[FakeAnthropic, FakeOpenAI], kind: str
) -> None:
    with refusing_port() as port:
        proxy = f"http://127.0.0.1:{port}"
        cold, warm = await asyncio.gather(
            first_call(kind, "cold", proxy), first_call(kind, "warm", proxy)
        )
    # what the counting sees when nothing was done beforehand: it can tell
    assert cold["imported"] and cold["built"], cold
    assert warm == {"imported": [], "built": 0}


async def test_anthropic_calls_share_one_connection(
    apis: tuple[FakeAnthropic, FakeOpenAI],
) -> None:
    api, _ = apis
    for _ in range(3):  # each run makes its backend anew from the environment
        backend = AnthropicBackend.from_env(structlog.get_logger())
        done = await backend.complete(
            system="", messages=[{"role": "user", "content": "hi"}], model="m", max_tokens=8
        )
        assert done.text == "hello"
    assert len({r.peer for r in api.message_requests}) == 1, api.message_requests


async def test_openai_calls_share_one_connection(apis: tuple[FakeAnthropic, FakeOpenAI]) -> None:
    _, api = apis
    for _ in range(3):
        backend = OpenAIBackend.from_env(structlog.get_logger())
        done = await backend.complete(
            system="", messages=[{"role": "user", "content": "hi"}], model="m", max_tokens=8
        )
        assert done.text == "hello"
    assert len({r.peer for r in api.chat_requests}) == 1, api.chat_requests


def test_a_rehearsal_that_fails_is_logged_and_the_agent_still_loads() -> None:
    calls: list[str] = []

    async def broken(base_url: str) -> None:
        calls.append(base_url)
        raise ConnectionResetError("the canned reply never came")

    with structlog.testing.capture_logs() as logs:
        rehearse("a-test-sdk", broken, b"")
        rehearse("a-test-sdk", broken, b"")  # once per process
    assert len(calls) == 1 and calls[0].startswith("http://127.0.0.1:")
    assert [(e["event"], e["error"]) for e in logs] == [
        ("the model SDK's rehearsal failed", "the canned reply never came")
    ]


async def test_clients_made_for_keys_no_longer_used_do_not_pile_up() -> None:
    made = [shared(("a-test-sdk", f"key-{n}"), object) for n in range(MAX_CLIENTS + 1)]
    assert shared(("a-test-sdk", f"key-{MAX_CLIENTS}"), object) is made[-1]  # kept, not remade
    assert shared(("a-test-sdk", "key-1"), object) is made[1]
    assert shared(("a-test-sdk", "key-0"), object) is not made[0]  # the oldest was dropped


async def test_concurrent_calls_on_the_shared_client_each_get_their_own_reply(
    apis: tuple[FakeAnthropic, FakeOpenAI],
) -> None:
    anthropic_api, openai_api = apis
    anthropic_api.default = lambda request: Text(["re: ", request.last_user_text()], delay=0.05)
    openai_api.default = lambda request: Chat(["re: ", request.messages[-1]["content"]], delay=0.05)
    log = structlog.get_logger()

    async def ask(backend: AnthropicBackend | OpenAIBackend, text: str) -> str:
        done = await backend.complete(
            system="", messages=[{"role": "user", "content": text}], model="m", max_tokens=8
        )
        return done.text

    prompts = [f"question {n}" for n in range(6)]
    for make in (AnthropicBackend.from_env, OpenAIBackend.from_env):
        answers = await asyncio.gather(*(ask(make(log), p) for p in prompts))
        assert answers == [f"re: {p}" for p in prompts]


def test_a_rehearsal_that_never_answers_is_given_up_after_its_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(clients, "REHEARSAL_TIMEOUT", 0.3)

    async def hangs(base_url: str) -> None:
        await asyncio.Event().wait()  # a proxy that swallows the request, a server gone quiet

    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        rehearse("a-hanging-sdk", hangs, b"")
    # given up at its own timeout, well before the 15 s default
    assert time.monotonic() - started < 10
    assert [(e["event"], e["sdk"]) for e in logs] == [
        ("the model SDK's rehearsal failed", "a-hanging-sdk")
    ]
