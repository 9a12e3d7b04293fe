"""The agent plugin interface, in core terms.

An agent is any object with a `spec` (an AgentSpec) and an async `run(ctx)`. Workers find agents
through the `taskrun.agents` entry-point group; the entry point names a class (or factory) that
takes no arguments. `run` streams text with `ctx.emit`, structured events with `ctx.event`,
returns an AgentResult, raises AgentError to fail the run with a message (saying whether the
worker or the task is at fault), and must stop promptly when its task is cancelled (asyncio
cancellation).

An agent may also have `readiness() -> Readiness`: whether it can run on this worker now
(credentials present, SDK installed, CLI found) and the models it can use. The worker calls it
at start and periodically, and announces the agent as unavailable (with the reason) when it
cannot run, so the control plane sends it no runs. Without it an agent is always ready.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from taskrun.core.ids import RunId, TaskId
from taskrun.core.models import AgentSpec, ModelBackend, RunOptions, TurnContext, Usage
from taskrun.core.status import Fault


class AgentError(Exception):
    """The agent failed in a way it can explain; the run fails with this message. `usage` is
    what the failed run spent, when the agent knows it; `session_*` as in AgentResult.

    `fault` says whose fault it is: the task's by default (its input, its schema, its limits,
    what the model or API said about its request), `Fault.WORKER` when this worker cannot run
    such tasks now (no credentials or refused ones, an SDK or CLI missing or broken, the
    provider unreachable or failing after retries). Only worker faults count towards the
    worker's quarantine: a healthy worker must not be shut out because tasks were bad."""

    def __init__(
        self,
        message: str,
        *,
        usage: Usage | None = None,
        session_id: str = "",
        session_snapshot: bytes = b"",
        session_cost_usd: float = 0.0,
        fault: Fault = Fault.TASK,
    ) -> None:
        super().__init__(message)
        self.fault = fault
        self.usage = usage
        self.session_id = session_id
        self.session_snapshot = session_snapshot
        self.session_cost_usd = session_cost_usd


@dataclass(frozen=True, slots=True)
class Readiness:
    """Whether an agent can run here now: `reason` says why not ("" when it can); `backends`
    are the models it can really use (None: those of its spec)."""

    reason: str = ""
    backends: tuple[ModelBackend, ...] | None = None


class CostLimitReached(AgentError):
    """The run spent more than its task's max_cost_usd; raised by RunContext.report_usage."""

    def __init__(self, spent: Usage, limit: float) -> None:
        super().__init__(
            f"cost limit reached: the run spent ${spent.cost_usd:.4f}, over the task's limit of "
            f"${limit:.4f} (max_cost_usd); it was stopped",
            usage=spent,
        )
        self.limit = limit


@dataclass(slots=True)
class AgentResult:
    result: Any = None  # JSON-serialisable
    usage: Usage = field(default_factory=Usage)
    backend_used: ModelBackend | None = None
    session_id: str = ""
    # A conversation's turn: the agent's session state (zlib-compressed, bounded) for the next
    # turn on any worker, and the session's running cost total (usage.cost_usd is this run's).
    session_snapshot: bytes = b""
    session_cost_usd: float = 0.0
    # Compaction done by this run (TurnContext.summarize_through): the summary it made.
    summary: str = ""
    summarized_through: int = 0


@dataclass(frozen=True, slots=True)
class SubtaskAccess:
    """The control plane's MCP server as a run whose task allows sub-tasks may use it: a bearer
    credential of this run only, which creates sub-tasks of its task and reads, waits for and
    cancels them, and dies with the run; `ca_file` is the CA the server's certificate chains to."""

    url: str
    token: str
    ca_file: Path | None = None


class RunContext(Protocol):
    task_id: TaskId
    run_id: RunId
    attempt: int
    input: dict[str, Any]
    resume_session_id: str
    prompt: str
    # Set when the task is a turn of a conversation: the earlier turns and the agent's session.
    # The turn's message is input["prompt"].
    conversation: TurnContext | None
    # Grows with every attempt of the task. Pass it to whatever the agent changes in the world,
    # and have that refuse a token lower than the highest it has seen: a run that outlived its
    # lease (a frozen or cut-off worker) can then never act after its retry did.
    fencing_token: int
    # The model the task requires (its policy's required_model, which the control plane matched
    # against this agent's backends); "" leaves the choice to the agent (its input or default).
    model: str
    # Set when the task allows sub-tasks: how the agent reaches the MCP server to create them.
    subtasks: SubtaskAccess | None
    # What the task asks beyond the input: the schema the result must match (ask the model for
    # it, re-ask up to output_retries times), model settings, and the cost limit.
    options: RunOptions

    async def report_usage(self, usage: Usage) -> None:
        """What this run has spent so far (a running total, cost included). Raises
        CostLimitReached, carrying `usage`, once the cost is over the task's max_cost_usd: let it
        propagate (stopping whatever the agent started) and the run fails with that usage kept."""
        ...

    def supervised_program(self, program: str) -> str:
        """An executable that runs `program` (given the same arguments) so that it, and every
        process it starts in its process group, is killed when the worker dies (kill -9
        included) or its lease on the run ends. Start every child process through it."""
        ...

    # this run's own working directory, created empty by the worker and removed after the run
    # (unless the worker keeps workspaces); work here rather than in the worker's directory
    @property
    def workspace(self) -> Path:
        """This run's own directory (made on first use; see above)."""
        ...

    @property
    def protected_paths(self) -> tuple[Path, ...]:
        """Directories holding the worker's state and keys: never give a tool access to them."""
        ...

    @property
    def sandbox(self) -> bool:
        """The worker's operator asked agents that can to sandbox the programs they run."""
        ...

    def working_directory(self, requested: str | None) -> Path:
        """The workspace, or `requested` (the input's `cwd`) if the worker allows it; raises
        AgentError naming `input.cwd` otherwise."""
        ...

    async def emit(self, text: str) -> None:
        """Append text to the run's output."""
        ...

    async def event(self, type: str, **data: Any) -> None:
        """Record a structured event (tool use, tool result, ...)."""
        ...


@runtime_checkable
class Agent(Protocol):
    spec: AgentSpec

    async def run(self, ctx: RunContext) -> AgentResult: ...
