"""The deployment files in deploy/: systemd units that systemd accepts, a compose file with a
control plane and two workers that enroll with tokens, an image built from the wheel."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
INSTALLED_TASKRUN = "/opt/taskrun/bin/taskrun"


def unit_settings(path: Path) -> dict[str, list[str]]:
    """`Key=value` lines of a unit file, every value of a repeated key."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_there_is_a_unit_for_the_server_and_one_for_a_worker() -> None:
    assert [u.name for u in UNITS] == ["taskrun-server.service", "taskrun-worker.service"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point it at this venv's `taskrun` instead of /opt
    taskrun = Path(sys.executable).parent / "taskrun"
    for unit in UNITS:
        text = unit.read_text()
        assert INSTALLED_TASKRUN in text
        (tmp_path / unit.name).write_text(text.replace(INSTALLED_TASKRUN, str(taskrun)))
    checked = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / u.name) for u in UNITS)],
        capture_output=True,
        text=True,
    )
    assert (checked.returncode, checked.stderr) == (0, "")


@pytest.mark.parametrize(
    ("unit", "user", "state"),
    [
        ("taskrun-server.service", "taskrun", "taskrun/server"),
        ("taskrun-worker.service", "taskrun-worker", "taskrun/worker"),
    ],
)
def test_each_unit_runs_as_a_dedicated_user_with_a_state_directory_and_restarts(
    unit: str, user: str, state: str
) -> None:
    settings = unit_settings(DEPLOY / "systemd" / unit)
    assert settings["User"] == [user]
    assert settings["StateDirectory"] == [state]
    assert settings["Restart"][0] in {"on-failure", "always"}
    assert any(f.lstrip("-").startswith("/etc/taskrun/") for f in settings["EnvironmentFile"])


def test_the_worker_unit_enrolls_once_then_keeps_its_identity_in_var_lib() -> None:
    settings = unit_settings(DEPLOY / "systemd" / "taskrun-worker.service")
    (pre,) = settings["ExecStartPre"]
    assert 'test -f "$STATE_DIRECTORY/identity.json"' in pre
    assert "taskrun worker enroll --server" in pre
    assert settings["ExecStart"] == [f"{INSTALLED_TASKRUN} worker run"]
    example = (DEPLOY / "systemd" / "worker.env.example").read_text()
    for name in ("TASKRUN_ENROLL_SERVER", "TASKRUN_TOKEN", "TASKRUN_CA_FINGERPRINT"):
        assert f"\n{name}=" in example


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "docker" / "compose.yaml").read_text())
    return doc


def test_compose_has_a_control_plane_and_two_workers_each_with_its_own_volume() -> None:
    doc = compose()
    services = doc["services"]
    assert set(services) == {"cp", "worker-1", "worker-2"}
    assert set(doc["volumes"]) == {"cp-state", "worker-1-state", "worker-2-state"}
    mounts = {name: s["volumes"][0].split(":")[0] for name, s in services.items()}
    assert mounts == {"cp": "cp-state", "worker-1": "worker-1-state", "worker-2": "worker-2-state"}
    assert set(services["cp"]["ports"]) == {"50051:50051", "50052:50052"}


def test_compose_workers_enroll_with_their_own_token_on_the_public_port_then_run() -> None:
    services = compose()["services"]
    tokens = set()
    for name in ("worker-1", "worker-2"):
        worker = services[name]
        assert worker["depends_on"]["cp"]["condition"] == "service_healthy"
        (script,) = worker["command"]
        assert script.startswith('test -f "$$STATE_DIRECTORY/identity.json" || ')
        assert "taskrun worker enroll --server cp:50052" in script
        assert script.endswith("exec taskrun worker run")
        env = worker["environment"]
        assert env["STATE_DIRECTORY"] == "/var/lib/taskrun/worker"
        assert env["TASKRUN_CA_FINGERPRINT"].startswith("${TASKRUN_CA_FINGERPRINT:?")
        tokens.add(re.match(r"\$\{(\w+):\?", env["TASKRUN_TOKEN"]).group(1))  # type: ignore[union-attr]
    assert tokens == {"WORKER1_TOKEN", "WORKER2_TOKEN"}


def test_compose_control_plane_makes_its_pki_for_the_name_workers_dial() -> None:
    cp = compose()["services"]["cp"]
    (script,) = cp["command"]
    assert "taskrun certs init --host cp" in script
    assert script.endswith("exec taskrun server")
    assert cp["environment"]["TASKRUN_PUBLIC_LISTEN"] == "0.0.0.0:50052"
    assert cp["healthcheck"]["test"][1:] == ["taskrun", "workers", "list"]


def test_the_image_is_built_from_the_wheel_that_scripts_build_writes() -> None:
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert "COPY dist/taskrun_agents-*.whl" in dockerfile
    assert 'ENTRYPOINT ["taskrun"]' in dockerfile
    assert "USER taskrun" in dockerfile
    assert "taskrun_agents-*.whl" in (ROOT / "scripts" / "build").read_text()
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[-2:] == ["*", "!dist/taskrun_agents-*.whl"]
    image = compose()["services"]["cp"]["image"]
    assert f"-t {image} ." in dockerfile
