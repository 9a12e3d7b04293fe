"""The `taskrun` command line as processes: certs, server, worker, tasks, and `taskrun dev`.

One server and one worker are started per module (`python -m taskrun.cli.main ...` in a temporary
directory); the tests talk to them only through the CLI, as an operator would. The last test of
the first part stops them with SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shlex
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

from tests import ports
from tests.conftest import copy_cli_certs

pytestmark = pytest.mark.e2e

CLI = [sys.executable, "-m", "taskrun.cli.main"]
STARTUP = 20.0


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKRUN_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class Proc:
    """A long-running child whose stdout and stderr lines are collected by reader threads."""

    name: str
    popen: subprocess.Popen[str]
    lines: queue.Queue[tuple[str, str]] = field(default_factory=queue.Queue)
    seen: list[tuple[str, str]] = field(default_factory=list)
    readers: list[threading.Thread] = field(default_factory=list)

    @classmethod
    def start(cls, name: str, argv: list[str], *, cwd: Path, env: dict[str, str]) -> Proc:
        popen = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        return cls.start_reading(name, popen)

    @classmethod
    def start_reading(cls, name: str, popen: subprocess.Popen[str]) -> Proc:
        """Collect the lines of a started process's stdout (and stderr, when it is a pipe)."""
        proc = cls(name, popen)
        for stream, label in ((popen.stdout, "out"), (popen.stderr, "err")):
            if stream is None:
                continue
            reader = threading.Thread(target=proc._read, args=(stream, label), daemon=True)
            reader.start()
            proc.readers.append(reader)
        return proc

    def _read(self, stream: IO[str], label: str) -> None:
        for line in stream:
            self.lines.put((label, line))

    def wait_for_line(
        self, predicate: Callable[[str], bool], timeout: float = STARTUP, stream: str = ""
    ) -> str:
        """The first new line (of `stream`, "out" or "err", or either) that matches."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                label, line = self.lines.get(timeout=min(left, 0.2))
            except queue.Empty:
                if self.popen.poll() is not None and self.lines.empty():
                    break
                continue
            self.seen.append((label, line))
            if (not stream or label == stream) and predicate(line):
                return line
        raise AssertionError(f"{self.name}: no matching line; exit={self.popen.poll()}\n{self.log}")

    def output(self, stream: str) -> str:
        """Everything the exited process wrote to `stream` ("out" or "err")."""
        for reader in self.readers:
            reader.join(timeout=5)
        _ = self.log
        return "".join(line for label, line in self.seen if label == stream)

    @property
    def log(self) -> str:
        while not self.lines.empty():
            self.seen.append(self.lines.get_nowait())
        return "".join(f"[{label}] {line}" for label, line in self.seen)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise AssertionError(
                f"{self.name} did not stop within {timeout} s\n{self.log}"
            ) from None


@dataclass
class Deployment:
    """A server and a worker started with the CLI, and a way to run CLI commands against them."""

    tmp: Path
    server_address: str
    certs_init_output: str
    server: Proc | None = None
    worker: Proc | None = None
    server_args: tuple[str, ...] = ()
    reserved: int = 0  # the server's port and the next (its public listener's), until kill()

    @classmethod
    def on_reserved_ports(
        cls, tmp: Path, certs_init_output: str, server_args: tuple[str, ...] = ()
    ) -> Deployment:
        """A deployment whose server listens on reserved ports (tests/ports.py): clients are
        told the address before the server starts, and a restarted server finds it free."""
        port = ports.reserve(2)
        return cls(tmp, f"127.0.0.1:{port}", certs_init_output, server_args=server_args,
                   reserved=port)  # fmt: skip

    @property
    def env(self) -> dict[str, str]:
        return clean_env(
            TASKRUN_SERVER=self.server_address, TASKRUN_CERTS_DIR=str(self.tmp / "certs")
        )

    def run(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, *args],
            cwd=self.tmp,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, name: str, *args: str) -> Proc:
        return Proc.start(name, [*CLI, *args], cwd=self.tmp, env=self.env)

    def start_server(self) -> None:
        store = f"sqlite:{self.tmp / 't.db'}"
        args = ("server", "--store", store, "--listen", self.server_address, *self.server_args)
        self.server = self.start("server", *args)
        self.server.wait_for_line(lambda line: "server listening" in line, stream="err")

    def kill(self) -> None:
        for proc in (self.worker, self.server):
            if proc is not None and proc.popen.poll() is None:
                proc.popen.kill()
                proc.popen.wait()
        ports.release(self.reserved)


def created_id(line: str) -> str:
    """The id in `task tsk_... created; following its output`."""
    assert line.startswith("task ") and " created" in line, line
    return line.split()[1]


def launch(tmp: Path, certs: tuple[Path, str], *server_args: str) -> Deployment:
    """The files of `certs init` (the `cli_certs` fixture), then a server (SQLite in tmp) and
    worker-1 offering echo, both connected."""
    d = Deployment.on_reserved_ports(tmp, copy_cli_certs(certs, tmp), server_args)
    try:
        d.start_server()
        d.worker = d.start("worker", "worker", "run", "--agents", "echo")
        d.worker.wait_for_line(lambda line: '"connected"' in line)
    except BaseException:
        d.kill()
        raise
    return d


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, cli_certs: tuple[Path, str]
) -> Iterator[Deployment]:
    d = launch(tmp_path_factory.mktemp("cli"), cli_certs)
    try:
        yield d
    finally:
        d.kill()


def test_certs_init_reports_what_it_wrote(deployment: Deployment) -> None:
    out = deployment.certs_init_output
    for name in ("ca.pem", "server.pem", "operator-key.pem", "worker-1.pem", "worker-2-key.pem"):
        assert f"certs/{name}" in out
    assert "CA fingerprint: sha256:" in out


def test_follow_prints_the_output_and_exits_0(deployment: Deployment) -> None:
    result = deployment.run("task", "create", "echo", "--input", '{"text":"hello"}', "--follow")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello"
    assert " completed" in result.stderr


def test_a_failing_task_makes_follow_exit_1(deployment: Deployment) -> None:
    result = deployment.run("task", "create", "echo", "--input", '{"fail":"boom"}', "--follow")
    assert result.returncode == 1, result.stderr
    assert result.stderr.rstrip().endswith("failed: boom")


def test_task_list_json_contains_a_created_task(deployment: Deployment) -> None:
    created = deployment.run("task", "create", "echo", "--input", '{"text":"listed"}')
    assert created.returncode == 0, created.stderr
    task_id = created.stdout.strip()
    listed = deployment.run("task", "list", "--output", "json")
    assert listed.returncode == 0, listed.stderr
    doc = json.loads(listed.stdout)
    assert set(doc) == {"tasks", "next_page_token"}
    (task,) = [t for t in doc["tasks"] if t["id"] == task_id]
    assert task["agent"] == "echo"
    assert task["input"] == {"text": "listed"}
    assert task["status"] in {"pending", "running", "completed"}


def test_task_get_shows_runs_and_result(deployment: Deployment) -> None:
    result = deployment.run("task", "create", "echo", "--input", '{"text":"abc"}', "--follow")
    assert result.returncode == 0, result.stderr
    task_id = created_id(result.stderr.splitlines()[0])
    shown = deployment.run("task", "get", task_id, "--output", "json")
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["status"] == "completed"
    assert doc["result"] == {"chars": 3, "chunks": 1}
    assert [r["status"] for r in doc["runs"]] == ["completed"]
    assert doc["runs"][0]["worker_id"] == "worker-1"
    table = deployment.run("task", "get", task_id)
    assert table.returncode == 0, table.stderr
    assert "Status:    completed" in table.stdout
    assert "Runs:" in table.stdout and "worker-1" in table.stdout
    logs = deployment.run("task", "logs", task_id)
    assert (logs.returncode, logs.stdout) == (0, "abc")


def test_an_output_schema_from_a_file_is_checked_by_the_worker(deployment: Deployment) -> None:
    schema = deployment.tmp / "schema.json"
    schema.write_text('{"type": "object", "required": ["answer"]}')
    failed = deployment.run(
        "task", "create", "echo", "--input", '{"text":"x"}', "--output-schema", str(schema),
        "--max-cost", "0.5", "--follow",
    )  # fmt: skip
    assert failed.returncode == 1, failed.stderr
    assert "the result does not match the task's output schema" in failed.stderr
    assert "'answer' is a required property" in failed.stderr
    task_id = created_id(failed.stderr.splitlines()[0])
    shown = deployment.run("task", "get", task_id)
    assert "output schema:" in shown.stdout and "max cost:" in shown.stdout
    schema.write_text('{"type": "object", "required": 7}')
    refused = deployment.run("task", "create", "echo", "--output-schema", str(schema))
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: ") and "policy.output_schema_json" in refused.stderr
    negative = deployment.run("task", "create", "echo", "--max-tokens", "-1")
    assert negative.returncode == 2 and "policy.model_settings.max_tokens" in negative.stderr


def test_a_task_is_found_by_a_unique_prefix_of_its_id_like_git(deployment: Deployment) -> None:
    created = deployment.run("task", "create", "echo", "--input", '{"text":"short"}')
    assert created.returncode == 0, created.stderr
    task_id = created.stdout.strip()
    for prefix in (task_id[:-3], task_id[len("tsk_") : -3]):  # `tsk_` may be left out
        shown = deployment.run("task", "get", prefix, "-o", "json")
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["id"] == task_id


def test_an_ambiguous_task_id_prefix_is_refused_listing_the_candidates(
    deployment: Deployment,
) -> None:
    ids = [
        deployment.run("task", "create", "echo", "--input", '{"text":"twin"}').stdout.strip()
        for _ in range(2)
    ]
    result = deployment.run("task", "get", "tsk_")
    assert result.returncode == 2
    assert result.stderr.startswith("error: task id: 'tsk_' is ambiguous, ")
    assert "give more characters" in result.stderr
    listed = deployment.run("task", "list", "-o", "json", "--limit", "5")
    newest = [t["id"] for t in json.loads(listed.stdout)["tasks"]]
    assert newest[:2] == ids[::-1] and all(i in result.stderr for i in ids)


def test_task_logs_json_is_one_document_and_jsonl_one_object_per_line(
    deployment: Deployment,
) -> None:
    followed = deployment.run(
        "task", "create", "echo", "--input", '{"text":"abcd","chunks":2}', "--follow", "-o", "json"
    )
    assert followed.returncode == 0, followed.stderr
    doc = json.loads(followed.stdout)  # one document, not one object per line
    assert doc["task"]["status"] == "completed"
    assert "".join(c["data"] for c in doc["output"] if c["kind"] == "text") == "abcd"
    task_id = doc["task"]["id"]
    logs = deployment.run("task", "logs", task_id, "-o", "json")
    assert logs.returncode == 0, logs.stderr
    assert json.loads(logs.stdout) == {"task": doc["task"], "output": doc["output"]}
    lines = deployment.run("task", "logs", task_id, "-o", "jsonl")
    assert lines.returncode == 0, lines.stderr
    events = [json.loads(line) for line in lines.stdout.splitlines()]
    assert sorted(e["event"] for e in events) == ["output", "output", "task"]


def test_unknown_task_exits_2_with_not_found(deployment: Deployment) -> None:
    result = deployment.run("task", "get", "nonexistent")
    assert result.returncode == 2
    assert result.stderr.startswith("error: NOT_FOUND: ")
    assert "Traceback" not in result.stderr


def test_input_that_is_not_an_object_exits_2_naming_input_json(deployment: Deployment) -> None:
    result = deployment.run("task", "create", "echo", "--input", "[1]")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert "input_json" in result.stderr


def test_a_task_for_an_agent_no_worker_offers_is_refused_naming_the_known_agents(
    deployment: Deployment,
) -> None:
    result = deployment.run("task", "create", "ecoh", "--input", '{"text":"typo"}')
    assert result.returncode == 2
    assert result.stderr.startswith(
        "error: INVALID_ARGUMENT: agent: no worker has announced an agent 'ecoh' "
        "(known agents: 'echo')"
    )
    assert "--allow-unknown-agent" in result.stderr


def test_allow_unknown_agent_submits_and_task_get_says_why_it_waits(
    deployment: Deployment,
) -> None:
    created = deployment.run("task", "create", "later", "--allow-unknown-agent")
    assert created.returncode == 0, created.stderr
    task_id = created.stdout.strip()
    shown = deployment.run("task", "get", task_id)
    assert shown.returncode == 0, shown.stderr
    assert "Waiting:   no online worker offers agent 'later'" in shown.stdout
    follow = deployment.start("follow", "task", "logs", task_id, "--follow")
    try:
        follow.wait_for_line(
            lambda line: line == "[waiting] no online worker offers agent 'later'\n", stream="err"
        )
    finally:
        follow.stop(signal.SIGINT)
    assert deployment.run("task", "cancel", task_id).returncode == 0


def test_workers_list_shows_the_worker(deployment: Deployment) -> None:
    result = deployment.run("workers", "list", "--output", "json")
    assert result.returncode == 0, result.stderr
    (worker,) = json.loads(result.stdout)["workers"]
    assert (worker["id"], worker["status"]) == ("worker-1", "online")
    assert [a["name"] for a in worker["agents"]] == ["echo"]
    schema = worker["agents"][0]["input_schema"]  # an object, not JSON text inside JSON
    assert schema["type"] == "object" and "text" in schema["properties"]
    shown = deployment.run("workers", "get", "worker-1")
    assert shown.returncode == 0, shown.stderr
    assert "none/echo" in shown.stdout
    unknown = deployment.run("workers", "drain", "no-such-worker")
    assert unknown.returncode == 2
    assert unknown.stderr.startswith("error: NOT_FOUND: ")


def test_worker_revoke_of_an_unknown_worker_exits_2_with_not_found(
    deployment: Deployment,
) -> None:
    result = deployment.run("worker", "revoke", "no-such-worker", "--reason", "e2e")
    assert result.returncode == 2
    assert result.stderr.startswith("error: NOT_FOUND: ")


def test_cancelling_a_followed_task_makes_follow_exit_130(deployment: Deployment) -> None:
    follow = deployment.start(
        "follow", "task", "create", "echo", "--input",
        '{"text":"x","chunks":100,"delay":0.1}', "--follow",
    )  # fmt: skip
    task_id = created_id(follow.wait_for_line(lambda line: " created" in line, stream="err"))
    cancelled = deployment.run("task", "cancel", task_id, "--reason", "e2e")
    assert cancelled.returncode == 0, cancelled.stderr
    assert follow.popen.wait(timeout=10) == 130, follow.log
    assert "cancelled: e2e" in follow.log


def test_follow_survives_a_server_restart(tmp_path: Path, cli_certs: tuple[Path, str]) -> None:
    d = launch(tmp_path, cli_certs, "--lease", "30")
    try:
        text = "abcdefghijklmnopqrst"
        payload = json.dumps({"text": text, "chunks": len(text), "delay": 0.2})
        follow = d.start("follow", "task", "create", "echo", "--input", payload, "--follow")
        follow.wait_for_line(lambda line: " created" in line, stream="err")
        time.sleep(1.0)  # some output has been streamed
        assert d.server is not None
        assert d.server.stop(signal.SIGTERM) == 0, d.server.log
        follow.wait_for_line(  # said at once, not after the reconnect window
            lambda line: line.startswith(
                "lost the connection to the server (UNAVAILABLE); reconnecting…"
            ),
            timeout=10,
            stream="err",
        )
        time.sleep(3.0)  # down a while: the follower's attempts meanwhile must not back off far
        d.start_server()  # same port, same database (returns once it listens)
        back = time.monotonic()
        follow.wait_for_line(lambda line: line == "reconnected\n", stream="err")
        # within about a second of the server answering (its retries are at most 1 s apart)
        assert time.monotonic() - back < 2.5
        assert follow.popen.wait(timeout=30) == 0, follow.log
        assert follow.output("out") == text  # each piece once, none lost
    finally:
        d.kill()


def test_backup_copies_the_store_while_the_server_runs(deployment: Deployment) -> None:
    created = deployment.run("task", "create", "echo", "--input", '{"text":"keep me"}')
    assert created.returncode == 0, created.stderr
    task_id = created.stdout.strip()
    target = deployment.tmp / "backups" / "taskrun-copy.db"
    target.parent.mkdir()
    result = deployment.run("backup", str(target), "--db", str(deployment.tmp / "t.db"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"backed up {deployment.tmp / 't.db'} to {target} (")
    assert target.stat().st_mode & 0o777 == 0o600
    with contextlib.closing(sqlite3.connect(target)) as copy:
        ids = {row[0] for row in copy.execute("SELECT id FROM tasks")}
    assert task_id in ids


def test_backup_of_a_missing_store_names_it(deployment: Deployment) -> None:
    result = deployment.run("backup", "x.db", "--db", "nowhere.db")
    assert result.returncode == 2
    assert result.stderr == "error: store nowhere.db does not exist\n"


def test_sigterm_stops_worker_then_server_with_exit_0(deployment: Deployment) -> None:
    assert deployment.worker is not None and deployment.server is not None
    assert deployment.worker.stop(signal.SIGTERM) == 0, deployment.worker.log
    assert deployment.server.stop(signal.SIGTERM) == 0, deployment.server.log


def test_dev_runs_everything_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    dev = Proc.start(
        "dev",
        [*CLI, "dev", "--workers", "2", "--listen", "127.0.0.1:0", "--dir", str(tmp_path / "dev")],
        cwd=tmp_path,
        env=clean_env(),
    )
    try:
        dev.wait_for_line(lambda line: line.startswith("taskrun dev is ready"), stream="out")
        command = dev.wait_for_line(
            lambda line: line.strip().startswith("TASKRUN_SERVER="), stream="out"
        )
        words = shlex.split(command)
        env = clean_env(**dict(w.split("=", 1) for w in words[:2]))
        result = subprocess.run(
            [*CLI, "task", "create", "echo", "--input", '{"text":"hello dev"}', "--follow"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert (result.returncode, result.stdout) == (0, "hello dev"), result.stderr
        workers = subprocess.run(
            [*CLI, "workers", "list", "-o", "json"], env=env, capture_output=True, text=True
        )
        online = [w["id"] for w in json.loads(workers.stdout)["workers"] if w["status"] == "online"]
        assert online == ["worker-1", "worker-2"]
        started = time.monotonic()
        assert dev.stop(signal.SIGINT, timeout=15) == 0, dev.log
        assert time.monotonic() - started < 10
    finally:
        if dev.popen.poll() is None:  # SIGTERM lets dev stop its children (own sessions)
            with contextlib.suppress(AssertionError):
                dev.stop(signal.SIGTERM)
