"""Model backends for agents: send a system prompt and messages, stream text, get text + Usage.

Two implementations of `MessagesBackend`:
- `AnthropicBackend`: the Messages API through `anthropic.AsyncAnthropic` (streaming). Credentials
  and endpoint come from the environment (`ANTHROPIC_API_KEY`, `ANTHROPIC_BASE_URL`); the SDK
  retries 408/409/429/5xx/529 and connection errors `TASKRUN_ANTHROPIC_MAX_RETRIES` times
  (default 2).
- `ClaudeCodeBackend`: the same request through Claude Code (claude-agent-sdk, the optional
  `taskrun-agents[claude]` extra), with no tools and one turn.

Failures become `AgentError` with a message that says what happened. `claude_session` is the
one place a Claude Code CLI process is started and, however the run ends, stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypedDict

import jsonschema
import structlog

from taskrun.core.agent import AgentError
from taskrun.core.models import ModelBackend, Usage

if TYPE_CHECKING:
    import anthropic
    from anthropic.types import MessageParam
    from claude_agent_sdk import ClaudeAgentOptions, ClaudeSDKClient

log = structlog.get_logger(__name__)

DEFAULT_MODEL = "claude-sonnet-5-5"
DEFAULT_MAX_RETRIES = 2
CLAUDE_EXTRA_HINT = "install it on the worker with: pip install 'taskrun-agents[claude]'"


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What we know about a model: context window and list prices in USD per million tokens."""

    context_window: int
    input_usd: float
    output_usd: float


# List prices (platform.claude.com model pages, November 2026). Cache reads are billed at 0.1x
# and 5-minute cache writes at 1.25x the input price. Haiku 5.5's higher rate above 100k prompt
# tokens is not modelled. Other models: TASKRUN_MODEL_PRICES (see `model_info`); a model in no
# table has cost 0 and the run says so (`cost_unknown`).
MODELS: dict[str, ModelInfo] = {
    "claude-sonnet-5-5": ModelInfo(1_000_000, 2.0, 10.0),
    "claude-opus-5-5": ModelInfo(1_000_000, 4.0, 20.0),
    "claude-haiku-5-5": ModelInfo(1_000_000, 0.10, 0.50),
    "claude-sonnet-5": ModelInfo(1_000_000, 2.0, 10.0),
    "claude-opus-5": ModelInfo(1_000_000, 5.0, 25.0),
}
CACHE_READ_FACTOR = 0.1
CACHE_WRITE_FACTOR = 1.25
PRICES_ENV = "TASKRUN_MODEL_PRICES"
PRICES_HELP = (
    f"add it on the worker: {PRICES_ENV}='MODEL=INPUT/OUTPUT' (USD per million input/output "
    f"tokens, comma-separated for several models, e.g. {PRICES_ENV}='my-model=0.5/1.5')"
)


def default_model() -> str:
    return os.environ.get("TASKRUN_ANTHROPIC_MODEL") or DEFAULT_MODEL


def configured_prices() -> dict[str, ModelInfo]:
    """TASKRUN_MODEL_PRICES: `model=input/output[,model=input/output...]`, USD per million
    tokens (context window unknown). Entries that do not parse are left out with a warning."""
    prices: dict[str, ModelInfo] = {}
    for item in os.environ.get(PRICES_ENV, "").split(","):
        if not item.strip():
            continue
        name, _, rates = item.partition("=")
        given, _, taken = rates.partition("/")
        try:
            info = ModelInfo(0, float(given), float(taken))
        except ValueError:
            log.warning("price entry left out", setting=PRICES_ENV, entry=item)
            continue
        if name.strip() and info.input_usd >= 0 and info.output_usd >= 0:
            prices[name.strip()] = info
    return prices


def model_info(model: str, table: Mapping[str, ModelInfo] = MODELS) -> ModelInfo | None:
    """The model's prices: TASKRUN_MODEL_PRICES first (an operator's own prices win), then
    `table`; None when neither knows it."""
    return configured_prices().get(model) or table.get(model)


def unknown_cost_hint(model: str) -> str:
    return f"cost unknown: model {model!r} is not in the price table; {PRICES_HELP}"


def context_window(model: str) -> int:
    """The model's context window in tokens; TASKRUN_ANTHROPIC_CONTEXT_WINDOW overrides it (a
    smaller budget for conversations, which are compacted beyond it)."""
    raw = os.environ.get("TASKRUN_ANTHROPIC_CONTEXT_WINDOW", "")
    if raw.strip().isdigit() and int(raw) > 0:
        return int(raw)
    info = MODELS.get(model)
    return info.context_window if info else 0


def model_backend(model: str, *, tools: Sequence[str] = ()) -> ModelBackend:
    return ModelBackend(
        provider="anthropic",
        model_name=model,
        context_window=context_window(model),
        modalities=("text",),
        tools=tuple(tools),
    )


def announced_backends(*, tools: Sequence[str] = ()) -> tuple[ModelBackend, ...]:
    """The ModelBackends an agent announces: the configured default first, then the known ones."""
    names = [default_model(), *(m for m in MODELS if m != default_model())]
    return tuple(model_backend(name, tools=tools) for name in names)


def cost_usd(model: str, usage: Usage, table: Mapping[str, ModelInfo] = MODELS) -> float:
    """Estimated cost from the price tables; 0.0 for models in none (see unknown_cost_hint)."""
    info = model_info(model, table)
    if info is None:
        return 0.0
    total = (
        usage.input_tokens * info.input_usd
        + usage.output_tokens * info.output_usd
        + usage.cache_read_tokens * info.input_usd * CACHE_READ_FACTOR
        + usage.cache_creation_tokens * info.input_usd * CACHE_WRITE_FACTOR
    )
    return round(total / 1_000_000, 8)


def _spent(stream: Any) -> Usage | None:
    """What a stream that broke had spent, as far as it told (message_start carries the input
    tokens, each message_delta the output so far); None when it never started."""
    if stream is None:
        return None
    try:
        snapshot = stream.current_message_snapshot
    except AssertionError:
        return None
    u = snapshot.usage
    usage = Usage(
        input_tokens=u.input_tokens or 0,
        output_tokens=u.output_tokens or 0,
        cache_read_tokens=u.cache_read_input_tokens or 0,
        cache_creation_tokens=u.cache_creation_input_tokens or 0,
        turns=1,
    )
    usage.cost_usd = cost_usd(snapshot.model, usage)
    return usage


def check_input(schema: Mapping[str, Any], data: Mapping[str, Any]) -> None:
    """Validate an agent's input against its JSON Schema; AgentError naming the field if not."""
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(schema).iter_errors(data)
    )
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "input"
        raise AgentError(f"invalid input: {where}: {error.message}")


# -- the protocol ------------------------------------------------------------------------------


class ChatMessage(TypedDict):
    role: Literal["user", "assistant"]
    content: str


TextSink = Callable[[str], Awaitable[None]]


@dataclass(slots=True)
class Completion:
    text: str
    usage: Usage
    backend: ModelBackend
    stop_reason: str = ""


class MessagesBackend(Protocol):
    """Send a system prompt + messages, stream text deltas to `on_text`, return the completion.
    `schema` is the JSON Schema the answer must match (the system prompt says so already); a
    backend whose API can constrain the answer to it does."""

    name: str

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
    ) -> Completion: ...


# -- Anthropic Messages API --------------------------------------------------------------------


def _message_param(message: ChatMessage) -> MessageParam:
    if message["role"] == "assistant":
        return {"role": "assistant", "content": message["content"]}
    return {"role": "user", "content": message["content"]}


def _max_retries_from_env() -> int:
    raw = os.environ.get("TASKRUN_ANTHROPIC_MAX_RETRIES", "")
    if not raw:
        return DEFAULT_MAX_RETRIES
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise AgentError(f"TASKRUN_ANTHROPIC_MAX_RETRIES must be a whole number >= 0, not {raw!r}")
    return value


@dataclass
class AnthropicBackend:
    """The Messages API over `anthropic.AsyncAnthropic`, streaming."""

    api_key: str | None = None  # None: the SDK's own resolution (ANTHROPIC_API_KEY, profiles)
    base_url: str | None = None  # None: ANTHROPIC_BASE_URL or the public endpoint
    max_retries: int = DEFAULT_MAX_RETRIES
    log: Any = field(default=log, repr=False)
    name: str = "anthropic"

    @classmethod
    def from_env(cls, log: Any = log) -> AnthropicBackend:
        return cls(
            api_key=os.environ.get("ANTHROPIC_API_KEY") or None,
            base_url=os.environ.get("ANTHROPIC_BASE_URL") or None,
            max_retries=_max_retries_from_env(),
            log=log,
        )

    @property
    def endpoint(self) -> str:
        return self.base_url or os.environ.get("ANTHROPIC_BASE_URL") or "https://api.anthropic.com"

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
    ) -> Completion:
        import anthropic
        import httpx2

        params = [_message_param(m) for m in messages]
        # anthropic 2.x has no `temperature` keyword (newer models reject non-default sampling);
        # it is still sent as-is for the models that accept it.
        extra_body = {"temperature": temperature} if temperature is not None else None
        opened: Any = None  # the stream, once it started: what it spent if it breaks
        try:
            async with (
                anthropic.AsyncAnthropic(
                    api_key=self.api_key, base_url=self.base_url, max_retries=self.max_retries
                ) as client,
                client.messages.stream(
                    model=model,
                    max_tokens=max_tokens,
                    system=system or anthropic.omit,
                    messages=params,
                    stop_sequences=list(stop) if stop else anthropic.omit,
                    extra_body=extra_body,
                ) as stream,
            ):
                opened = stream
                async for text in stream.text_stream:
                    if on_text is not None and text:
                        await on_text(text)
                final = await stream.get_final_message()
        except anthropic.CredentialsError as exc:
            raise AgentError(
                f"no Anthropic credentials: set ANTHROPIC_API_KEY on the worker ({exc})"
            ) from exc
        except anthropic.AnthropicError as exc:
            error = self._explain(exc)
            error.usage = _spent(opened)
            raise error from exc
        except httpx2.HTTPError as exc:  # the SDK does not wrap errors while reading a stream
            raise AgentError(
                f"the connection to the Anthropic API at {self.endpoint} broke mid-response: "
                f"{type(exc).__name__} {exc}".rstrip(),
                usage=_spent(opened),
            ) from exc
        except TypeError as exc:
            if "authentication method" in str(exc):
                raise AgentError(
                    "no Anthropic credentials: set ANTHROPIC_API_KEY on the worker"
                ) from exc
            raise
        text = "".join(b.text for b in final.content if b.type == "text")
        u = final.usage
        usage = Usage(
            input_tokens=u.input_tokens,
            output_tokens=u.output_tokens,
            cache_read_tokens=u.cache_read_input_tokens or 0,
            cache_creation_tokens=u.cache_creation_input_tokens or 0,
            turns=1,
        )
        usage.cost_usd = cost_usd(final.model, usage)
        self.log.debug(
            "model call done",
            model=final.model,
            stop_reason=final.stop_reason,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
        )
        return Completion(text, usage, model_backend(final.model), final.stop_reason or "")

    def _explain(self, exc: anthropic.AnthropicError) -> AgentError:
        """Turn an SDK exception into a message an operator can act on."""
        import anthropic

        retries = f"after {self.max_retries} retries" if self.max_retries else "(retries off)"
        if isinstance(exc, anthropic.APIStatusError):
            detail = exc.api_message or str(exc.body or exc.message)
            kind = exc.type or "error"
            if exc.status_code == 200:  # an `event: error` frame inside a started stream
                return AgentError(f"the API stream failed mid-response ({kind}): {detail}")
            if isinstance(exc, anthropic.AuthenticationError):
                return AgentError(
                    f"authentication failed: check ANTHROPIC_API_KEY (HTTP 401: {detail})"
                )
            if isinstance(exc, anthropic.PermissionDeniedError):
                return AgentError(f"permission denied (HTTP 403): {detail}")
            if isinstance(exc, anthropic.OverloadedError):
                return AgentError(f"the Anthropic API is overloaded (HTTP 529) {retries}: {detail}")
            if isinstance(exc, anthropic.RateLimitError):
                return AgentError(f"rate limited (HTTP 429) {retries}: {detail}")
            if isinstance(exc, anthropic.BadRequestError):
                return AgentError(f"invalid request (HTTP 400): {detail}")
            if isinstance(exc, anthropic.NotFoundError):
                return AgentError(f"not found (HTTP 404): {detail}")
            if exc.status_code >= 500:
                return AgentError(
                    f"the Anthropic API failed (HTTP {exc.status_code}, {kind}) {retries}: {detail}"
                )
            return AgentError(
                f"the Anthropic API refused the request (HTTP {exc.status_code}, {kind}): {detail}"
            )
        if isinstance(exc, anthropic.APITimeoutError):
            return AgentError(f"the request to {self.endpoint} timed out {retries}")
        if isinstance(exc, anthropic.APIConnectionError):
            cause = f": {exc.__cause__}" if exc.__cause__ else ""
            return AgentError(
                f"could not connect to the Anthropic API at {self.endpoint} {retries}{cause}"
            )
        return AgentError(f"Anthropic SDK error: {type(exc).__name__}: {exc}")


# -- Claude Code (claude-agent-sdk) ------------------------------------------------------------


def import_claude_sdk() -> Any:
    """The claude_agent_sdk module, or AgentError saying how to install it."""
    try:
        import claude_agent_sdk
    except ImportError as exc:
        raise AgentError(f"claude-agent-sdk is not installed; {CLAUDE_EXTRA_HINT}") from exc
    return claude_agent_sdk


def claude_options(
    *, supervise: Callable[[str], str] | None = None, **options: Any
) -> ClaudeAgentOptions:
    """ClaudeAgentOptions with the worker's defaults: `cli_path` from TASKRUN_CLAUDE_CLI_PATH
    (else the CLI bundled with the SDK, else `claude` on PATH), started through `supervise`
    (RunContext.supervised_program) so that it dies with the worker and with its lease."""
    sdk = import_claude_sdk()
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
        raise AgentError(f"Claude Code CLI not found ({exc}); {CLAUDE_EXTRA_HINT}") from exc
    except sdk.ClaudeSDKError as exc:
        raise AgentError(f"could not start Claude Code: {exc}") from exc
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


def claude_result_error(result: Any, stderr: StderrTail | None = None) -> str:
    """Why a ResultMessage with is_error=True failed, in one line."""
    status = getattr(result, "api_error_status", None)
    what = (
        "Claude Code failed"
        if result.subtype == "success"
        else f"Claude Code stopped ({result.subtype})"
    )
    if status:
        what += f" (API status {status})"
    details = [str(e) for e in (getattr(result, "errors", None) or [])]
    if result.result:
        details.append(str(result.result))
    if status == 401:
        details.append("authentication failed: check ANTHROPIC_API_KEY")
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
            raise AgentError(f"Claude Code ended without a result; stderr: {stderr.text()}")
        if result.is_error:
            raise AgentError(claude_result_error(result, stderr))
        text = "".join(text_blocks) or "".join(streamed) or (result.result or "")
        usage = usage_from_claude(result.usage)
        usage.cost_usd = float(result.total_cost_usd or 0.0)
        usage.turns = result.num_turns
        usage.duration_ms = result.duration_ms
        return Completion(text, usage, model_backend(used_model), result.stop_reason or "")


def backend_named(
    name: str, log: Any = log, supervise: Callable[[str], str] | None = None
) -> MessagesBackend:
    """`supervise` (RunContext.supervised_program) starts any child process under the worker's
    supervisor."""
    if name == "anthropic":
        return AnthropicBackend.from_env(log)
    if name == "claude_code":
        return ClaudeCodeBackend(log=log, supervise=supervise)
    raise AgentError(f"unknown backend {name!r}; use 'anthropic' or 'claude_code'")
