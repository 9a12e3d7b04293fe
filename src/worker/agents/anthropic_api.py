"""The `anthropic` agent: one Messages API call, streamed into the run's output.

As a turn of a conversation it sends the whole transcript the control plane keeps (earlier user
messages and answers, in order) followed by the new message, so any worker can answer it. When
the control plane asks for compaction (the transcript would not fit the model's context window),
it first has the model summarize the older turns into one message, answers with that summary
instead of them, and returns the summary for the next turns.

The task's model settings (system prompt, max tokens, temperature, stop sequences) win over the
input's fields of the same meaning; with an output schema the result is the model's JSON answer,
asked again while it does not match (see `structured.py`).

Environment (read when a run starts): ANTHROPIC_API_KEY, ANTHROPIC_BASE_URL,
TASKRUN_ANTHROPIC_MODEL (default model), TASKRUN_ANTHROPIC_MODELS (the models it announces),
TASKRUN_ANTHROPIC_MAX_RETRIES (SDK retries, default 2), TASKRUN_MODEL_PRICES (prices of models
not in the table). A task's required model wins over the input's `model`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import structlog

from taskrun.core.agent import AgentError, AgentResult, Readiness, RunContext
from taskrun.core.models import SUMMARY_PREFIX, AgentSpec, TranscriptMessage, Usage
from taskrun.worker.agents.backends import (
    MODELS,
    AnthropicBackend,
    ChatMessage,
    MessagesBackend,
    ModelInfo,
    announced_backends,
    anthropic_api_missing,
    check_input,
    default_model,
    rehearse_anthropic,
)
from taskrun.worker.agents.structured import answer, result_of, unknown_cost

log = structlog.get_logger(__name__)

DEFAULT_MAX_TOKENS = 1024

INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "prompt": {"type": "string", "minLength": 1, "description": "the user message"},
        "system": {"type": "string", "description": "system prompt"},
        "model": {"type": "string", "minLength": 1, "description": "model id"},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": 128000, "default": 1024},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["prompt"],
    "additionalProperties": False,
}


SUMMARY_SYSTEM = (
    "You compact a conversation between a user and an assistant. Write a concise summary that "
    "keeps every fact, name, number, decision and open question the assistant needs to go on."
)
SUMMARY_REQUEST = "Summarize this conversation so far:\n\n"
SUMMARY_MAX_TOKENS = 1024


def messages(
    ctx: RunContext, history: Sequence[TranscriptMessage] | None = None
) -> list[ChatMessage]:
    """The Messages API `messages`: the conversation so far (if any), then this prompt. Messages
    of one role in a row are joined, so roles alternate as the API expects."""
    if history is None:
        history = ctx.conversation.history if ctx.conversation is not None else ()
    out: list[ChatMessage] = []
    items = [*((m.role, m.text) for m in history), ("user", str(ctx.input["prompt"]))]
    for role, text in items:
        if out and out[-1]["role"] == role:
            out[-1]["content"] += "\n\n" + text
        else:
            out.append({"role": "assistant" if role == "assistant" else "user", "content": text})
    return out


class AnthropicAgent:
    """Sends `prompt` (with an optional system prompt) to the Messages API and streams the reply.

    The `openai` agent is the same agent over another backend: it overrides the class attributes
    and the three methods below `__init__`."""

    name = "anthropic"
    provider_name = "the Anthropic API"
    max_temperature = 1.0
    prices: Mapping[str, ModelInfo] = MODELS

    def __init__(self) -> None:
        # imports and the SDK's first call (about a second on a busy machine): paid when the
        # worker starts, not inside a run, where they would hold up the worker's event loop
        # (and its heartbeats)
        rehearse_anthropic()
        self.spec = AgentSpec(
            name="anthropic",
            description="One Anthropic Messages API call (streaming): prompt, system, model, "
            "max_tokens, temperature; in a conversation, with its transcript.",
            backends=announced_backends(),
            input_schema=json.dumps(INPUT_SCHEMA),
        )

    def readiness(self) -> Readiness:
        return Readiness(anthropic_api_missing(), announced_backends())

    def backend(self, bound: Any) -> MessagesBackend:
        return AnthropicBackend.from_env(bound)

    def default_model(self) -> str:
        return default_model()

    def input_schema(self) -> dict[str, Any]:
        return INPUT_SCHEMA

    async def run(self, ctx: RunContext) -> AgentResult:
        check_input(self.input_schema(), ctx.input)
        inp = ctx.input
        bound = log.bind(task_id=ctx.task_id, run_id=ctx.run_id, agent=self.name)
        model = ctx.model or inp.get("model") or self.default_model()
        backend = self.backend(bound)
        turn = ctx.conversation
        history = list(turn.history) if turn is not None else []
        spent = Usage()
        summary, through = "", 0
        if turn is not None and turn.summarize_through:
            through = turn.summarize_through
            old = [m for m in history if m.turn <= through]
            text = "\n\n".join(f"{m.role.upper()}: {m.text}" for m in old)
            bound.info("compacting the conversation", summarize_through=through, messages=len(old))
            summarized = await backend.complete(
                system=SUMMARY_SYSTEM,
                messages=[{"role": "user", "content": SUMMARY_REQUEST + text}],
                model=model,
                max_tokens=SUMMARY_MAX_TOKENS,
            )
            summary = summarized.text
            spent.add(summarized.usage)
            await ctx.report_usage(spent)
            history = [
                TranscriptMessage("user", SUMMARY_PREFIX + summary),
                TranscriptMessage("assistant", "Understood."),
                *(m for m in history if m.turn > through),
            ]
            await ctx.event("compacted", summarized_through=through, summary=summary)
        settings = ctx.options.model_settings
        temperature = (
            settings.temperature if settings.temperature is not None else inp.get("temperature")
        )
        if temperature is not None and temperature > self.max_temperature:
            raise AgentError(
                f"temperature {temperature:g}: {self.provider_name} takes 0 to "
                f"{self.max_temperature:g} (policy.model_settings.temperature)"
            )
        bound.info("calling the model", model=model, endpoint=getattr(backend, "endpoint", ""))
        answered = await answer(
            ctx,
            backend,
            system=settings.system_prompt or inp.get("system", ""),
            messages=messages(ctx, history),
            model=model,
            max_tokens=settings.max_tokens or inp.get("max_tokens", DEFAULT_MAX_TOKENS),
            temperature=temperature,
            stop=settings.stop_sequences,
            schema=ctx.options.output_schema,
            retries=ctx.options.output_retries,
            on_text=ctx.emit,
            spent=spent,
            log=bound,
        )
        completion = answered.completion
        warnings = await unknown_cost(
            ctx, completion.backend.model_name, answered.usage, self.prices
        )
        plain = {
            "text": completion.text,
            "stop_reason": completion.stop_reason,
            "model": completion.backend.model_name,
        }
        return AgentResult(
            result=result_of(answered, plain, warnings),
            usage=answered.usage,
            backend_used=completion.backend,
            summary=summary,
            summarized_through=through,
        )
