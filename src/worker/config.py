"""Worker settings, from flags or TASKRUN_* environment variables (the CLI fills them)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field


class WorkerConfig(BaseModel):
    server: str = "127.0.0.1:50051"
    worker_id: str = "worker-1"
    # agent names to offer; empty = every agent found in the `taskrun.agents` entry points
    agents: list[str] = Field(default_factory=list)
    capacity: int = Field(default=4, ge=1, le=10_000)
    labels: dict[str, str] = Field(default_factory=dict)
    ca_cert: Path = Path("certs/ca.pem")
    cert: Path | None = None  # default certs/<worker_id>.pem
    key: Path | None = None  # default certs/<worker_id>-key.pem
    server_name: str = ""  # TLS name to verify instead of the host in `server`
    drain_timeout: float = Field(default=30.0, ge=0)
    cancel_grace: float = Field(default=5.0, ge=0)
    reconnect_max_wait: float = Field(default=10.0, gt=0)
    metrics_listen: str = ""  # issue 6: serve Prometheus /metrics on host:port; empty = off

    def cert_path(self) -> Path:
        return self.cert or self.ca_cert.parent / f"{self.worker_id}.pem"

    def key_path(self) -> Path:
        return self.key or self.ca_cert.parent / f"{self.worker_id}-key.pem"
