"""Starting and stopping the Claude Code CLI (claude-agent-sdk, the optional
`taskrun-agents[claude]` extra), and `ClaudeCodeBackend`, a MessagesBackend over it.

`claude_session` is the one place a Claude Code CLI process is started and, however the run ends,
stopped. `claude_options` gives every CLI the worker's defaults: the CLI found on the worker,
started under its supervisor, and TaskRun's retry limit (CLAUDE_CODE_MAX_RETRIES, from
TASKRUN_ANTHROPIC_MAX_RETRIES): left to itself the CLI retries ten times with backoff, even a 401.
Its errors are made to say what to do on a worker (`claude_result_error`, `start_error`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from taskrun.core.agent import AgentError
from taskrun.core.models import Usage
from taskrun.core.status import Fault
from taskrun.worker.agents.backends import (
    DEFAULT_MAX_RETRIES,
    ChatMessage,
    Completion,
    TextSink,
    UsageSink,
    max_retries_from_env,
    model_backend,
)

if TYPE_CHECKING:
    from claude_agent_sdk import ClaudeAgentOptions, ClaudeSDKClient

log = structlog.get_logger(__name__)

CLAUDE_EXTRA_HINT = "install it on the worker with: pip install 'taskrun-agents[claude]'"


def import_claude_sdk() -> Any:
    """The claude_agent_sdk module, or AgentError saying how to install it."""
    try:
        import claude_agent_sdk
    except ImportError as exc:
        raise AgentError(
            f"claude-agent-sdk is not installed; {CLAUDE_EXTRA_HINT}", fault=Fault.WORKER
        ) from exc
    return claude_agent_sdk


def cli_max_retries() -> int:
    """How often the CLI retries a failed API call: TASKRUN_ANTHROPIC_MAX_RETRIES (the same
    limit as the anthropic agent's), else a CLAUDE_CODE_MAX_RETRIES the worker was started
    with, else TaskRun's default (2) rather than the CLI's own 10."""
    if os.environ.get("TASKRUN_ANTHROPIC_MAX_RETRIES"):
        return max_retries_from_env()
    raw = os.environ.get("CLAUDE_CODE_MAX_RETRIES", "").strip()
    return int(raw) if raw.isdigit() else DEFAULT_MAX_RETRIES


def claude_options(
    *, supervise: Callable[[str], str] | None = None, **options: Any
) -> ClaudeAgentOptions:
    """ClaudeAgentOptions with the worker's defaults: `cli_path` from TASKRUN_CLAUDE_CLI_PATH
    (else the CLI bundled with the SDK, else `claude` on PATH), started through `supervise`
    (RunContext.supervised_program) so that it dies with the worker and with its lease, and
    TaskRun's retry limit in its environment (`cli_max_retries`)."""
    sdk = import_claude_sdk()
    options["env"] = {
        **(options.get("env") or {}),
        "CLAUDE_CODE_MAX_RETRIES": str(cli_max_retries()),
    }
    cli_path = options.get("cli_path") or os.environ.get("TASKRUN_CLAUDE_CLI_PATH")
    cli_path = cli_path or find_claude_cli(sdk)
    if cli_path:
        options["cli_path"] = supervise(cli_path) if supervise is not None else cli_path
    return sdk.ClaudeAgentOptions(**options)  # type: ignore[no-any-return]


def find_claude_cli(sdk: Any) -> str | None:
    """The CLI the SDK would run: the one bundled in its wheel, else `claude` on PATH."""
    bundled = Path(sdk.__file__).parent / "_bundled" / "claude"
    if bundled.is_file():
        return str(bundled)
    return shutil.which("claude")


@dataclass
class StderrTail:
    """Keeps the last lines the CLI wrote to stderr, for error messages."""

    lines: deque[str] = field(default_factory=lambda: deque(maxlen=20))

    def __call__(self, line: str) -> None:
        self.lines.append(line)

    def text(self) -> str:
        return " | ".join(self.lines)


def _cli_process(client: ClaudeSDKClient) -> Any:
    """The CLI subprocess behind a connected client (an anyio Process), if the SDK exposes it."""
    transport = getattr(client, "_transport", None)
    return getattr(transport, "_process", None)


async def _stop_process(process: Any, grace: float, log: Any) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; returns once the process has exited."""
    if process is None or process.returncode is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        try:
            async with asyncio.timeout(grace):
                await process.wait()
            log.info("claude code cli stopped", pid=process.pid, signal=sig.name)
            return
        except TimeoutError:
            continue


@contextlib.asynccontextmanager
async def claude_session(
    options: ClaudeAgentOptions, *, log: Any = log, grace: float = 3.0
) -> AsyncIterator[ClaudeSDKClient]:
    """A connected ClaudeSDKClient whose CLI process is gone when the block exits.

    On cancellation the turn is interrupted first (so the session file stays resumable), then
    stdin is closed; a CLI that has not exited after `grace` seconds gets SIGTERM, then SIGKILL.
    The SDK's own close does not escalate when asyncio cancels it, hence this wrapper.
    """
    sdk = import_claude_sdk()
    client: ClaudeSDKClient = sdk.ClaudeSDKClient(options=options)
    try:
        await client.connect()
    except sdk.CLINotFoundError as exc:
        raise AgentError(
            f"Claude Code CLI not found ({exc}); {CLAUDE_EXTRA_HINT}", fault=Fault.WORKER
        ) from exc
    except sdk.ClaudeSDKError as exc:
        stderr = options.stderr if isinstance(options.stderr, StderrTail) else None
        said = start_error(exc, stderr)
        # as root only bypassPermissions is refused: other tasks still run on this worker
        raise AgentError(said, fault=Fault.TASK if ROOT_REFUSAL in said else Fault.WORKER) from exc
    process = _cli_process(client)
    pid = getattr(process, "pid", None)
    log.debug("claude code cli started", pid=pid)
    interrupted = False
    try:
        yield client
    except BaseException:  # cancelled, or the caller failed mid-turn: stop the turn first
        interrupted = True
        with contextlib.suppress(Exception, TimeoutError):
            async with asyncio.timeout(min(grace, 2.0)):
                await client.interrupt()
        raise
    finally:
        try:
            async with asyncio.timeout(grace):
                await client.disconnect()
        except (Exception, TimeoutError) as exc:
            log.warning("claude code disconnect failed", pid=pid, error=repr(exc))
        await _stop_process(process, grace, log)
        log.debug("claude code cli gone", pid=pid, interrupted=interrupted)


def usage_from_claude(data: Mapping[str, Any] | None) -> Usage:
    data = data or {}
    return Usage(
        input_tokens=int(data.get("input_tokens") or 0),
        output_tokens=int(data.get("output_tokens") or 0),
        cache_read_tokens=int(data.get("cache_read_input_tokens") or 0),
        cache_creation_tokens=int(data.get("cache_creation_input_tokens") or 0),
    )


ROOT_REFUSAL = "cannot be used with root/sudo privileges"
NO_CREDENTIALS = (
    "no credentials for claude_code on this worker: set ANTHROPIC_API_KEY (or "
    "CLAUDE_CODE_OAUTH_TOKEN) in the worker's environment and restart it"
)


def start_error(exc: Exception, stderr: StderrTail | None) -> str:
    """Why the CLI did not start, from what it wrote to stderr (the SDK's exception only says
    to look there)."""
    said = stderr.text() if stderr is not None and stderr.lines else ""
    if ROOT_REFUSAL in said:
        return (
            f"could not start Claude Code: {said} (the worker runs as root: run it as another "
            "user, or give the task another permission_mode than bypassPermissions)"
        )
    if said:
        return f"could not start Claude Code: {said}"
    return f"could not start Claude Code: {exc}"


def _endpoint() -> str:
    return os.environ.get("ANTHROPIC_BASE_URL") or "https://api.anthropic.com"


WORKER_STATUSES = frozenset({401, 403, 404, 429, 529})  # and every 5xx


def claude_result_fault(result: Any) -> Fault:
    """Whose fault a ResultMessage with is_error=True is: the worker's when Claude Code could
    not use the API (no or refused credentials, the API failing, overloaded or rate limited
    after retries), else the task's (its turn or budget limit, what the model did)."""
    status = getattr(result, "api_error_status", None) or 0
    if status in WORKER_STATUSES or status >= 500:
        return Fault.WORKER
    said = "; ".join(
        [str(e) for e in (getattr(result, "errors", None) or [])] + [result.result or ""]
    )
    return Fault.WORKER if "/login" in said or "Not logged in" in said else Fault.TASK


def claude_result_error(result: Any, stderr: StderrTail | None = None) -> str:
    """Why a ResultMessage with is_error=True failed, in one line an operator can act on."""
    status = getattr(result, "api_error_status", None)
    details = [str(e) for e in (getattr(result, "errors", None) or [])]
    if result.result:
        details.append(str(result.result))
    said = "; ".join(details)
    if "/login" in said or "Not logged in" in said:
        return f"{NO_CREDENTIALS} (Claude Code said: {said})"
    if status == 401:
        return (
            f"authentication failed: check ANTHROPIC_API_KEY (HTTP 401 from {_endpoint()}, "
            f"after {cli_max_retries()} retries; Claude Code said: {said})"
        )
    what = (
        "Claude Code failed"
        if result.subtype == "success"
        else f"Claude Code stopped ({result.subtype})"
    )
    if status:
        what += f" (API status {status}, after {cli_max_retries()} retries)"
    if stderr is not None and stderr.lines:
        details.append(f"stderr: {stderr.text()}")
    return f"{what}: {'; '.join(details)}" if details else what


def _flatten(messages: Sequence[ChatMessage]) -> str:
    """One prompt for Claude Code from a conversation: earlier turns as a transcript."""
    if len(messages) == 1:
        return messages[0]["content"]
    earlier = "\n\n".join(f"<{m['role']}>\n{m['content']}\n</{m['role']}>" for m in messages[:-1])
    return f"The conversation so far:\n\n{earlier}\n\n{messages[-1]['content']}"


@dataclass
class ClaudeCodeBackend:
    """One tool-less turn through Claude Code; text deltas stream via partial messages."""

    log: Any = field(default=log, repr=False)
    name: str = "claude_code"
    supervise: Callable[[str], str] | None = field(default=None, repr=False)

    async def complete(
        self,
        *,
        system: str,
        messages: Sequence[ChatMessage],
        model: str,
        max_tokens: int,
        temperature: float | None = None,
        stop: Sequence[str] = (),
        schema: Mapping[str, Any] | None = None,
        on_text: TextSink | None = None,
        on_usage: UsageSink | None = None,  # told only at the end, by the result
    ) -> Completion:
        if temperature is not None:
            raise AgentError("the claude_code backend does not support temperature")
        if stop:
            raise AgentError("the claude_code backend does not support stop sequences")
        sdk = import_claude_sdk()
        stderr = StderrTail()
        options = claude_options(
            system_prompt=system or None,
            model=model,
            max_turns=1,
            tools=[],
            setting_sources=[],
            include_partial_messages=True,
            stderr=stderr,
            env={"CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(max_tokens)},
            supervise=self.supervise,
        )
        streamed: list[str] = []
        text_blocks: list[str] = []
        used_model = model
        result = None
        async with claude_session(options, log=self.log) as client:
            await client.query(_flatten(messages))
            async for message in client.receive_response():
                if isinstance(message, sdk.StreamEvent) and message.parent_tool_use_id is None:
                    delta = message.event.get("delta") or {}
                    if (
                        message.event.get("type") == "content_block_delta"
                        and delta.get("type") == "text_delta"
                    ):
                        streamed.append(delta.get("text", ""))
                        if on_text is not None:
                            await on_text(delta.get("text", ""))
                elif isinstance(message, sdk.AssistantMessage):
                    used_model = message.model or used_model
                    text_blocks += [b.text for b in message.content if isinstance(b, sdk.TextBlock)]
                elif isinstance(message, sdk.ResultMessage):
                    result = message
        if result is None:
            raise AgentError(
                f"Claude Code ended without a result; stderr: {stderr.text()}", fault=Fault.WORKER
            )
        if result.is_error:
            raise AgentError(claude_result_error(result, stderr), fault=claude_result_fault(result))
        text = "".join(text_blocks) or "".join(streamed) or (result.result or "")
        usage = usage_from_claude(result.usage)
        usage.cost_usd = float(result.total_cost_usd or 0.0)
        usage.turns = result.num_turns
        usage.duration_ms = result.duration_ms
        return Completion(text, usage, model_backend(used_model), result.stop_reason or "")


# -- readiness: can this worker run Claude Code now? ---------------------------------------------

CLAUDE_CREDENTIAL_VARIABLES = (
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "CLAUDE_CODE_OAUTH_TOKEN",
    "CLAUDE_CODE_USE_BEDROCK",
    "CLAUDE_CODE_USE_VERTEX",
)


def claude_code_missing() -> str:
    """Why Claude Code cannot run here ("" when it can): the SDK, its CLI, credentials (a key
    or token in the environment, Bedrock/Vertex, or a `claude login` in the worker's HOME)."""
    import importlib.util

    if importlib.util.find_spec("claude_agent_sdk") is None:
        return f"claude-agent-sdk is not installed; {CLAUDE_EXTRA_HINT}"
    configured = os.environ.get("TASKRUN_CLAUDE_CLI_PATH")
    if configured:
        if not os.access(configured, os.X_OK):
            return f"TASKRUN_CLAUDE_CLI_PATH={configured} is not an executable file"
    elif find_claude_cli(import_claude_sdk()) is None:
        return (
            f"the Claude Code CLI was not found (neither bundled nor on PATH); {CLAUDE_EXTRA_HINT}"
        )
    if any(os.environ.get(name) for name in CLAUDE_CREDENTIAL_VARIABLES):
        return ""
    if (Path.home() / ".claude" / ".credentials.json").is_file():
        return ""
    return (
        "no credentials for Claude Code: set ANTHROPIC_API_KEY in the worker's environment "
        "(or log in with `claude` as the worker's user)"
    )
