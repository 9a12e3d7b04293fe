"""Model backends for agents: send a system prompt and messages, stream text, get text + Usage.

Two implementations of `MessagesBackend`:
- `AnthropicBackend`: the Messages API through `anthropic.AsyncAnthropic` (streaming). Credentials
  and endpoint come from the environment (`ANTHROPIC_API_KEY`, `ANTHROPIC_BASE_URL`); the SDK
  retries 408/409/429/5xx/529 and connection errors `TASKRUN_ANTHROPIC_MAX_RETRIES` times
  (default 2).
- `ClaudeCodeBackend` (in `claude_cli.py`, with everything else that starts the Claude Code CLI):
  the same request through Claude Code, with no tools and one turn.
- `OpenAIBackend` (in `openai_api.py`): OpenAI-compatible chat completions.

Failures become `AgentError` with a message that says what happened and whose fault it is (the
worker's: credentials, the provider unreachable or failing; or the task's request).
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypedDict

import jsonschema
import structlog

from taskrun.core.agent import AgentError
from taskrun.core.models import ModelBackend, Usage
from taskrun.core.status import Fault
from taskrun.worker.agents.clients import http_reply, rehearse, sdk_client

if TYPE_CHECKING:
    import anthropic
    from anthropic.types import MessageParam

log = structlog.get_logger(__name__)

DEFAULT_MODEL = "claude-sonnet-5-5"
DEFAULT_MAX_RETRIES = 2


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


def configured_models() -> list[str]:
    """The models this worker's Anthropic-backed agents announce and accept: TASKRUN_ANTHROPIC_
    MODELS (comma-separated; `taskrun worker run --models` sets it), else the default model."""
    listed = os.environ.get("TASKRUN_ANTHROPIC_MODELS", "")
    models = list(dict.fromkeys(m.strip() for m in listed.split(",") if m.strip()))
    return models or [os.environ.get("TASKRUN_ANTHROPIC_MODEL") or DEFAULT_MODEL]


def default_model() -> str:
    """TASKRUN_ANTHROPIC_MODEL, else the first configured model, else claude-sonnet-5-5."""
    return os.environ.get("TASKRUN_ANTHROPIC_MODEL") or configured_models()[0]


def choose_model(required: str, requested: object) -> str:
    """The model a run uses: the one its task requires (the control plane matched it against
    what this worker announced), else the input's `model`, else the default."""
    if required:
        return required
    return requested if isinstance(requested, str) and requested else default_model()


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
    """The ModelBackends an agent announces: the configured models, the default first (not
    every model of the price table: a task requiring a model must get a worker that has it)."""
    first = default_model()
    names = [first, *(m for m in configured_models() if m != first)]
    return tuple(model_backend(name, tools=tools) for name in names)


# -- readiness: can this worker run the agent now? ----------------------------------------------


def anthropic_api_missing() -> str:
    """Why the Messages API cannot be called from here ("" when it can)."""
    import importlib.util

    if importlib.util.find_spec("anthropic") is None:
        return "the anthropic SDK is not installed on the worker (pip install anthropic)"
    if not (os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("ANTHROPIC_AUTH_TOKEN")):
        return "no Anthropic credentials: set ANTHROPIC_API_KEY in the worker's environment"
    return ""


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
# Told what a call has spent so far, while it runs (the input tokens once the stream started): a
# run cancelled or stopped mid-call still counts them.
UsageSink = Callable[[Usage], Awaitable[None]]


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
        on_usage: UsageSink | None = None,
    ) -> Completion: ...


# -- Anthropic Messages API --------------------------------------------------------------------


def _message_param(message: ChatMessage) -> MessageParam:
    if message["role"] == "assistant":
        return {"role": "assistant", "content": message["content"]}
    return {"role": "user", "content": message["content"]}


def max_retries_from_env() -> int:
    raw = os.environ.get("TASKRUN_ANTHROPIC_MAX_RETRIES", "")
    if not raw:
        return DEFAULT_MAX_RETRIES
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise AgentError(
            f"TASKRUN_ANTHROPIC_MAX_RETRIES must be a whole number >= 0, not {raw!r}",
            fault=Fault.WORKER,
        )
    return value


@dataclass
class AnthropicBackend:
    """The Messages API over `anthropic.AsyncAnthropic`, streaming."""

    api_key: str | None = None  # None: the SDK's own resolution (ANTHROPIC_API_KEY, profiles)
    base_url: str | None = None  # None: ANTHROPIC_BASE_URL or the public endpoint
    max_retries: int = DEFAULT_MAX_RETRIES
    log: Any = field(default=log, repr=False)
    name: str = "anthropic"
    direct: bool = False  # ignore the environment's proxy settings (a loopback rehearsal)

    @classmethod
    def from_env(cls, log: Any = log) -> AnthropicBackend:
        return cls(
            api_key=os.environ.get("ANTHROPIC_API_KEY") or None,
            base_url=os.environ.get("ANTHROPIC_BASE_URL") or None,
            max_retries=max_retries_from_env(),
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
        on_usage: UsageSink | None = None,
    ) -> Completion:
        import anthropic
        import httpx2

        params = [_message_param(m) for m in messages]
        # anthropic 2.x has no `temperature` keyword (newer models reject non-default sampling);
        # it is still sent as-is for the models that accept it.
        extra_body = {"temperature": temperature} if temperature is not None else None
        opened: Any = None  # the stream, once it started: what it spent if it breaks
        try:
            client = sdk_client(
                anthropic.AsyncAnthropic,
                anthropic.DefaultAsyncHttpxClient,
                api_key=self.api_key,
                base_url=self.base_url,
                max_retries=self.max_retries,
                direct=self.direct,
            )
            async with client.messages.stream(
                model=model,
                max_tokens=max_tokens,
                system=system or anthropic.omit,
                messages=params,
                stop_sequences=list(stop) if stop else anthropic.omit,
                extra_body=extra_body,
            ) as stream:
                opened = stream
                async for event in stream:
                    if event.type == "message_start" and on_usage is not None:
                        so_far = _spent(stream)  # the input is billed from here on
                        if so_far is not None:
                            await on_usage(so_far)
                    elif (
                        event.type == "content_block_delta"
                        and event.delta.type == "text_delta"
                        and event.delta.text
                        and on_text is not None
                    ):
                        await on_text(event.delta.text)
                final = await stream.get_final_message()
        except anthropic.CredentialsError as exc:
            raise AgentError(
                f"no Anthropic credentials: set ANTHROPIC_API_KEY on the worker ({exc})",
                fault=Fault.WORKER,
            ) from exc
        except anthropic.APIConnectionError as exc:
            # Once the stream has started, a failure to read it is the connection breaking
            # mid-response (anthropic 2.17 wraps it, a timeout included; earlier releases raise
            # httpx's error, below): the SDK does not retry it, and it was connected.
            cause = exc.__cause__ if isinstance(exc.__cause__, httpx2.HTTPError) else None
            if opened is None or cause is None:
                error = self._explain(exc)
                error.usage = _spent(opened)
                raise error from exc
            raise self._broke(cause, opened) from exc
        except anthropic.AnthropicError as exc:
            error = self._explain(exc)
            error.usage = _spent(opened)
            raise error from exc
        except httpx2.HTTPError as exc:  # read errors of a started stream, before anthropic 2.17
            raise self._broke(exc, opened) from exc
        except TypeError as exc:
            if "authentication method" in str(exc):
                raise AgentError(
                    "no Anthropic credentials: set ANTHROPIC_API_KEY on the worker",
                    fault=Fault.WORKER,
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

    def _broke(self, exc: Exception, opened: Any) -> AgentError:
        """The stream started, then its connection broke (what it spent so far is kept)."""
        return AgentError(
            f"the connection to the Anthropic API at {self.endpoint} broke mid-response: "
            f"{type(exc).__name__} {exc}".rstrip(),
            usage=_spent(opened),
            fault=Fault.WORKER,
        )

    def _explain(self, exc: anthropic.AnthropicError) -> AgentError:
        """Turn an SDK exception into a message an operator can act on, saying whose fault it
        is: a request the API refused (400, 413, 422...) is the task's; credentials refused, a
        missing model or endpoint (404: the worker announced what it cannot reach), the API
        failing or overloaded after retries, or unreachable, are the worker's."""
        import anthropic

        retries = f"after {self.max_retries} retries" if self.max_retries else "(retries off)"
        if isinstance(exc, anthropic.APIStatusError):
            detail = exc.api_message or str(exc.body or exc.message)
            kind = exc.type or "error"
            if exc.status_code == 200:  # an `event: error` frame inside a started stream
                return AgentError(
                    f"the API stream failed mid-response ({kind}): {detail}",
                    fault=Fault.TASK if kind == "invalid_request_error" else Fault.WORKER,
                )
            if isinstance(exc, anthropic.AuthenticationError):
                return AgentError(
                    f"authentication failed: check ANTHROPIC_API_KEY (HTTP 401: {detail})",
                    fault=Fault.WORKER,
                )
            if isinstance(exc, anthropic.PermissionDeniedError):
                return AgentError(f"permission denied (HTTP 403): {detail}", fault=Fault.WORKER)
            if isinstance(exc, anthropic.OverloadedError):
                return AgentError(
                    f"the Anthropic API is overloaded (HTTP 529) {retries}: {detail}",
                    fault=Fault.WORKER,
                )
            if isinstance(exc, anthropic.RateLimitError):
                return AgentError(
                    f"rate limited (HTTP 429) {retries}: {detail}", fault=Fault.WORKER
                )
            if isinstance(exc, anthropic.BadRequestError):
                return AgentError(f"invalid request (HTTP 400): {detail}")
            if isinstance(exc, anthropic.NotFoundError):
                return AgentError(f"not found (HTTP 404): {detail}", fault=Fault.WORKER)
            if exc.status_code >= 500:
                return AgentError(
                    f"the Anthropic API failed (HTTP {exc.status_code}, {kind}) {retries}: "
                    f"{detail}",
                    fault=Fault.WORKER,
                )
            return AgentError(
                f"the Anthropic API refused the request (HTTP {exc.status_code}, {kind}): {detail}"
            )
        if isinstance(exc, anthropic.APITimeoutError):
            return AgentError(
                f"the request to {self.endpoint} timed out {retries}", fault=Fault.WORKER
            )
        if isinstance(exc, anthropic.APIConnectionError):
            cause = f": {exc.__cause__}" if exc.__cause__ else ""
            return AgentError(
                f"could not connect to the Anthropic API at {self.endpoint} {retries}{cause}",
                fault=Fault.WORKER,
            )
        return AgentError(f"Anthropic SDK error: {type(exc).__name__}: {exc}", fault=Fault.WORKER)


def _sse(*events: dict[str, Any]) -> bytes:
    return "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events).encode()


# A whole streamed reply of one word, with the fields the Messages API sends (each kind of
# field the SDK meets first makes it build a validator).
_REHEARSAL_USAGE = {
    "input_tokens": 1,
    "cache_creation_input_tokens": 0,
    "cache_read_input_tokens": 0,
    "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
    "output_tokens": 1,
    "service_tier": "standard",
}
_REHEARSAL_REPLY = http_reply(
    "text/event-stream",
    _sse(
        {
            "type": "message_start",
            "message": {
                "id": "msg_rehearsal",
                "type": "message",
                "role": "assistant",
                "model": DEFAULT_MODEL,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": _REHEARSAL_USAGE,
            },
        },
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "."}},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 1},
        },
        {"type": "message_stop"},
    ),
)


async def _ignore(_: object) -> None:
    pass


def rehearse_anthropic() -> None:
    """Make the Anthropic SDK's first call now, not inside a run (see `clients`)."""

    async def call(base_url: str) -> None:
        backend = AnthropicBackend("rehearsal", base_url, 0, log.bind(rehearsal=True), direct=True)
        await backend.complete(
            system=".",
            messages=[{"role": "user", "content": "."}],
            model=DEFAULT_MODEL,
            max_tokens=1,
            on_text=_ignore,
            on_usage=_ignore,
        )

    rehearse("anthropic", call, _REHEARSAL_REPLY)
