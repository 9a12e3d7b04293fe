"""The `claude_code` agent: a Claude Code session (claude-agent-sdk) on the worker's machine.

Needs the optional extra `taskrun-agents[claude]` (the SDK bundles the Claude Code CLI; it is
imported when the worker starts). Text streams as it is produced (partial messages); tool use
and tool results become events; the result carries session id, model, cost, usage, turns and
duration.
Sessions live under the worker's $HOME/.claude/projects/<cwd-slug>/<session-id>.jsonl. As a turn of
a conversation (`ctx.conversation`) it resumes the conversation's session: from the snapshot the
control plane sent (written over any local copy, so every worker continues from the same state),
else from the worker's own copy, else it starts a new session with the transcript as a preamble.
At the end of a turn it sends the session file back (zlib-compressed, at most
MAX_SESSION_SNAPSHOT_BYTES) for the next turn on any worker. Claude Code reports the session's
running cost total; a turn's cost is that total minus the total before the turn. Cancelling the
run interrupts the session and stops the CLI process (see `backends.claude_session`).
The task's cost limit is also the CLI's own budget, so the CLI stops itself at it however late
the worker reads; a session the worker stops is read to its end first, so the calls the CLI made
ahead of the worker are in the run's usage.

Environment: ANTHROPIC_API_KEY / ANTHROPIC_BASE_URL (read by the CLI), TASKRUN_ANTHROPIC_MODEL
(default model), TASKRUN_CLAUDE_CLI_PATH (use this CLI instead of the bundled one). The CLI and
its tools see TASKRUN_TASK_ID, TASKRUN_RUN_ID, TASKRUN_ATTEMPT and TASKRUN_FENCING_TOKEN. The CLI
runs under the worker's supervisor: it dies with the worker and when the worker's lease ends.

Why one module: the agent's run reads one message stream whose handlers share its state (text
streamed, calls counted, the session); the session files (restore, capture, preambles) are its
own helpers. Starting and stopping the CLI already lives in claude_cli.py; the session-file
helpers could move to a module of their own next.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import re
import zlib
from pathlib import Path
from typing import Any, NoReturn

import structlog

from taskrun.core.agent import (
    AgentError,
    AgentResult,
    CostLimitReached,
    Readiness,
    RunContext,
    SubtaskAccess,
)
from taskrun.core.models import (
    MAX_SESSION_SNAPSHOT_BYTES,
    AgentSpec,
    TranscriptMessage,
    TurnContext,
    Usage,
)
from taskrun.core.output_schema import exhausted, feedback, instructions, parse_reply
from taskrun.core.status import Fault
from taskrun.worker.agents.backends import (
    announced_backends,
    check_input,
    choose_model,
    cost_usd,
    model_backend,
    unknown_cost_hint,
)
from taskrun.worker.agents.claude_cli import (
    CLAUDE_EXTRA_HINT,
    StderrTail,
    claude_code_missing,
    claude_options,
    claude_result_error,
    claude_result_fault,
    claude_session,
    import_claude_sdk,
    usage_from_claude,
)

log = structlog.get_logger(__name__)

TOOLS = ("Read", "Write", "Edit", "Bash", "Glob", "Grep", "WebFetch", "WebSearch")
PERMISSION_MODES = ["default", "acceptEdits", "plan", "bypassPermissions", "dontAsk", "auto"]
MAX_EVENT_TEXT = 4000  # characters of a tool result kept in its event
# How long a session over its cost limit gets to stop and hand over what it spent
DRAIN_TIMEOUT = 5.0
BUDGET_STOP = "error_max_budget_usd"  # a result's subtype: the CLI reached max_budget_usd

INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "prompt": {"type": "string", "minLength": 1, "description": "the first user message"},
        "cwd": {"type": "string", "description": "working directory on the worker"},
        "allowed_tools": {"type": "array", "items": {"type": "string"}},
        "disallowed_tools": {"type": "array", "items": {"type": "string"}},
        "permission_mode": {"enum": PERMISSION_MODES},
        "model": {"type": "string", "minLength": 1},
        "max_turns": {"type": "integer", "minimum": 1, "maximum": 1000},
        "max_budget_usd": {"type": "number", "exclusiveMinimum": 0},
        "fail_on_refused_tools": {
            "type": "boolean",
            "description": "fail the run when the permission mode refused a tool call",
        },
    },
    "required": ["prompt"],
    "additionalProperties": False,
}


def session_settings(ctx: RunContext, inp: dict[str, Any]) -> dict[str, Any]:
    """ClaudeAgentOptions from the task's model settings and output schema (and the input's
    tool lists where the settings give none; disallowed tools add up). Temperature and stop
    sequences are refused: Claude Code sets its own."""
    settings = ctx.options.model_settings
    if settings.temperature is not None:
        raise AgentError(
            "claude_code does not take a temperature (policy.model_settings.temperature): "
            "Claude Code sets its own"
        )
    if settings.stop_sequences:
        raise AgentError(
            "claude_code does not take stop sequences (policy.model_settings.stop_sequences)"
        )
    schema = ctx.options.output_schema
    append = "\n\n".join(
        text for text in (settings.append_system_prompt, schema and instructions(schema)) if text
    )
    system: Any = None
    if settings.system_prompt:
        system = f"{settings.system_prompt}\n\n{append}" if append else settings.system_prompt
    elif append:
        system = {"type": "preset", "preset": "claude_code", "append": append}
    env = {**settings.env, **run_environment(ctx)}
    if settings.max_tokens:
        env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] = str(settings.max_tokens)
    disallowed = [*inp.get("disallowed_tools", []), *settings.disallowed_tools]
    return {
        "system_prompt": system,
        "env": env,
        "mcp_servers": json.loads(settings.mcp_servers) if settings.mcp_servers else {},
        "allowed_tools": list(settings.allowed_tools or inp.get("allowed_tools", [])),
        "disallowed_tools": list(dict.fromkeys(disallowed)),
    }


def run_environment(ctx: RunContext) -> dict[str, str]:
    """What the CLI and the tools it runs learn about their run: the fencing token above all,
    for a tool that changes the world to refuse a stale attempt."""
    return {
        "TASKRUN_TASK_ID": ctx.task_id,
        "TASKRUN_RUN_ID": ctx.run_id,
        "TASKRUN_ATTEMPT": str(ctx.attempt),
        "TASKRUN_FENCING_TOKEN": str(ctx.fencing_token),
    }


MCP_SERVER = "taskrun"  # its tools reach the model as mcp__taskrun__<tool>


def with_taskrun_mcp(options: Any, access: SubtaskAccess | None) -> None:
    """A task that allows sub-tasks: give the CLI the control plane's MCP server (streamable
    HTTP, this run's own credential as bearer), allow its tools, and have Node trust the CA the
    server's certificate chains to."""
    if access is None:
        return
    servers = options.mcp_servers if isinstance(options.mcp_servers, dict) else {}
    options.mcp_servers = {
        **servers,
        MCP_SERVER: {
            "type": "http",
            "url": access.url,
            "headers": {"Authorization": f"Bearer {access.token}"},
        },
    }
    options.allowed_tools = [*options.allowed_tools, f"mcp__{MCP_SERVER}"]
    if access.ca_file is not None:
        options.env = {**options.env, "NODE_EXTRA_CA_CERTS": str(access.ca_file.resolve())}


def _text_of(content: Any) -> str:
    """A tool result's content (string or content blocks) as bounded text."""
    if content is None:
        return ""
    if isinstance(content, str):
        text = content
    else:
        text = "\n".join(
            b.get("text", "") if isinstance(b, dict) and b.get("type") == "text" else json.dumps(b)
            for b in content
        )
    return text if len(text) <= MAX_EVENT_TEXT else text[:MAX_EVENT_TEXT] + "…"


def session_file(session_id: str, cwd: str | None) -> Path:
    """Where the CLI keeps a session started in `cwd`: $HOME/.claude/projects/<slug>/<id>.jsonl,
    the slug being the absolute cwd with every character but letters and digits as '-'."""
    where = str((Path(cwd) if cwd else Path.cwd()).resolve())
    return (
        Path.home()
        / ".claude"
        / "projects"
        / re.sub(r"[^A-Za-z0-9]", "-", where)
        / (f"{session_id}.jsonl")
    )


def find_session(session_id: str) -> Path | None:
    """The worker's own copy of a session, in whichever project folder the CLI put it."""
    if not re.fullmatch(r"[A-Za-z0-9-]{1,100}", session_id):
        return None
    found = sorted((Path.home() / ".claude" / "projects").glob(f"*/{session_id}.jsonl"))
    return found[0] if found else None


def restore_session(session_id: str, cwd: str | None, snapshot: bytes) -> None:
    """Write the snapshot the control plane sent where the CLI will look for the session."""
    path = session_file(session_id, cwd)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(zlib.decompress(snapshot))
    tmp.replace(path)


def capture_session(session_id: str) -> bytes:
    """The session file, compressed, for the control plane; empty when missing or too big."""
    path = find_session(session_id) if session_id else None
    if path is None:
        return b""
    data = zlib.compress(path.read_bytes(), 6)
    return data if len(data) <= MAX_SESSION_SNAPSHOT_BYTES else b""


def preamble(history: TurnContext) -> str:
    """The transcript as the start of a prompt, for a session that could not be resumed."""
    lines = ["(Our conversation so far, as the control plane recorded it:)"]
    for message in history.history:
        lines.append(f"{message.role.upper()}: {message.text}")
    lines.append("(The new message follows.)\n")
    return "\n\n".join(lines)


def missed_preamble(missed: tuple[TranscriptMessage, ...]) -> str:
    """Turns the resumed session lacks (a cancelled turn's message), told before the new one."""
    if not missed:
        return ""
    lines = ["(Messages of our conversation that are not in this session:)"]
    lines.extend(f"{m.role.upper()}: {m.text}" for m in missed)
    lines.append("(The new message follows.)\n")
    return "\n\n".join(lines)


class ClaudeCodeAgent:
    """Runs Claude Code with the given prompt, tools and limits; resumes its session per turn."""

    def __init__(self) -> None:
        if importlib.util.find_spec("claude_agent_sdk") is None:
            log.warning(
                "claude_code runs will fail: claude-agent-sdk is not installed; "
                + CLAUDE_EXTRA_HINT
            )
        else:
            import_claude_sdk()  # about a second: paid when the worker starts, not by a run
        self.spec = AgentSpec(
            name="claude_code",
            description="A Claude Code session (claude-agent-sdk): prompt, cwd, allowed/"
            "disallowed tools, permission mode, model, max turns, budget; a conversation's "
            "turns resume its session on any worker.",
            backends=announced_backends(tools=TOOLS),
            input_schema=json.dumps(INPUT_SCHEMA),
            supports_sessions=True,
        )

    def readiness(self) -> Readiness:
        return Readiness(claude_code_missing(), announced_backends(tools=TOOLS))

    async def run(self, ctx: RunContext) -> AgentResult:
        check_input(INPUT_SCHEMA, ctx.input)
        sdk = import_claude_sdk()
        inp = ctx.input
        model = choose_model(ctx.model, inp.get("model"))
        # the run's own workspace, or an input cwd the worker allows (input.cwd)
        cwd = str(await asyncio.to_thread(ctx.working_directory, inp.get("cwd")))
        bound = log.bind(task_id=ctx.task_id, run_id=ctx.run_id, agent="claude_code")
        turn = ctx.conversation
        cost_before = 0.0  # the session's running cost total before this run
        if turn is not None:
            resume, prompt = await self._continue(turn, cwd, inp["prompt"], bound)
            cost_before = turn.session_cost_usd if resume else 0.0
        else:  # a direct resume (tests, tools): the new message is ctx.prompt
            resume = ctx.resume_session_id or None
            prompt = ctx.prompt if resume else inp["prompt"]
        if not prompt:
            raise AgentError("a follow-up needs a prompt (the new user message)")
        schema = ctx.options.output_schema
        # The task's cost limit becomes Claude Code's own budget too: the CLI checks it after
        # every call, however far behind the worker is in reading them. It counts what this
        # process spent, not the resumed session's earlier turns: a run's own cost.
        limit = ctx.options.max_cost_usd
        budget, ours = inp.get("max_budget_usd"), False
        if limit and (budget is None or limit <= budget):
            budget, ours = limit, True
        stderr = StderrTail()
        options = claude_options(
            cwd=cwd,
            **session_settings(ctx, inp),
            permission_mode=inp.get("permission_mode"),
            model=model,
            max_turns=inp.get("max_turns"),
            max_budget_usd=budget,
            resume=resume,
            include_partial_messages=True,
            stderr=stderr,
            supervise=ctx.supervised_program,
            **kept_away_from(ctx.protected_paths, sandbox=ctx.sandbox),
        )
        with_taskrun_mcp(options, ctx.subtasks)
        bound.info("starting claude code", resume=resume, cwd=cwd)
        session_id = resume or ""
        tools: list[str] = []
        streamed_ids: set[str] = set()  # messages whose text already went out as deltas
        current_id = ""  # the message the last emitted text belongs to
        stream_id = ""  # the message being streamed
        emitted_any = False
        ends_with_newline = True
        # each API call's cost as the session goes, by message id (the CLI repeats a message's
        # usage on every block of it): the worker stops the run once it is over its limit
        calls: dict[str, Usage] = {}
        results: list[Any] = []  # one ResultMessage per query (a re-ask is another)
        failed: dict[str, str] = {}  # tool results that were errors, by tool use id

        async def emit(text: str, message_id: str) -> None:
            nonlocal emitted_any, ends_with_newline, current_id
            if not text:
                return
            if emitted_any and message_id != current_id and not ends_with_newline:
                await ctx.emit("\n")
            current_id = message_id
            await ctx.emit(text)
            emitted_any, ends_with_newline = True, text.endswith("\n")

        def so_far() -> Usage:
            usage = Usage()
            for each in calls.values():
                usage.add(each)
            return usage

        def tally(message: Any) -> Usage:
            """The session's usage so far, with `message`'s API call counted."""
            if message.usage:
                call = usage_from_claude(message.usage)
                call.cost_usd = cost_usd(message.model or model, call)
                calls[message.message_id or str(len(calls))] = call
            return so_far()

        async def spent(message: Any) -> None:
            if message.usage:
                await ctx.report_usage(tally(message))

        async def over_limit(client: Any, messages: Any, over: CostLimitReached) -> NoReturn:
            """Stop the turn, then read what the CLI sent meanwhile: it does not wait for the
            worker to read its messages, so on a busy worker its calls run ahead of the one
            that crossed the limit, and each is billed. The run's usage counts them all."""
            usage, total = so_far(), None
            # The interrupt's answer comes behind the messages already on their way, which the
            # SDK hands over only as they are read: read them while it is asked.
            interrupting = asyncio.ensure_future(client.interrupt())
            try:
                with contextlib.suppress(Exception, TimeoutError):  # the limit stands anyway
                    async with asyncio.timeout(DRAIN_TIMEOUT):
                        async for message in messages:
                            if isinstance(message, sdk.AssistantMessage):
                                usage = tally(message)
                            elif isinstance(message, sdk.ResultMessage):
                                total = message.total_cost_usd
                                usage = _at_least(usage, usage_from_claude(message.usage))
                                break
            finally:
                interrupting.cancel()  # if the CLI never answered it
                await asyncio.wait([interrupting])
                if not interrupting.cancelled():
                    interrupting.exception()  # retrieved: a failed interrupt changes nothing
            if total is not None:
                usage.cost_usd = max(usage.cost_usd, float(total) - cost_before)
            bound.info(
                "claude code stopped at the cost limit",
                cost_usd=usage.cost_usd,
                session_cost_usd=total,
            )
            stopped = CostLimitReached(usage, over.limit)
            stopped.session_id = session_id
            # the running total the next turn counts from (estimated without the result)
            stopped.session_cost_usd = (
                float(total) if total is not None else cost_before + usage.cost_usd
            )
            raise stopped from None

        async def receive(client: Any) -> Any:
            messages = client.receive_response()
            try:
                return await read(messages)
            except CostLimitReached as over:
                await over_limit(client, messages, over)

        async def read(messages: Any) -> Any:
            nonlocal session_id, model, tools, stream_id
            async for message in messages:
                if isinstance(message, sdk.StreamEvent):
                    if message.parent_tool_use_id is not None:
                        continue  # a subagent's stream
                    event = message.event
                    if event.get("type") == "message_start":
                        stream_id = event.get("message", {}).get("id", "")
                        streamed_ids.add(stream_id)
                    elif event.get("type") == "content_block_delta":
                        delta = event.get("delta") or {}
                        if delta.get("type") == "text_delta":
                            await emit(delta.get("text", ""), stream_id)
                elif isinstance(message, sdk.SystemMessage) and message.subtype == "init":
                    session_id = message.data.get("session_id", session_id)
                    model = message.data.get("model", model)
                    tools = list(message.data.get("tools", []))
                    await ctx.event(
                        "session",
                        session_id=session_id,
                        model=model,
                        resumed=bool(resume),
                        mcp_servers=message.data.get("mcp_servers", []),
                    )
                elif isinstance(message, sdk.AssistantMessage):
                    model = message.model or model
                    if message.error:
                        await ctx.event("error", error=str(message.error))
                    for block in message.content:
                        if isinstance(block, sdk.TextBlock) and message.parent_tool_use_id is None:
                            if (message.message_id or "") not in streamed_ids:
                                await emit(block.text, message.message_id or "")
                        elif isinstance(block, sdk.ToolUseBlock):
                            await ctx.event(
                                "tool_use", id=block.id, name=block.name, input=block.input
                            )
                        elif isinstance(block, sdk.ToolResultBlock):
                            await self._tool_result(ctx, block, failed)
                    await spent(message)
                elif isinstance(message, sdk.UserMessage) and isinstance(message.content, list):
                    for block in message.content:
                        if isinstance(block, sdk.ToolResultBlock):
                            await self._tool_result(ctx, block, failed)
                elif isinstance(message, sdk.ResultMessage):
                    results.append(message)
                    return message
            return None

        value: Any = None
        problems: list[str] = []
        try:
            async with claude_session(options, log=bound) as client:
                await client.query(prompt)
                result = await receive(client)
                attempt = 1
                # with an output schema, the session is asked again with what did not validate
                while schema is not None and result is not None and not result.is_error:
                    value, problems = parse_reply(result.result or "", schema)
                    await ctx.event(
                        "output_attempt",
                        attempt=attempt,
                        valid=not problems,
                        errors=problems,
                        reply=(result.result or "")[:500],
                    )
                    if not problems or attempt > ctx.options.output_retries:
                        break
                    bound.info("reply did not match the output schema", attempt=attempt)
                    attempt += 1
                    await client.query(feedback(problems))
                    result = await receive(client)
        except CostLimitReached as stopped:
            if turn and stopped.session_id:  # the next turn resumes what this one did
                stopped.session_snapshot = await asyncio.to_thread(
                    capture_session, stopped.session_id
                )
            raise
        if result is None:
            raise AgentError(
                f"Claude Code ended without a result; stderr: {stderr.text()}", fault=Fault.WORKER
            )
        session_id = result.session_id or session_id
        total_cost = float(result.total_cost_usd or 0.0)  # the session's running total
        usage = Usage()
        for each in results:  # tokens: this run's own, over its queries
            usage.add(usage_from_claude(each.usage))
            usage.turns += each.num_turns
            usage.duration_ms += each.duration_ms
        usage.cost_usd = max(0.0, total_cost - cost_before)
        snapshot = await asyncio.to_thread(capture_session, session_id) if turn else b""
        refused = await self._refused(ctx, results, inp.get("permission_mode"), failed)
        failure, fault = "", Fault.TASK
        if result.is_error and result.subtype == BUDGET_STOP and ours and limit:
            over = CostLimitReached(usage, limit)
            over.session_id, over.session_snapshot = session_id, snapshot
            over.session_cost_usd = total_cost
            raise over
        if result.is_error:
            failure, fault = claude_result_error(result, stderr), claude_result_fault(result)
        elif problems:
            failure = exhausted(attempt, problems)
        elif refused and inp.get("fail_on_refused_tools"):
            failure = refused[0]
        if failure:
            bound.info("claude code failed", subtype=result.subtype, session_id=session_id)
            raise AgentError(
                failure,
                usage=usage,
                session_id=session_id,
                session_snapshot=snapshot,
                session_cost_usd=total_cost,
                fault=fault,
            )
        warnings = [*refused]
        if not total_cost and (usage.input_tokens or usage.output_tokens):
            hint = unknown_cost_hint(model)
            await ctx.event("cost_unknown", model=model, hint=hint)
            warnings.append(hint)
        bound.info(
            "claude code done",
            session_id=session_id,
            turns=usage.turns,
            cost_usd=usage.cost_usd,
        )
        plain: dict[str, Any] = {
            "text": result.result or "",
            "session_id": session_id,
            "model": model,
            "stop_reason": result.stop_reason or "",
            "turns": usage.turns,
            "duration_ms": usage.duration_ms,
            "cost_usd": usage.cost_usd,
        }
        if warnings:
            plain["warnings"] = warnings
        return AgentResult(
            result=value if schema is not None else plain,
            usage=usage,
            backend_used=model_backend(model, tools=tools),
            session_id=session_id,
            session_snapshot=snapshot,
            session_cost_usd=total_cost,
        )

    @staticmethod
    async def _refused(
        ctx: RunContext, results: list[Any], mode: str | None, failed: dict[str, str]
    ) -> list[str]:
        """Tool calls the permission mode refused: a `tool_refused` event each, and one warning
        naming them (a run that could not do what it was asked must not look clean)."""
        denials = [d for r in results for d in (getattr(r, "permission_denials", None) or [])]
        names: list[str] = []
        for denial in denials:
            item = denial if isinstance(denial, dict) else vars(denial)
            name = str(item.get("tool_name") or item.get("name") or "?")
            names.append(name)
            await ctx.event(
                "tool_refused",
                name=name,
                tool_use_id=item.get("tool_use_id", ""),
                input=item.get("tool_input", {}),
                permission_mode=mode or "default",
                reason=failed.get(str(item.get("tool_use_id", "")), ""),
            )
        if not names:
            return []
        return [
            f"{len(names)} tool call{'s' if len(names) > 1 else ''} refused by permission mode "
            f"{mode or 'default'}: {', '.join(dict.fromkeys(names))} (allow them with "
            "allowed_tools, --allowed-tool, or another permission_mode)"
        ]

    @staticmethod
    async def _continue(
        turn: TurnContext, cwd: str | None, message: str, bound: Any
    ) -> tuple[str | None, str]:
        """(session to resume, prompt) for a conversation's turn; see the module docstring."""
        session_id = turn.session_id
        # turns after the one that left the session as it is (a cancelled one): it lacks them
        missed = tuple(m for m in turn.history if m.turn > turn.session_turn)
        resumed = missed_preamble(missed) + message
        if session_id and turn.session_snapshot:
            try:
                await asyncio.to_thread(restore_session, session_id, cwd, turn.session_snapshot)
                bound.info("session restored from the control plane", session_id=session_id)
                return session_id, resumed
            except (OSError, zlib.error) as exc:
                bound.warning("could not restore the session", error=str(exc))
        kept: Path | None = (
            await asyncio.to_thread(find_session, session_id) if session_id else None
        )
        if kept is not None and not turn.session_snapshot:
            bound.info("resuming the session kept on this worker", session_id=session_id)
            return session_id, resumed
        if turn.history:
            bound.info("session not available; continuing from the transcript", turns=turn.turn)
            return None, preamble(turn) + message
        return None, message

    @staticmethod
    async def _tool_result(ctx: RunContext, block: Any, failed: dict[str, str]) -> None:
        content = _text_of(block.content)
        if block.is_error:
            failed[block.tool_use_id] = content
        await ctx.event(
            "tool_result",
            tool_use_id=block.tool_use_id,
            is_error=bool(block.is_error),
            content=content,
        )


def _at_least(usage: Usage, reported: Usage) -> Usage:
    """`usage` with each token count raised to at least what `reported` says."""
    return dataclasses.replace(
        usage,
        input_tokens=max(usage.input_tokens, reported.input_tokens),
        output_tokens=max(usage.output_tokens, reported.output_tokens),
        cache_read_tokens=max(usage.cache_read_tokens, reported.cache_read_tokens),
        cache_creation_tokens=max(usage.cache_creation_tokens, reported.cache_creation_tokens),
    )


def kept_away_from(protected: tuple[Path, ...], *, sandbox: bool) -> dict[str, Any]:
    """Options that deny Claude Code's file tools the worker's state and key directories
    (permission deny rules: Read covers Read, Grep and Glob; Edit covers Write and Edit), and,
    when asked, run its Bash commands in Claude Code's sandbox (bubblewrap on Linux), where the
    same deny rules bind the commands too and nothing may run unsandboxed."""
    deny = [f"{tool}(/{path}/**)" for path in protected for tool in ("Read", "Edit")]
    options: dict[str, Any] = {"settings": json.dumps({"permissions": {"deny": deny}})}
    if sandbox:
        options["sandbox"] = {
            "enabled": True,
            "autoAllowBashIfSandboxed": True,
            "allowUnsandboxedCommands": False,
        }
    return options
