"""Which of gRPC's endpoints a TaskRun process uses (taskrun.grpc_transport)."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version

import pytest

from taskrun import grpc_transport
from taskrun.grpc_transport import CHECKED, EXPERIMENTS, choose_endpoints, grpcio_version


def test_reads_the_installed_grpcio_version_without_importing_it() -> None:
    major, minor, *_ = version("grpcio").split(".")
    assert grpcio_version() == (int(major), int(minor))


def test_sets_the_older_endpoints_for_a_checked_grpcio(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grpc_transport, "grpcio_version", lambda: (1, 85))
    environ: dict[str, str] = {}
    assert choose_endpoints(environ, loaded=set())
    assert environ == {"GRPC_EXPERIMENTS": EXPERIMENTS}


@pytest.mark.parametrize("found", [(1, 86), (2, 0), (1, 79), None])
def test_leaves_an_unchecked_grpcio_to_its_defaults(
    monkeypatch: pytest.MonkeyPatch, found: tuple[int, int] | None
) -> None:
    monkeypatch.setattr(grpc_transport, "grpcio_version", lambda: found)
    environ: dict[str, str] = {}
    assert not choose_endpoints(environ, loaded=set())
    assert environ == {}


@pytest.mark.parametrize("set_already", ["", "-event_engine_dns", EXPERIMENTS])
def test_leaves_an_operators_setting_alone(
    monkeypatch: pytest.MonkeyPatch, set_already: str
) -> None:
    monkeypatch.setattr(grpc_transport, "grpcio_version", lambda: (1, 85))
    environ = {"GRPC_EXPERIMENTS": set_already}
    assert not choose_endpoints(environ, loaded=set())
    assert environ == {"GRPC_EXPERIMENTS": set_already}


def test_does_nothing_once_grpc_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grpc_transport, "grpcio_version", lambda: (1, 85))
    environ: dict[str, str] = {}
    assert not choose_endpoints(environ, loaded={"grpc"})
    assert environ == {}


def _fresh(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**base, **env},
        timeout=60,
    )


# What a new process ends up with: its GRPC_EXPERIMENTS once grpc is loaded and has started a
# server and a channel (where an experiment grpc does not know is reported, on stderr).
PROBE = """
import os
{first}
import grpc
server = grpc.server(None)
server.add_insecure_port("127.0.0.1:0")
grpc.insecure_channel("127.0.0.1:1").close()
print(os.environ.get("GRPC_EXPERIMENTS", "<unset>"))
"""


def test_a_process_importing_taskrun_first_runs_with_them() -> None:
    done = _fresh(PROBE.format(first="import taskrun"))
    expected = EXPERIMENTS if grpcio_version() in CHECKED else "<unset>"
    assert done.stdout.strip() == expected
    assert "Unknown experiment" not in done.stderr  # CHECKED names releases that know them


def test_a_process_that_loaded_grpc_before_taskrun_keeps_grpcs_defaults() -> None:
    done = _fresh(PROBE.format(first="import grpc, taskrun"))
    assert done.stdout.strip() == "<unset>"


def test_the_cli_entry_point_runs_with_them() -> None:
    # `taskrun server`, `taskrun worker run` and every command start here
    code = "import os, taskrun.cli.main; print(os.environ.get('GRPC_EXPERIMENTS', '<unset>'))"
    done = _fresh(code)
    expected = EXPERIMENTS if grpcio_version() in CHECKED else "<unset>"
    assert done.stdout.strip() == expected
