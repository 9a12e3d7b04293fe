"""Workspace settings: the root and the allowed cwds stay clear of the worker's keys."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from taskrun.core.agent import AgentError
from taskrun.worker.config import WorkerConfig
from taskrun.worker.workspace import Workspaces


def test_a_workspace_root_inside_the_certificate_directory_is_refused(tmp_path: Path) -> None:
    config = WorkerConfig(ca_cert=tmp_path / "certs" / "ca.pem", workspace_root=tmp_path / "certs")
    with pytest.raises(ValueError, match=r"workspace_root .* overlaps"):
        config.workspaces()


def test_a_workspace_root_holding_the_state_directory_is_refused(tmp_path: Path) -> None:
    config = WorkerConfig(
        ca_cert=tmp_path / "certs" / "ca.pem",
        state_dir=tmp_path / "ws" / "state",
        workspace_root=tmp_path / "ws",
    )
    with pytest.raises(ValueError, match="workspace_root"):
        config.workspaces()


def test_an_allowed_cwd_holding_the_keys_is_refused(tmp_path: Path) -> None:
    config = WorkerConfig(
        ca_cert=tmp_path / "certs" / "ca.pem",
        workspace_root=tmp_path / "ws",
        allow_cwd=[tmp_path],
    )
    with pytest.raises(ValueError, match="allow_cwd"):
        config.workspaces()


def test_runs_get_private_directories_and_cwd_must_be_allowed(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    ws = Workspaces.create(tmp_path / "ws", [tmp_path / "certs"], [repo])
    path = ws.open("run_1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert stat.S_IMODE(ws.root.stat().st_mode) == 0o700
    assert ws.cwd_for(None, path) == path
    assert ws.cwd_for(str(repo / "sub"), path) == (repo / "sub").resolve()
    for bad in ("/etc", str(repo / ".." / "certs"), "relative/dir", str(tmp_path)):
        with pytest.raises(AgentError, match=r"^input\.cwd: "):
            ws.cwd_for(bad, path)
    (repo / "link").symlink_to(tmp_path / "certs", target_is_directory=True)
    with pytest.raises(AgentError, match=r"^input\.cwd: "):  # a symlink out is followed, refused
        ws.cwd_for(str(repo / "link"), path)
    ws.close(path)
    assert not path.exists()


def test_the_sandbox_is_refused_at_start_when_bubblewrap_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap here
    with pytest.raises(ValueError, match="bubblewrap"):
        Workspaces.create(tmp_path / "ws", [], sandbox=True)
