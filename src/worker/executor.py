"""Execute one Run: give the agent a context, enforce the timeout, report how it ended."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import structlog

from taskrun import convert
from taskrun.core.agent import Agent, AgentError, AgentResult, CostLimitReached, SubtaskAccess
from taskrun.core.ids import RunId, TaskId
from taskrun.core.models import RunOptions, TurnContext, Usage
from taskrun.core.output_schema import schema_violations
from taskrun.core.status import Fault, RunStatus
from taskrun.core.text import utf8_size
from taskrun.core.validation import clip_error, result_over_limit
from taskrun.v1 import common_pb2 as pb
from taskrun.v1 import workers_pb2 as wpb
from taskrun.worker.outbox import Outbox
from taskrun.worker.workspace import Workspaces

log = structlog.get_logger(__name__)


@dataclass
class RunContext:
    """What an agent sees of its run (implements core.agent.RunContext)."""

    task_id: TaskId
    run_id: RunId
    attempt: int
    input: dict[str, Any]
    resume_session_id: str
    prompt: str
    outbox: Outbox
    max_chunk_bytes: int
    workspaces: Workspaces
    fencing_token: int = 0
    model: str = ""  # the task's required model; "" = the agent's choice
    supervisor: Callable[[str], str] | None = field(default=None, repr=False)
    conversation: TurnContext | None = None
    subtasks: SubtaskAccess | None = None
    options: RunOptions = field(default_factory=RunOptions)
    spent: Usage = field(default_factory=Usage)  # the newest running total the agent reported
    seq: int = 0
    _log: Any = field(default=None, repr=False)
    _workspace: Path | None = field(default=None, repr=False)

    @property
    def workspace(self) -> Path:
        """Created when first asked for: most runs of most agents never touch the disk, and a
        directory made and removed per run costs more than the echo agent's whole run."""
        if self._workspace is None:
            self._workspace = self.workspaces.open(self.run_id)
        return self._workspace

    @property
    def opened_workspace(self) -> Path | None:
        """The workspace if the run asked for one (the worker removes it after the run)."""
        return self._workspace

    def supervised_program(self, program: str) -> str:
        return self.supervisor(program) if self.supervisor is not None else program

    @property
    def protected_paths(self) -> tuple[Path, ...]:
        return self.workspaces.protected

    @property
    def sandbox(self) -> bool:
        return self.workspaces.sandbox

    def working_directory(self, requested: str | None) -> Path:
        return self.workspaces.cwd_for(requested, self.workspace)

    async def report_usage(self, usage: Usage) -> None:
        self.spent = dataclasses.replace(usage)
        limit = self.options.max_cost_usd
        if limit and usage.cost_usd > limit:
            raise CostLimitReached(self.spent, limit)

    async def _put(self, kind: pb.OutputKind, data: str) -> None:
        self.seq += 1
        chunk = pb.OutputChunk(
            run_id=self.run_id, attempt=self.attempt, seq=self.seq, kind=kind, data=data
        )
        # what it takes in a message: its UTF-8, up to 4 bytes a character (a message over the
        # server's limit would be refused, and sent again, for ever)
        await self.outbox.put(chunk, utf8_size(data) + 48)

    async def emit(self, text: str) -> None:
        limit = self.max_chunk_bytes // 4  # characters, so UTF-8 can never exceed the limit
        for start in range(0, len(text), limit):
            await self._put(pb.OUTPUT_KIND_TEXT, text[start : start + limit])

    async def event(self, type: str, **data: Any) -> None:
        text = json.dumps({"type": type, **data}, default=str)
        if len(text.encode()) > self.max_chunk_bytes:
            text = json.dumps({"type": type, "truncated": True})
        await self._put(pb.OUTPUT_KIND_EVENT, text)


@dataclass
class ActiveRun:
    assignment: wpb.RunAssignment
    ctx: RunContext
    task: asyncio.Task[None] = field(init=False)
    cancel_reason: str = ""  # set when the server cancelled it
    stop_reason: str = ""  # set when the worker stopped it itself (lease, shutdown)
    status: RunStatus = RunStatus.ASSIGNED
    worker_id: str = ""  # for the log lines about this run


def _status(
    ctx: RunContext,
    status: pb.RunStatus,
    *,
    error: str = "",
    result: AgentResult | AgentError | None = None,
    result_json: str = "",
    fault: Fault = Fault.UNKNOWN,
) -> wpb.RunStatusUpdate:
    update = wpb.RunStatusUpdate(
        run_id=ctx.run_id,
        attempt=ctx.attempt,
        status=status,
        error=clip_error(error),
        last_seq=ctx.seq,
        fault=cast(pb.RunFault, int(fault)),
    )
    convert.now_to_pb(update.time)
    if result is None and not ctx.spent.empty:
        convert.usage_to_pb(ctx.spent, update.usage)  # what a run that broke had reported
    if isinstance(result, AgentResult):
        update.result_json = result_json  # encoded (and its size checked) by `checked`
        convert.usage_to_pb(result.usage, update.usage)
        if result.backend_used is not None:
            update.backend_used.CopyFrom(convert.backend_to_pb(result.backend_used))
        update.summary, update.summarized_through = result.summary, result.summarized_through
    elif result is not None:  # what a failed run spent, as far as anyone told
        spent = result.usage
        if spent is None or spent.cost_usd < ctx.spent.cost_usd:
            spent = ctx.spent
        convert.usage_to_pb(spent, update.usage)
    if result is not None:
        update.session_id = result.session_id
        update.session_snapshot = result.session_snapshot
        update.session_cost_usd = result.session_cost_usd
    return update


def checked(ctx: RunContext, result: AgentResult) -> str:
    """What the worker itself checks of a finished run, whichever agent ran it: the cost limit
    (an agent that never reported its usage on the way), the task's output schema and the
    result's size. Returns the result as JSON text ("" for none)."""
    limit = ctx.options.max_cost_usd
    if limit and result.usage.cost_usd > limit:
        over = CostLimitReached(result.usage, limit)
        over.session_id, over.session_snapshot = result.session_id, result.session_snapshot
        over.session_cost_usd = result.session_cost_usd
        raise over
    schema = ctx.options.output_schema
    if schema is not None:
        problems = schema_violations(schema, result.result)
        if problems:
            raise AgentError(
                "the result does not match the task's output schema: " + "; ".join(problems),
                usage=result.usage,
                session_id=result.session_id,
                session_snapshot=result.session_snapshot,
                session_cost_usd=result.session_cost_usd,
            )
    text = "" if result.result is None else json.dumps(result.result, default=str)
    if too_large := result_over_limit(text):
        raise AgentError(
            too_large,
            usage=result.usage,
            session_id=result.session_id,
            session_snapshot=result.session_snapshot,
            session_cost_usd=result.session_cost_usd,
        )
    return text


async def execute(agent: Agent, active: ActiveRun) -> None:
    """Run the agent to its end and queue the outcome. Never raises (but re-raises cancel)."""
    a, ctx, outbox = active.assignment, active.ctx, active.ctx.outbox
    bound = log.bind(
        task_id=a.task_id,
        run_id=a.run_id,
        worker_id=active.worker_id,
        attempt=a.attempt,
        agent=a.agent,
    )
    active.status = RunStatus.RUNNING
    outbox.put_nowait(_status(ctx, pb.RUN_STATUS_RUNNING))
    started = time.monotonic()
    timeout = a.timeout_seconds or None
    try:
        async with asyncio.timeout(timeout):
            result = await agent.run(ctx)
        result_json = checked(ctx, result)
    except TimeoutError:
        active.status = RunStatus.FAILED
        # the task's own limit: a provider that hangs shows up in a slow run, not a fast one
        why = f"timed out after {timeout:g}s"
        outbox.put_nowait(_status(ctx, pb.RUN_STATUS_FAILED, error=why, fault=Fault.TASK))
        bound.info("run timed out", timeout_s=timeout)
    except asyncio.CancelledError:
        active.status = RunStatus.CANCELLED
        reason = active.cancel_reason or active.stop_reason or "the worker stopped the run"
        outbox.put_nowait(_status(ctx, pb.RUN_STATUS_CANCELLED, error=reason))
        if active.cancel_reason:
            outbox.put_nowait(wpb.CancelAck(run_id=a.run_id, attempt=a.attempt))
        bound.info("run cancelled", reason=reason)
        raise
    except AgentError as exc:
        active.status = RunStatus.FAILED
        update = _status(ctx, pb.RUN_STATUS_FAILED, error=str(exc), result=exc, fault=exc.fault)
        outbox.put_nowait(update)
        bound.info("run failed", error=str(exc), fault=exc.fault.name)
    except Exception as exc:  # a bug or a broken install on this worker, not the task's doing
        active.status = RunStatus.FAILED
        crashed = f"{type(exc).__name__}: {exc}"
        outbox.put_nowait(_status(ctx, pb.RUN_STATUS_FAILED, error=crashed, fault=Fault.WORKER))
        bound.exception("agent crashed")
    else:
        active.status = RunStatus.COMPLETED
        if not result.usage.duration_ms:
            result.usage.duration_ms = int((time.monotonic() - started) * 1000)
        update = _status(ctx, pb.RUN_STATUS_COMPLETED, result=result, result_json=result_json)
        outbox.put_nowait(update)
        bound.debug("run completed", chunks=ctx.seq)
