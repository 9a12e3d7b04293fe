"""Worker settings, from flags or TASKRUN_* environment variables (the CLI fills them)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from taskrun.worker.identity import StatePaths, enroll_command, load_identity
from taskrun.worker.workspace import Workspaces, default_root


class WorkerConfig(BaseModel):
    server: str = "127.0.0.1:50051"
    worker_id: str = "worker-1"
    # agent names to offer; empty = every agent found in the `taskrun.agents` entry points
    agents: list[str] = Field(default_factory=list)
    capacity: int = Field(default=4, ge=1, le=10_000)
    # how often to check what the agents can run (credentials, SDKs, CLIs), seconds
    agent_check_interval: float = Field(default=30.0, gt=0)
    labels: dict[str, str] = Field(default_factory=dict)
    ca_cert: Path = Path("certs/ca.pem")
    cert: Path | None = None  # default certs/<worker_id>.pem
    key: Path | None = None  # default certs/<worker_id>-key.pem
    server_name: str = ""  # TLS name to verify instead of the host in `server`
    drain_timeout: float = Field(default=30.0, ge=0)
    cancel_grace: float = Field(default=5.0, ge=0)
    reconnect_max_wait: float = Field(default=10.0, gt=0)
    metrics_listen: str = ""  # serve Prometheus /metrics on host:port; empty = off
    # an enrolled identity (`taskrun worker enroll`): its worker id, CA, certificate and key are
    # used, and its server and server name unless those are given explicitly
    state_dir: Path | None = None
    # where each run gets its own working directory (default: the user's cache,
    # `~/.cache/taskrun/workspaces/<worker_id>`); never inside the state or certificate dirs
    workspace_root: Path | None = None
    keep_workspaces: bool = False  # keep each run's directory after the run (debugging)
    # directories an input's `cwd` may name (or lie inside); empty: `cwd` is refused
    allow_cwd: list[Path] = Field(default_factory=list)
    # ask agents that can (claude_code) to sandbox the programs they run (needs bubblewrap)
    agent_sandbox: bool = False

    def cert_path(self) -> Path:
        return self.cert or self.ca_cert.parent / f"{self.worker_id}.pem"

    def key_path(self) -> Path:
        return self.key or self.ca_cert.parent / f"{self.worker_id}-key.pem"

    def protected_paths(self) -> list[Path]:
        """Directories holding this worker's state, CA, certificate and key."""
        paths = [self.ca_cert.parent, self.cert_path().parent, self.key_path().parent]
        if self.state_dir is not None:
            paths.append(self.state_dir)
        return paths

    def workspaces(self) -> Workspaces:
        """The checked workspace settings (ValueError naming the setting at fault)."""
        return Workspaces.create(
            self.workspace_root or default_root(self.worker_id),
            self.protected_paths(),
            self.allow_cwd,
            keep=self.keep_workspaces,
            sandbox=self.agent_sandbox,
        )

    def with_identity(self) -> WorkerConfig:
        """This config with the identity enrolled in state_dir applied (itself without one).

        ValueError when state_dir holds no identity, or one for another worker than an explicitly
        given worker_id.
        """
        if self.state_dir is None:
            return self
        identity = load_identity(self.state_dir)
        if identity is None:
            raise ValueError(
                f"{self.state_dir} holds no enrolled identity; enroll first: "
                + enroll_command(state_dir=self.state_dir)
            )
        explicit = self.model_fields_set
        if "worker_id" in explicit and self.worker_id != identity.worker_id:
            raise ValueError(
                f"worker id {self.worker_id!r} differs from {identity.worker_id!r} enrolled in "
                f"{self.state_dir}"
            )
        paths = StatePaths(self.state_dir)
        update: dict[str, object] = {
            "worker_id": identity.worker_id,
            "ca_cert": paths.ca_cert,
            "cert": paths.cert,
            "key": paths.key,
        }
        if "server" not in explicit:
            update["server"] = identity.server
        if "server_name" not in explicit:
            update["server_name"] = identity.server_name
        return self.model_copy(update=update)
