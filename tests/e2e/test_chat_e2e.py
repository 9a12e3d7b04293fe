"""`taskrun chat` as a process, typed into through stdin: answers stream, Ctrl-C (SIGINT) cancels
the turn and not the chat, and `--conversation` returns to it later. The server, a worker with
the `anthropic` agent and the chat are processes; the model is the fake Messages API.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import copy_cli_certs
from tests.e2e.test_cli_e2e import CLI, Deployment, Proc
from tests.fakes.anthropic_server import FakeAnthropic, Text

pytestmark = pytest.mark.e2e

KEY = "sk-ant-test-key"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(api_key=KEY) as api:
        yield api


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, fake: FakeAnthropic, cli_certs: tuple[Path, str]
) -> Iterator[Deployment]:
    """One server and worker for the module: each test has conversations of its own, and takes
    from the fake API exactly the answers it queued."""
    tmp_path = tmp_path_factory.mktemp("chat")
    d = Deployment.on_reserved_ports(tmp_path, copy_cli_certs(cli_certs, tmp_path))
    try:
        d.start_server()
        env = {
            **d.env,
            "ANTHROPIC_BASE_URL": fake.base_url,
            "ANTHROPIC_API_KEY": KEY,
            "TASKRUN_ANTHROPIC_MAX_RETRIES": "0",
        }
        d.worker = Proc.start(
            "worker", [*CLI, "worker", "run", "--agents", "anthropic"], cwd=tmp_path, env=env
        )
        d.worker.wait_for_line(lambda line: '"connected"' in line)
        yield d
    finally:
        d.kill()


def start_chat(d: Deployment, *args: str) -> tuple[Proc, subprocess.Popen[str]]:
    popen = subprocess.Popen(
        [*CLI, "chat", *args],
        cwd=d.tmp,
        env=d.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc = Proc("chat", popen)
    assert popen.stdout is not None and popen.stderr is not None
    for stream, label in ((popen.stdout, "out"), (popen.stderr, "err")):
        reader = threading.Thread(target=proc._read, args=(stream, label), daemon=True)
        reader.start()
        proc.readers.append(reader)
    return proc, popen


def seen(chat: Proc, predicate: Callable[[str], bool], stream: str, timeout: float = 20) -> str:
    """A line of `stream` that matches, already read or still to come (stdout and stderr
    interleave in any order)."""
    for label, line in chat.seen:
        if label == stream and predicate(line):
            return line
    return chat.wait_for_line(predicate, stream=stream, timeout=timeout)


def say(popen: subprocess.Popen[str], line: str) -> None:
    assert popen.stdin is not None
    popen.stdin.write(line + "\n")
    popen.stdin.flush()


def test_chat_streams_answers_ctrl_c_cancels_the_turn_and_the_chat_goes_on(
    deployment: Deployment, fake: FakeAnthropic
) -> None:
    fake.enqueue(
        Text("Hi Ana.", input_tokens=10, output_tokens=3),
        Text(["tick "] * 400, input_tokens=12, delay=0.05),  # twenty seconds if left alone
        Text("You are Ana.", input_tokens=30, output_tokens=4),
    )
    streams = fake.streams_started
    chat, popen = start_chat(deployment, "anthropic")
    try:
        say(popen, "My name is Ana.")
        header = seen(chat, lambda line: line.startswith("conversation "), "err")
        conversation_id = header.split()[1]
        seen(chat, lambda line: line == "Hi Ana.\n", "out")
        seen(chat, lambda line: line.startswith("[turn 1 completed"), "err")

        say(popen, "Count slowly.")
        deadline = time.monotonic() + 20
        while fake.streams_started < streams + 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # some ticks went out
        popen.send_signal(signal.SIGINT)
        seen(chat, lambda line: line.startswith("[turn 2 cancelled"), "err")
        assert popen.poll() is None  # the chat goes on

        say(popen, "Who am I?")
        seen(chat, lambda line: line == "You are Ana.\n", "out")
        seen(chat, lambda line: line.startswith("[turn 3 completed"), "err")
        assert popen.stdin is not None
        popen.stdin.close()  # Ctrl-D
        assert popen.wait(15) == 0
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait()
    assert f"return with: taskrun chat --conversation {conversation_id}" in chat.output("err")
    sent = fake.message_requests[-1].messages
    assert [m["role"] for m in sent] == ["user", "assistant", "user", "assistant", "user"]
    assert sent[0]["content"] == "My name is Ana." and sent[1]["content"] == "Hi Ana."
    assert sent[2]["content"] == "Count slowly." and "cancelled" in sent[3]["content"]
    assert sent[4]["content"] == "Who am I?"

    got = deployment.run("conversation", "get", conversation_id, "-o", "json")
    assert got.returncode == 0, got.stderr
    doc = json.loads(got.stdout)
    assert [t["status"] for t in doc["turn_list"]] == ["completed", "cancelled", "completed"]
    assert doc["usage"]["input_tokens"] == 10 + 12 + 30  # the cancelled turn was billed too

    # return to it later
    fake.enqueue(Text("Still Ana."))
    chat, popen = start_chat(deployment, "--conversation", conversation_id)
    try:
        say(popen, "And now?")
        seen(chat, lambda line: line == "Still Ana.\n", "out")
        assert popen.stdin is not None
        popen.stdin.close()
        assert popen.wait(15) == 0
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait()
    assert len(fake.message_requests[-1].messages) == 7

    # `task continue` of any turn's task: the next turn; --follow shows only the new answer
    fake.enqueue(Text("Last."))
    first_task = doc["turn_list"][0]["task_id"]
    continued = deployment.run("task", "continue", first_task, "One last thing?", "--follow")
    assert continued.returncode == 0, continued.stderr
    assert continued.stdout.strip() == "Last."
    assert len(fake.message_requests[-1].messages) == 9

    listed = deployment.run("conversation", "list")
    assert listed.returncode == 0 and conversation_id in listed.stdout
    deleted = deployment.run("conversation", "delete", conversation_id)
    assert deleted.returncode == 0, deleted.stderr
    missing = deployment.run("conversation", "get", conversation_id)
    assert missing.returncode != 0 and "conversation_id" in missing.stderr


def test_a_refused_message_is_reported_and_the_chat_goes_on(
    deployment: Deployment, fake: FakeAnthropic
) -> None:
    fake.enqueue(Text(["tick "] * 400, delay=0.05), Text("Hello again."))
    streams = fake.streams_started
    first, first_popen = start_chat(deployment, "anthropic")
    second_popen: subprocess.Popen[str] | None = None
    try:
        say(first_popen, "Count slowly.")
        header = seen(first, lambda line: line.startswith("conversation "), "err")
        conversation_id = header.split()[1]
        deadline = time.monotonic() + 20
        while fake.streams_started < streams + 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        # a second chat on the same conversation while the first turn still runs
        second, second_popen = start_chat(deployment, "--conversation", conversation_id)
        say(second_popen, "Hello?")
        refused = seen(second, lambda line: line.startswith("error: FAILED_PRECONDITION"), "err")
        assert "is unfinished" in refused
        assert second_popen.poll() is None  # the chat goes on
        first_popen.send_signal(signal.SIGINT)  # cancel the long turn from the first chat
        seen(first, lambda line: line.startswith("[turn 1 cancelled"), "err")
        say(second_popen, "Hello now?")
        seen(second, lambda line: line == "Hello again.\n", "out")
        for popen in (first_popen, second_popen):
            assert popen.stdin is not None
            popen.stdin.close()
            assert popen.wait(15) == 0
    finally:
        for started in (first_popen, second_popen):
            if started is not None and started.poll() is None:
                started.kill()
                started.wait()
