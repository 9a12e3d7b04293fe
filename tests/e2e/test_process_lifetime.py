"""Processes that must not linger or share: a busy port is an error, `dev`'s children die with it.

Real processes only: `taskrun server` and `taskrun dev` as a user starts them, stopped the ways a
user stops them (Ctrl-C on a pipeline, SIGHUP, kill -9).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskrun.ports import split_host_port
from tests import ports
from tests.conftest import copy_cli_certs
from tests.e2e.test_cli_e2e import CLI, Proc, clean_env

pytestmark = pytest.mark.e2e

CHILD_EXIT_TIMEOUT = 20.0  # a worker drains, the server stops with a grace of a few seconds


def certs_init(tmp: Path) -> None:
    done = subprocess.run(
        [*CLI, "certs", "init"], cwd=tmp, env=clean_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def start_server(tmp: Path, port: int) -> Proc:
    server = Proc.start(
        "server",
        [*CLI, "server", "--listen", f"127.0.0.1:{port}", "--store", "memory"],
        cwd=tmp,
        env=clean_env(),
    )
    server.wait_for_line(lambda line: "server listening" in line, stream="err")
    return server


@pytest.fixture(scope="module")
def running_server(
    tmp_path_factory: pytest.TempPathFactory, cli_certs: tuple[Path, str]
) -> Iterator[tuple[Path, int]]:
    """One server for the tests that only start processes next to it (which fail) or call it."""
    tmp = tmp_path_factory.mktemp("running")
    copy_cli_certs(cli_certs, tmp)
    reserved = ports.reserve(3)  # its two listeners and the port below, a second server's
    port = reserved + 1
    server = start_server(tmp, port)
    try:
        yield tmp, port
    finally:
        server.stop()
        ports.release(reserved)


def test_a_server_on_port_0_writes_the_ports_it_bound_to_its_ready_file(
    tmp_path: Path, cli_certs: tuple[Path, str]
) -> None:
    copy_cli_certs(cli_certs, tmp_path)
    ready = tmp_path / "ready.json"
    argv = [*CLI, "server", "--listen", "127.0.0.1:0", "--store", "memory", "--ready-file"]
    server = Proc.start("server", [*argv, str(ready)], cwd=tmp_path, env=clean_env())
    try:
        logged = server.wait_for_line(lambda line: "server listening" in line, stream="err")
        deadline = time.monotonic() + 5
        while not ready.exists():  # written right after that line
            assert time.monotonic() < deadline and server.popen.poll() is None, server.log
            time.sleep(0.01)
        doc = json.loads(ready.read_text())
        assert set(doc) == {"address", "public_address", "http_address", "pid"}
        assert doc["pid"] == server.popen.pid and doc["http_address"] == ""
        ports = {split_host_port(doc[k])[1] for k in ("address", "public_address")}
        assert len(ports) == 2 and 0 not in ports
        assert json.loads(logged)["address"] == doc["address"]  # the log line names them too
        listed = subprocess.run(
            [*CLI, "--server", doc["address"], "workers", "list"],
            cwd=tmp_path,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert listed.returncode == 0, listed.stderr
    finally:
        server.stop()


def assert_one_error_line_naming(stderr: str, port: int) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert f"port {port} is already in use" in errors[0]
    assert "Traceback" not in stderr
    assert "add_port.cc" not in stderr  # no grpc C-core line


def test_a_second_server_on_a_busy_port_exits_1_naming_the_port(
    running_server: tuple[Path, int],
) -> None:
    tmp, port = running_server
    second = subprocess.run(
        [*CLI, "server", "--listen", f"127.0.0.1:{port}", "--store", "memory"],
        cwd=tmp,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 1, second.stderr
    assert_one_error_line_naming(second.stderr, port)


def test_a_server_whose_public_port_is_busy_exits_1_naming_that_port(
    running_server: tuple[Path, int],
) -> None:
    tmp, port = running_server  # the running server's mTLS port is our public port
    second = subprocess.run(
        [*CLI, "server", "--listen", f"127.0.0.1:{port - 1}", "--store", "memory"],
        cwd=tmp,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 1, second.stderr
    assert_one_error_line_naming(second.stderr, port)


def test_dev_next_to_a_running_server_exits_1_naming_the_port(
    running_server: tuple[Path, int],
) -> None:
    tmp, port = running_server
    dev = subprocess.run(
        [*CLI, "dev", "--listen", f"127.0.0.1:{port}", "--dir", str(tmp / "dev")],
        cwd=tmp,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert dev.returncode == 1, dev.stderr
    assert_one_error_line_naming(dev.stderr, port)
    assert "ready" not in dev.stdout


# --- `taskrun dev` never leaves children behind ---------------------------------------------


def dev_children(directory: Path) -> set[int]:
    """Pids of the servers and workers that a `dev --dir directory` started (they get
    `--certs-dir directory/certs`; `dev` itself does not)."""
    marker = f"{directory / 'certs'}\0".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes()
            if b"taskrun.cli.main\0" in cmdline and b"--certs-dir\0" + marker in cmdline:
                found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; its parent has not reaped it yet


def wait_gone(pids: set[int], timeout: float = CHILD_EXIT_TIMEOUT) -> set[int]:
    """The pids still running after `timeout` (empty when all exited)."""
    deadline = time.monotonic() + timeout
    while (left := {p for p in pids if alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def kill_all(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def dev_argv(directory: Path) -> list[str]:
    return [*CLI, "dev", "--workers", "2", "--listen", "127.0.0.1:0", "--dir", str(directory)]


def wait_ready(proc: Proc, directory: Path) -> set[int]:
    proc.wait_for_line(lambda line: line.startswith("taskrun dev is ready"))
    children = dev_children(directory)
    assert len(children) == 3, (children, proc.log)  # the server and two workers
    return children


def test_ctrl_c_on_dev_piped_into_tee_stops_every_child(tmp_path: Path) -> None:
    directory = tmp_path / "dev"
    pipeline = " ".join([*map(repr, dev_argv(directory)), "2>&1", "|", "tee", "dev.log"])
    # its own process group, like a shell job: Ctrl-C sends SIGINT to dev and tee at once
    shell = subprocess.Popen(
        ["sh", "-c", pipeline],
        cwd=tmp_path,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    proc = Proc.start_reading("dev | tee", shell)
    children: set[int] = set()
    try:
        children = wait_ready(proc, directory)
        os.killpg(shell.pid, signal.SIGINT)
        assert wait_gone(children) == set(), proc.log
    finally:
        kill_all(dev_children(directory))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)
        shell.wait()


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_a_hangup_or_terminate_stops_dev_and_its_children_with_exit_0(
    tmp_path: Path, sig: signal.Signals
) -> None:
    directory = tmp_path / "dev"
    dev = Proc.start("dev", dev_argv(directory), cwd=tmp_path, env=clean_env())
    children: set[int] = set()
    try:
        children = wait_ready(dev, directory)
        assert dev.stop(sig, timeout=CHILD_EXIT_TIMEOUT) == 0, dev.log
        assert wait_gone(children, timeout=1.0) == set()
    finally:
        kill_all(dev_children(directory))
        dev.popen.kill()
        dev.popen.wait()


def test_children_die_when_dev_is_killed_with_sigkill(tmp_path: Path) -> None:
    directory = tmp_path / "dev"
    dev = Proc.start("dev", dev_argv(directory), cwd=tmp_path, env=clean_env())
    children: set[int] = set()
    try:
        children = wait_ready(dev, directory)
        dev.popen.kill()
        dev.popen.wait()
        assert wait_gone(children) == set()
    finally:
        kill_all(dev_children(directory))


def test_a_failed_handshake_leaves_no_grpc_core_lines_on_the_cli_stderr(
    running_server: tuple[Path, int], tmp_path_factory: pytest.TempPathFactory
) -> None:
    _, port = running_server
    stranger = tmp_path_factory.mktemp("other-ca")
    certs_init(stranger)  # a CA the server does not know: the handshake fails
    result = subprocess.run(
        [*CLI, "--server", f"127.0.0.1:{port}", "workers", "list"],
        cwd=stranger,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith("error: UNAVAILABLE: ")
    assert "ssl_transport_security" not in result.stderr
