"""One model answer for a run, asked again while it does not match the task's output schema.

Every agent backed by a `MessagesBackend` (anthropic, openai, support_triage) answers through
`answer`: without a schema it is one call; with one, the schema goes into the system prompt, the
reply is parsed and checked, and on a violation the model is asked again with the conversation
so far and what did not validate, at most `retries` times. Each attempt is an `output_attempt`
event and the valid answer is the run's output. The run's usage is reported after every call,
so the worker can stop a run that goes over its cost limit between calls.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from taskrun.core.agent import AgentError, CostLimitReached, RunContext
from taskrun.core.models import Usage
from taskrun.core.output_schema import exhausted, feedback, instructions, parse_reply
from taskrun.worker.agents.backends import (
    MODELS,
    ChatMessage,
    Completion,
    MessagesBackend,
    ModelInfo,
    TextSink,
    model_info,
    unknown_cost_hint,
)


@dataclass(slots=True)
class Answer:
    completion: Completion  # the last call's
    usage: Usage  # every call's, summed
    value: Any = None  # the JSON value matching the schema, when there was one
    attempts: int = 1
    structured: bool = False  # there was a schema: `value` is the answer


def with_schema(system: str, schema: dict[str, Any] | None) -> str:
    if schema is None:
        return system
    return f"{system}\n\n{instructions(schema)}" if system else instructions(schema)


async def answer(
    ctx: RunContext,
    backend: MessagesBackend,
    *,
    system: str,
    messages: Sequence[ChatMessage],
    model: str,
    max_tokens: int,
    temperature: float | None = None,
    stop: Sequence[str] = (),
    schema: dict[str, Any] | None = None,
    retries: int = 0,
    on_text: TextSink | None = None,
    spent: Usage | None = None,
    log: Any = None,
    event: str = "output_attempt",
    schema_name: str = "the output schema",
    event_data: Mapping[str, Any] | None = None,
) -> Answer:
    """The model's answer (see the module docstring). `spent` is what the run used before (a
    compaction call, say), counted in the usage reported to the worker and returned. Raises
    AgentError (with the usage) once every attempt failed to validate."""
    usage = Usage()
    if spent is not None:
        usage.add(spent)
    asked = list(messages)
    system = with_schema(system, schema)
    problems: list[str] = []
    attempts = 1 + (retries if schema is not None else 0)
    for attempt in range(1, attempts + 1):
        try:
            completion = await backend.complete(
                system=system,
                messages=asked,
                model=model,
                max_tokens=max_tokens,
                temperature=temperature,
                stop=stop,
                schema=schema,
                # with a schema, the replies are events and the output is the valid answer:
                # streamed, a rejected reply and its correction would read as one text
                on_text=on_text if schema is None else None,
                on_usage=functools.partial(_report_with, ctx, usage),
            )
        except CostLimitReached:
            raise  # raised by report_usage mid-call: it carries the run's whole total
        except AgentError as exc:
            if exc.usage is not None:
                exc.usage.add(usage)
            else:
                exc.usage = usage
            raise
        usage.add(completion.usage)
        await ctx.report_usage(usage)
        if schema is None:
            return Answer(completion, usage)
        value, problems = parse_reply(completion.text, schema)
        await ctx.event(
            event,
            **(event_data or {}),
            attempt=attempt,
            valid=not problems,
            errors=problems,
            reply=completion.text[:500],
        )
        if not problems:
            if on_text is not None:
                await on_text(json.dumps(value, indent=2) + "\n")
            return Answer(completion, usage, value, attempt, structured=True)
        if log is not None:
            log.info("reply did not match the output schema", attempt=attempt, errors=problems)
        asked += [
            {"role": "assistant", "content": completion.text or "(empty reply)"},
            {"role": "user", "content": feedback(problems)},
        ]
    raise AgentError(exhausted(attempts, problems, schema_name), usage=usage)


async def _report_with(ctx: RunContext, before: Usage, call: Usage) -> None:
    """Report what the run spent: the calls before this one, and this one so far."""
    total = Usage()
    total.add(before)
    total.add(call)
    await ctx.report_usage(total)


async def unknown_cost(
    ctx: RunContext, model: str, usage: Usage, table: Mapping[str, ModelInfo] = MODELS
) -> list[str]:
    """A warning (also a `cost_unknown` event) when the run used tokens of a model no price
    table knows: its cost shows as 0 because it is unknown, not because it was free."""
    if model_info(model, table) is not None or not (usage.input_tokens or usage.output_tokens):
        return []
    hint = unknown_cost_hint(model)
    await ctx.event("cost_unknown", model=model, hint=hint)
    return [hint]


def result_of(answer: Answer, plain: dict[str, Any], warnings: list[str]) -> Any:
    """The run's result: the value matching the output schema when the task has one (the result
    is what the schema describes), else the agent's usual object, with warnings if any."""
    if answer.structured:
        return answer.value
    if warnings:
        plain["warnings"] = warnings
    return plain
