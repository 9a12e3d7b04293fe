"""The `openai` agent: one chat completion from any OpenAI-compatible API, streamed.

OpenAI itself, and the local servers that speak its chat completions format (vLLM, llama.cpp's
server, Ollama, LM Studio...) through the `openai` SDK with a `base_url`. It is the `anthropic`
agent over another backend: the same input, conversation transcript (sent as `messages`),
compaction, output schema (also sent as `response_format` json_schema, which these servers
use to constrain the answer), model settings and cost limit.

Environment (read when a run starts):
- OPENAI_API_KEY: the key; a local server that wants none needs only OPENAI_BASE_URL.
- OPENAI_BASE_URL: the API's base URL with its `/v1` (e.g. http://127.0.0.1:8000/v1 for vLLM,
  http://127.0.0.1:11434/v1 for Ollama); default https://api.openai.com/v1.
- TASKRUN_OPENAI_MODEL: the default model (default gpt-4.1-mini).
- TASKRUN_OPENAI_MAX_RETRIES: SDK retries of 408/409/429/5xx and connection errors (default 2).
- TASKRUN_OPENAI_MAX_TOKENS_FIELD: `max_completion_tokens` (default, what OpenAI's newer
  models take) or `max_tokens` (older servers).
- TASKRUN_OPENAI_JSON_SCHEMA: `0` not to send `response_format` (servers that refuse it); the
  schema is still in the system prompt and the answer still checked.
- TASKRUN_MODEL_PRICES: prices of models not in OPENAI_MODELS (local models: `name=0/0`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import structlog

from taskrun.core.agent import AgentError, Readiness
from taskrun.core.models import AgentSpec, ModelBackend, Usage
from taskrun.core.status import Fault
from taskrun.worker.agents.anthropic_api import INPUT_SCHEMA as ANTHROPIC_INPUT
from taskrun.worker.agents.anthropic_api import AnthropicAgent
from taskrun.worker.agents.backends import (
    ChatMessage,
    Completion,
    MessagesBackend,
    ModelInfo,
    TextSink,
    UsageSink,
    cost_usd,
)
from taskrun.worker.agents.clients import http_reply, rehearse, sdk_client

if TYPE_CHECKING:
    import openai

log = structlog.get_logger(__name__)

DEFAULT_OPENAI_MODEL = "gpt-4.1-mini"
DEFAULT_ENDPOINT = "https://api.openai.com/v1"
DEFAULT_MAX_RETRIES = 2

# List prices in USD per million tokens (openai.com/api/pricing, 2025). Cached prompt tokens
# are counted at the table's cache-read factor (0.1x; OpenAI's discount varies by model).
OPENAI_MODELS: dict[str, ModelInfo] = {
    "gpt-4.1": ModelInfo(1_047_576, 2.0, 8.0),
    "gpt-4.1-mini": ModelInfo(1_047_576, 0.40, 1.60),
    "gpt-4.1-nano": ModelInfo(1_047_576, 0.10, 0.40),
    "gpt-4o": ModelInfo(128_000, 2.50, 10.0),
    "gpt-4o-mini": ModelInfo(128_000, 0.15, 0.60),
}

INPUT_SCHEMA: dict[str, Any] = {
    **ANTHROPIC_INPUT,
    "properties": {
        **ANTHROPIC_INPUT["properties"],
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    },
}


def configured_openai_models() -> list[str]:
    """The models the `openai` agent announces and accepts: TASKRUN_OPENAI_MODELS
    (comma-separated), else the default model (a task requiring a model must get a worker
    that has it, so the price table is not announced)."""
    listed = os.environ.get("TASKRUN_OPENAI_MODELS", "")
    models = list(dict.fromkeys(m.strip() for m in listed.split(",") if m.strip()))
    return models or [os.environ.get("TASKRUN_OPENAI_MODEL") or DEFAULT_OPENAI_MODEL]


def default_openai_model() -> str:
    return os.environ.get("TASKRUN_OPENAI_MODEL") or configured_openai_models()[0]


def announced_openai_backends() -> tuple[ModelBackend, ...]:
    first = default_openai_model()
    names = [first, *(m for m in configured_openai_models() if m != first)]
    return tuple(openai_backend(name) for name in names)


def openai_api_missing() -> str:
    """Why an OpenAI-compatible API cannot be called from here ("" when it can): a key, or
    the base URL of a local server that needs none."""
    if os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_BASE_URL"):
        return ""
    return (
        "no OpenAI credentials: set OPENAI_API_KEY in the worker's environment (or "
        "OPENAI_BASE_URL for a local server that needs no key)"
    )


def openai_backend(model: str) -> ModelBackend:
    info = OPENAI_MODELS.get(model)
    return ModelBackend(
        provider="openai",
        model_name=model,
        context_window=info.context_window if info else 0,
        modalities=("text",),
    )


def _setting(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    if not raw.isdigit():
        raise AgentError(f"{name} must be a whole number >= 0, not {raw!r}", fault=Fault.WORKER)
    return int(raw)


def _chat_messages(system: str, messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    out = [{"role": "system", "content": system}] if system else []
    return out + [{"role": m["role"], "content": m["content"]} for m in messages]


def _usage(data: Any) -> Usage:
    """Usage from a chat completion's `usage` (prompt tokens include the cached ones)."""
    if data is None:
        return Usage()
    details = getattr(data, "prompt_tokens_details", None)
    cached = int(getattr(details, "cached_tokens", 0) or 0)
    return Usage(
        input_tokens=max(0, int(data.prompt_tokens or 0) - cached),
        output_tokens=int(data.completion_tokens or 0),
        cache_read_tokens=cached,
        turns=1,
    )


@dataclass
class OpenAIBackend:
    """Chat completions over `openai.AsyncOpenAI`, streaming with usage in the last chunk."""

    api_key: str | None = None
    base_url: str | None = None
    max_retries: int = DEFAULT_MAX_RETRIES
    max_tokens_field: str = "max_completion_tokens"
    json_schema: bool = True
    log: Any = field(default=log, repr=False)
    name: str = "openai"
    direct: bool = False  # ignore the environment's proxy settings (a loopback rehearsal)

    @classmethod
    def from_env(cls, log: Any = log) -> OpenAIBackend:
        base_url = os.environ.get("OPENAI_BASE_URL") or None
        api_key = os.environ.get("OPENAI_API_KEY") or None
        if api_key is None and base_url is None:
            raise AgentError(
                "no OpenAI credentials: set OPENAI_API_KEY on the worker (or OPENAI_BASE_URL "
                "alone for a local server that needs no key)",
                fault=Fault.WORKER,
            )
        field_name = os.environ.get("TASKRUN_OPENAI_MAX_TOKENS_FIELD") or "max_completion_tokens"
        if field_name not in ("max_completion_tokens", "max_tokens"):
            raise AgentError(
                "TASKRUN_OPENAI_MAX_TOKENS_FIELD must be max_completion_tokens or max_tokens, "
                f"not {field_name!r}",
                fault=Fault.WORKER,
            )
        return cls(
            # a local server ignores the key, but the SDK insists on one
            api_key=api_key or "no-key",
            base_url=base_url,
            max_retries=_setting("TASKRUN_OPENAI_MAX_RETRIES", DEFAULT_MAX_RETRIES),
            max_tokens_field=field_name,
            json_schema=os.environ.get("TASKRUN_OPENAI_JSON_SCHEMA", "1") != "0",
            log=log,
        )

    @property
    def endpoint(self) -> str:
        return self.base_url or DEFAULT_ENDPOINT

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
        import httpx2
        import openai

        response_format: Any = openai.omit
        if schema is not None and self.json_schema:
            response_format = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": dict(schema), "strict": False},
            }
        as_max_tokens = self.max_tokens_field == "max_tokens"
        texts: list[str] = []
        usage: Usage | None = None
        used_model, finish = model, ""
        chunks = 0  # received so far
        try:
            client = sdk_client(
                openai.AsyncOpenAI,
                openai.DefaultAsyncHttpxClient,
                api_key=self.api_key,
                base_url=self.base_url,
                max_retries=self.max_retries,
                direct=self.direct,
            )
            stream = await client.chat.completions.create(
                model=model,
                messages=cast(Any, _chat_messages(system, messages)),
                stream=True,
                stream_options={"include_usage": True},
                max_tokens=max_tokens if as_max_tokens else openai.omit,
                max_completion_tokens=openai.omit if as_max_tokens else max_tokens,
                temperature=temperature if temperature is not None else openai.omit,
                stop=list(stop) if stop else openai.omit,
                response_format=response_format,
            )
            async with stream:
                async for chunk in stream:
                    chunks += 1
                    used_model = chunk.model or used_model
                    if chunk.usage is not None:
                        usage = _usage(chunk.usage)
                    for choice in chunk.choices:
                        finish = choice.finish_reason or finish
                        text = choice.delta.content if choice.delta else None
                        if text:
                            texts.append(text)
                            if on_text is not None:
                                await on_text(text)
        except openai.APIConnectionError as exc:
            if chunks:  # the SDK says "connection error" for a stream that broke after starting
                cause = f": {exc.__cause__}" if exc.__cause__ else ""
                raise AgentError(
                    f"the connection to the OpenAI-compatible API at {self.endpoint} broke "
                    f"mid-response after {chunks} chunks{cause}",
                    fault=Fault.WORKER,
                ) from exc
            raise self._explain(exc) from exc
        except openai.OpenAIError as exc:
            raise self._explain(exc) from exc
        except httpx2.HTTPError as exc:  # a stream that broke while being read
            raise AgentError(
                f"the connection to the OpenAI-compatible API at {self.endpoint} broke "
                f"mid-response: {type(exc).__name__} {exc}".rstrip(),
                fault=Fault.WORKER,
            ) from exc
        if usage is None:
            # a server that ignores stream_options: the answer stands, its size is unknown
            self.log.warning("the API reported no usage", endpoint=self.endpoint, model=used_model)
            usage = Usage(turns=1)
        usage.cost_usd = cost_usd(used_model, usage, OPENAI_MODELS)
        return Completion("".join(texts), usage, openai_backend(used_model), finish)

    def _explain(self, exc: openai.OpenAIError) -> AgentError:
        """An SDK exception as a message an operator can act on, with whose fault it is (as
        for the Anthropic API: a refused request is the task's, the rest the worker's)."""
        import openai

        retries = f"after {self.max_retries} retries" if self.max_retries else "(retries off)"
        where = self.endpoint
        if isinstance(exc, openai.APIStatusError):
            body = exc.body if isinstance(exc.body, dict) else {}
            detail = str(body.get("message") or exc.message)
            status = exc.status_code
            if isinstance(exc, openai.AuthenticationError):
                return AgentError(
                    "authentication failed: check OPENAI_API_KEY "
                    f"(HTTP 401 from {where}: {detail})",
                    fault=Fault.WORKER,
                )
            if isinstance(exc, openai.RateLimitError):
                return AgentError(
                    f"rate limited (HTTP 429) {retries}: {detail}", fault=Fault.WORKER
                )
            if isinstance(exc, openai.BadRequestError):
                return AgentError(f"invalid request (HTTP 400): {detail}")
            if isinstance(exc, openai.NotFoundError):
                return AgentError(
                    f"not found (HTTP 404 from {where}): {detail}", fault=Fault.WORKER
                )
            if status >= 500:
                return AgentError(
                    f"the API at {where} failed (HTTP {status}) {retries}: {detail}",
                    fault=Fault.WORKER,
                )
            if status == 403:
                return AgentError(
                    f"permission denied (HTTP 403 from {where}): {detail}", fault=Fault.WORKER
                )
            return AgentError(f"the API at {where} refused the request (HTTP {status}): {detail}")
        if isinstance(exc, openai.APITimeoutError):
            return AgentError(f"the request to {where} timed out {retries}", fault=Fault.WORKER)
        if isinstance(exc, openai.APIConnectionError):
            cause = f": {exc.__cause__}" if exc.__cause__ else ""
            return AgentError(
                f"could not connect to the API at {where} {retries}{cause}", fault=Fault.WORKER
            )
        if isinstance(exc, openai.APIError):  # an error inside a started stream
            return AgentError(
                f"the API stream failed mid-response: {exc.message}", fault=Fault.WORKER
            )
        return AgentError(f"OpenAI SDK error: {exc}", fault=Fault.WORKER)


def _rehearsal_chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
    chunk = {
        "id": "chatcmpl-rehearsal",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": DEFAULT_OPENAI_MODEL,
        "service_tier": "default",
        "system_fingerprint": "fp_rehearsal",
        "choices": choices,
        "usage": usage,
    }
    return f"data: {json.dumps(chunk)}\n\n"


def _rehearsal_choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


# A whole streamed completion of one word, with the fields OpenAI sends (each kind of field the
# SDK meets first makes it build a validator).
_REHEARSAL_REPLY = http_reply(
    "text/event-stream",
    (
        _rehearsal_chunk([_rehearsal_choice({"role": "assistant", "content": "", "refusal": None})])
        + _rehearsal_chunk([_rehearsal_choice({"content": "."})])
        + _rehearsal_chunk([_rehearsal_choice({}, "stop")])
        + _rehearsal_chunk(
            [],
            {
                "prompt_tokens": 1,
                "completion_tokens": 1,
                "total_tokens": 2,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": 0,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            },
        )
        + "data: [DONE]\n\n"
    ).encode(),
)


def rehearse_openai() -> None:
    """Make the OpenAI SDK's first call now, not inside a run (see `clients`)."""

    async def call(base_url: str) -> None:
        backend = OpenAIBackend(
            "rehearsal", f"{base_url}/v1", 0, log=log.bind(rehearsal=True), direct=True
        )
        await backend.complete(
            system=".",
            messages=[{"role": "user", "content": "."}],
            model=DEFAULT_OPENAI_MODEL,
            max_tokens=1,
            schema={"type": "object"},
        )

    rehearse("openai", call, _REHEARSAL_REPLY)


class OpenAIAgent(AnthropicAgent):
    """The `anthropic` agent's behaviour over an OpenAI-compatible chat completions API."""

    name = "openai"
    provider_name = "the OpenAI API"
    max_temperature = 2.0
    prices: Mapping[str, ModelInfo] = OPENAI_MODELS

    def __init__(self) -> None:
        # paid when the worker starts, not inside a run (see AnthropicAgent)
        rehearse_openai()

        self.spec = AgentSpec(
            name="openai",
            description="One chat completion from an OpenAI-compatible API (OpenAI, vLLM, "
            "llama.cpp, Ollama; streaming): prompt, system, model, max_tokens, temperature; "
            "in a conversation, with its transcript.",
            backends=announced_openai_backends(),
            input_schema=json.dumps(INPUT_SCHEMA),
        )

    def readiness(self) -> Readiness:
        return Readiness(openai_api_missing(), announced_openai_backends())

    def backend(self, bound: Any) -> MessagesBackend:
        return OpenAIBackend.from_env(bound)

    def default_model(self) -> str:
        return default_openai_model()

    def input_schema(self) -> dict[str, Any]:
        return INPUT_SCHEMA
