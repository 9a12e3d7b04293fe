"""Control-plane settings, from flags or TASKRUN_* environment variables (the CLI fills them)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import BaseModel, Field, field_validator, model_validator

from taskrun.controlplane.dispatcher import ROUND_SPREAD
from taskrun.controlplane.health import BreakerSettings
from taskrun.core.models import DEFAULT_MAX_ATTEMPTS


class ServerConfig(BaseModel):
    listen: str = "127.0.0.1:50051"
    # "sqlite:PATH" (default, one file, WAL), "postgresql://USER:PASSWORD@HOST:PORT/DBNAME"
    # (the `postgres` extra) or "memory" (tests; nothing survives a restart)
    store: str = "sqlite:.taskrun/taskrun.db"
    ca_cert: Path = Path("certs/ca.pem")
    server_cert: Path = Path("certs/server.pem")
    server_key: Path = Path("certs/server-key.pem")
    # the CA key signs enrolled and renewed worker certificates; without it enrollment
    # and renewal are refused (FAILED_PRECONDITION) and everything else works.
    ca_key: Path | None = None  # default: ca-key.pem next to ca_cert
    # The public listener: TLS with the server certificate, no client certificate. It serves
    # Enroll and health to anyone, and the operator services to callers with an API token.
    # None = the host of `listen` and the port after its port (0 stays 0); "" = not served.
    public_listen: str | None = None
    # Serve the operator services on the public listener to API-token callers. Off: it serves
    # only Enroll and health (expose enrollment, keep the API on the mTLS listener).
    public_operator_api: bool = True
    worker_cert_lifetime: float = Field(default=24 * 3600.0, gt=0)  # seconds
    # `taskrun login`: operator certificates bound to an API token; default and maximum lifetime
    operator_cert_lifetime: float = Field(default=12 * 3600.0, gt=0, le=24 * 3600.0)
    bootstrap_token_ttl: float = Field(default=3600.0, gt=0)  # default TTL, seconds
    max_bootstrap_token_ttl: float = Field(default=7 * 24 * 3600.0, gt=0)
    # Workers renew the lease on their runs with a heartbeat every `heartbeat_interval`. A worker
    # that goes `lease_duration` without a renewal stops its runs itself; the control plane
    # retries them `lease_margin` later (the margin covers the worker's stopping and clocks that
    # tick at slightly different rates). Their sum bounds how long a dead worker's runs wait;
    # the lease also bounds how long a control-plane restart may take before runs are stopped.
    heartbeat_interval: float = Field(default=1.0, gt=0)
    # A worker that holds no runs heartbeats only every `idle_heartbeat_interval` (0: every
    # `heartbeat_interval`): its lease may lapse meanwhile, since it has nothing to stop, and
    # it renews before it starts a run given to it then. An idle session silent for this plus
    # the lease and the margin is ended (its worker is then shown offline).
    idle_heartbeat_interval: float = Field(default=10.0, ge=0)
    lease_duration: float = Field(default=4.0, ge=0.5)
    lease_margin: float = Field(default=0.5, ge=0.1)
    # Several control planes on one PostgreSQL database: one leads, the others stand by. The
    # leader renews its lease four times per `leader_lease`; a standby takes over once it ran
    # out (the database's clock decides). Keep it well under `lease_duration`, so that workers
    # reach the new leader before their own lease runs out and keep their runs.
    leader_lease: float = Field(default=2.0, ge=0.2)
    # Where workers and clients reach this control plane, told to them by standbys when they
    # call one: host:port of the mTLS listener. Empty: `listen` (this host's name when `listen`
    # is a wildcard address).
    advertise: str = ""
    default_max_attempts: int = Field(default=DEFAULT_MAX_ATTEMPTS, ge=1, le=100)
    max_chunks_per_message: int = Field(default=512, ge=1)
    max_chunk_bytes: int = Field(default=64 * 1024, ge=1024)
    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=64 * 1024)
    retry_backoff_base: float = Field(default=1.0, ge=0)
    retry_backoff_max: float = Field(default=60.0, ge=0)
    max_inflight_commits: int = Field(default=64, ge=1)
    # Runs placed together (a CreateTasks call, slots freed at once) go to about this many
    # workers at most, in batches per worker; 0 = one run per worker, least loaded first.
    dispatch_spread: int = Field(default=ROUND_SPREAD, ge=0, le=100_000)
    # A run still active this long after its task's timeout is failed by the control plane
    # (the worker should have stopped it; this catches a worker that cannot).
    timeout_backstop: float = Field(default=10.0, ge=0)
    # A schedule's occurrence handled later than this after its fire time (the control plane was
    # not running) is a misfire: its misfire policy decides whether it still runs.
    schedule_misfire_grace: float = Field(default=60.0, ge=0)
    # where to serve Prometheus `/metrics` (host:port); empty = not served
    metrics_listen: str = ""
    # once listening, the bound addresses are written to this file as JSON (with port 0 in an
    # address, the ports picked); empty = not written
    ready_file: str = ""
    # a busy metrics address only logs a warning (the CLI default, not chosen explicitly)
    metrics_optional: bool = False
    # the HTTP API (JSON, server-sent events) and the MCP server, TLS with the server
    # certificate and API tokens; host:port, empty = not served
    http_listen: str = ""
    http_max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # Agents orchestrating agents: the MCP server's URL as runs that allow sub-tasks reach it
    # (default: https://<http_listen host>:<its port>/mcp; a wildcard host becomes the host
    # each worker connects to), and how deep sub-tasks may nest below their root.
    mcp_url: str = ""
    max_subtask_depth: int = Field(default=3, ge=1, le=100)
    # webhooks. Targets in loopback, private, link-local and other internal ranges are
    # refused unless one of these networks (CIDR) holds them.
    webhook_allow_networks: list[str] = Field(default_factory=list)
    webhook_timeout: float = Field(default=10.0, gt=0)  # per attempt, seconds
    webhook_retry_base: float = Field(default=2.0, gt=0)  # first retry after 1-2 s, doubling
    webhook_retry_max: float = Field(default=3600.0, gt=0)  # longest wait between attempts
    webhook_max_attempts: int = Field(default=12, ge=1, le=100)
    webhook_max_age: float = Field(default=24 * 3600.0, gt=0)  # give up on older deliveries
    # Worker health (controlplane.health): after `quarantine_after` runs in a row failed within
    # `fast_failure` seconds of their assignment, the worker gets no new runs for
    # `quarantine_base` seconds, doubled at each reopening up to `quarantine_max`; 0 = never.
    quarantine_after: int = Field(default=5, ge=0, le=1000)
    fast_failure: float = Field(default=10.0, gt=0)
    quarantine_base: float = Field(default=30.0, gt=0)
    quarantine_max: float = Field(default=600.0, gt=0)
    # Daily cost caps in US dollars (controlplane.budgets): per label ("team=research") and per
    # schedule name. Once today's (UTC) spending reaches one, the runs it covers wait.
    label_budgets: dict[str, float] = Field(default_factory=dict)
    schedule_budgets: dict[str, float] = Field(default_factory=dict)

    @field_validator("label_budgets", "schedule_budgets")
    @classmethod
    def _budgets(cls, values: dict[str, float]) -> dict[str, float]:
        for key, usd in values.items():
            if not (0 <= usd < float("inf")):
                raise ValueError(f"the budget of {key!r} must be a finite amount >= 0")
        return values

    @field_validator("label_budgets")
    @classmethod
    def _label_keys(cls, values: dict[str, float]) -> dict[str, float]:
        for key in values:
            name, sep, value = key.partition("=")
            if not (sep and name and value):
                raise ValueError(f"{key!r} is not a label like 'team=research'")
        return values

    def breaker(self) -> BreakerSettings:
        return BreakerSettings(
            self.quarantine_after, self.fast_failure, self.quarantine_base, self.quarantine_max
        )

    @field_validator("webhook_allow_networks")
    @classmethod
    def _networks(cls, values: list[str]) -> list[str]:
        for value in values:
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise ValueError(f"{value!r} is not a network (CIDR, e.g. 10.0.0.0/8)") from None
        return values

    @model_validator(mode="after")
    def _leases_outlast_a_takeover(self) -> ServerConfig:
        """On PostgreSQL a standby takes over after the leader's lease ran out; workers keep
        their runs only if their own lease outlasts that takeover (the leader's lease, loading
        the unfinished work, reconnecting), so the default worker lease grows with it there."""
        takeover_safe = 3 * self.leader_lease + 2.0
        if (
            self.store.startswith(("postgresql:", "postgres:"))
            and "lease_duration" not in self.model_fields_set
            and self.lease_duration < takeover_safe
        ):
            self.lease_duration = takeover_safe
        return self

    @model_validator(mode="after")
    def _heartbeats_fit_the_lease(self) -> ServerConfig:
        if self.heartbeat_interval * 3 > self.lease_duration:
            raise ValueError(
                f"heartbeat_interval ({self.heartbeat_interval:g}s) must be at most a third of "
                f"lease_duration ({self.lease_duration:g}s), so a lost heartbeat or two does not "
                "stop the runs"
            )
        if 0 < self.idle_heartbeat_interval < self.heartbeat_interval:
            raise ValueError(
                f"idle_heartbeat_interval ({self.idle_heartbeat_interval:g}s) must be 0 (off) or "
                f"at least heartbeat_interval ({self.heartbeat_interval:g}s)"
            )
        return self

    def advertised_address(self) -> str:
        if self.advertise:
            return self.advertise
        host, _, port = self.listen.rpartition(":")
        if host.strip("[]") in ("0.0.0.0", "::", ""):
            import socket

            host = socket.getfqdn()
        return f"{host}:{port}"

    def advertised_public_address(self) -> str:
        """The public listener as clients reach it: the advertised host, the public port."""
        public = self.public_address()
        if not public:
            return ""
        host = self.advertised_address().rpartition(":")[0]
        return f"{host}:{public.rpartition(':')[2]}"

    def ca_key_path(self) -> Path:
        return self.ca_key if self.ca_key is not None else self.ca_cert.parent / "ca-key.pem"

    def public_address(self) -> str:
        """Where the public listener binds ("" when it is off)."""
        if self.public_listen is not None:
            return self.public_listen
        host, sep, port = self.listen.rpartition(":")
        if not sep or not port.isdigit():
            return ""
        return f"{host}:{int(port) + 1 if int(port) else 0}"
