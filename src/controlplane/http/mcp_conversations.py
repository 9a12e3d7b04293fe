"""The MCP server's conversation tools: start a conversation, send its next message (and wait for
the answer), read it with its turns.

Besides the generic `start_conversation`, each announced agent that takes a `prompt` (so each
turn's message can be its input) is a tool of its own, `chat_<agent>`, whose description and
`options` schema are the agent's announced ones without `prompt`. Every call goes through the
gRPC servicer's method with the caller's bearer token, as the task tools do.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import mcp.types as mt

from taskrun.controlplane.http.api import Servicers
from taskrun.controlplane.http.context import HttpCallContext
from taskrun.core.models import AgentSpec
from taskrun.v1 import common_pb2 as pb
from taskrun.v1 import conversations_pb2 as cpb

CHAT_TOOL_PREFIX = "chat_"

Waiter = Callable[[str, float, HttpCallContext], Awaitable[dict[str, Any]]]


class ConversationToolFailed(Exception):
    """A conversation tool call that fails with a message for the caller."""


_CONVERSATION_ID = {"type": "string", "description": "the conversation id (cnv_…)"}
_MESSAGE = {"type": "string", "minLength": 1, "description": "the user's message"}


def conversation_tools(
    agents: dict[str, AgentSpec],
    labels: dict[str, Any],
    wait: dict[str, Any],
    wait_seconds: dict[str, Any],
) -> list[mt.Tool]:
    """The conversation tools for the agents announced now (the generic ones always)."""
    chat = conversational(agents)
    agent_property: dict[str, Any] = {"type": "string", "description": "the agent's name"}
    if chat:
        agent_property["enum"] = sorted(chat)
    answer = dict(wait, default=True, description="wait for the answer (the turn's end)")
    tools = [
        mt.Tool(
            name="start_conversation",
            description="Start a conversation with an agent: its first message becomes the "
            "first turn (a task on any worker offering the agent); with wait (the default), "
            "return the answer and the turn's cost. Continue it with send_message. Agents: "
            + (", ".join(f"{n} ({_describe(a)})" for n, a in sorted(chat.items())) or "none yet"),
            input_schema={
                "type": "object",
                "properties": {
                    "agent": agent_property,
                    "message": _MESSAGE,
                    "options": {
                        "type": "object",
                        "description": "the agent's options for every turn (its input without "
                        "prompt; see chat_<agent> for each agent's schema)",
                    },
                    "title": {"type": "string"},
                    "labels": labels,
                    "wait": answer,
                    "wait_seconds": wait_seconds,
                },
                "required": ["agent", "message"],
            },
        ),
        mt.Tool(
            name="send_message",
            description="Send the next message of a conversation: a new turn that continues "
            "it on any worker offering its agent; with wait (the default), return the answer "
            "and the turn's cost.",
            input_schema={
                "type": "object",
                "properties": {
                    "conversation_id": _CONVERSATION_ID,
                    "message": _MESSAGE,
                    "wait": answer,
                    "wait_seconds": wait_seconds,
                },
                "required": ["conversation_id", "message"],
            },
        ),
        mt.Tool(
            name="get_conversation",
            description="A conversation with its turns in order: each message, answer, "
            "status and cost, and the conversation's total cost.",
            input_schema={
                "type": "object",
                "properties": {"conversation_id": _CONVERSATION_ID},
                "required": ["conversation_id"],
            },
        ),
    ]
    for name, agent in sorted(chat.items()):
        schema = _schema(agent)
        prompt = schema.get("properties", {}).get("prompt", {})
        tools.append(
            mt.Tool(
                name=f"{CHAT_TOOL_PREFIX}{name}",
                description=f"Start a conversation with the agent {name!r}: {_describe(agent)}",
                input_schema={
                    "type": "object",
                    "properties": {
                        "message": {**_MESSAGE, **_described(prompt)},
                        "options": _without_prompt(schema),
                        "title": {"type": "string"},
                        "labels": labels,
                        "wait": answer,
                        "wait_seconds": wait_seconds,
                    },
                    "required": ["message"],
                },
            )
        )
    return tools


def conversational(agents: dict[str, AgentSpec]) -> dict[str, AgentSpec]:
    """The agents whose input takes a `prompt` (or is not constrained): a turn's message is its
    input's prompt, so only these can hold a conversation."""
    out = {}
    for name, agent in agents.items():
        schema = _schema(agent)
        properties = schema.get("properties")
        closed = schema.get("additionalProperties") is False
        if not closed or (isinstance(properties, dict) and "prompt" in properties):
            out[name] = agent
    return out


def _describe(agent: AgentSpec) -> str:
    return agent.description or "no description announced"


def _described(prompt: Any) -> dict[str, Any]:
    if isinstance(prompt, dict) and isinstance(prompt.get("description"), str):
        return {"description": prompt["description"]}
    return {}


def _schema(agent: AgentSpec) -> dict[str, Any]:
    try:
        schema = json.loads(agent.input_schema) if agent.input_schema else {}
    except ValueError:
        schema = {}
    return schema if isinstance(schema, dict) else {}


def _without_prompt(schema: dict[str, Any]) -> dict[str, Any]:
    """The agent's schema for the options every turn starts from (its input without prompt)."""
    if not schema:
        return {"type": "object"}
    out = dict(schema)
    properties = out.get("properties")
    if isinstance(properties, dict):
        out["properties"] = {k: v for k, v in properties.items() if k != "prompt"}
    required = out.get("required")
    if isinstance(required, list):
        out["required"] = [r for r in required if r != "prompt"]
        if not out["required"]:
            del out["required"]
    out["description"] = "the agent's options for every turn"
    return out


def _status(value: int) -> str:
    return pb.TaskStatus.Name(value).removeprefix("TASK_STATUS_").lower()


def turn_summary(turn: cpb.Turn) -> dict[str, Any]:
    out: dict[str, Any] = {
        "index": turn.index,
        "task_id": turn.task_id,
        "message": turn.message,
        "status": _status(turn.status),
        "cost_usd": turn.usage.cost_usd,
        "input_tokens": turn.usage.input_tokens,
        "output_tokens": turn.usage.output_tokens,
    }
    if turn.answer:
        out["answer"] = turn.answer
    if turn.error:
        out["error"] = turn.error
    return out


def conversation_summary(conversation: cpb.Conversation) -> dict[str, Any]:
    """What an agent needs of a conversation: its turns with answers and cost, and the total."""
    turns = [turn_summary(t) for t in conversation.turns]
    return {
        "conversation_id": conversation.id,
        "agent": conversation.agent,
        "title": conversation.title,
        "labels": dict(conversation.labels),
        "turn_count": conversation.turn_count,
        "cost_usd": conversation.usage.cost_usd,
        "turns": turns,
        **({"last_turn": turns[-1]} if turns else {}),
    }


def _text(arguments: dict[str, Any], name: str) -> str:
    value = arguments.get(name, "")
    if not isinstance(value, str) or not value.strip():
        raise ConversationToolFailed(f"{name}: must be a non-empty string")
    return value


class ConversationTools:
    """The conversation tools' calls, through the gRPC servicers."""

    def __init__(self, servicers: Servicers, wait_for_task: Waiter) -> None:
        self.servicers = servicers
        self._wait_for_task = wait_for_task

    async def start(
        self,
        arguments: dict[str, Any],
        context: HttpCallContext,
        labels: dict[str, str],
        seconds: float,
    ) -> dict[str, Any]:
        options = arguments.get("options", {})
        if not isinstance(options, dict):
            raise ConversationToolFailed("options: must be a JSON object")
        title = arguments.get("title", "")
        if not isinstance(title, str):
            raise ConversationToolFailed("title: must be a string")
        request = cpb.CreateConversationRequest(
            agent=_text(arguments, "agent"),
            message=_text(arguments, "message"),
            title=title,
            labels=labels,
            input_json=json.dumps(options),
        )
        wait = _wait(arguments)
        created = await self.servicers.conversations.CreateConversation(request, context)
        return await self._answer(created.id, created.turns[-1].task_id, wait, seconds, context)

    async def send(
        self, arguments: dict[str, Any], context: HttpCallContext, seconds: float
    ) -> dict[str, Any]:
        conversation_id = _text(arguments, "conversation_id")
        request = cpb.SendMessageRequest(
            conversation_id=conversation_id, message=_text(arguments, "message")
        )
        wait = _wait(arguments)
        stream = self.servicers.conversations.SendMessage(request, context)
        async with contextlib.aclosing(stream):  # type: ignore[type-var]
            first = await anext(aiter(stream))  # the new turn, with its task
        return await self._answer(conversation_id, first.turn.task_id, wait, seconds, context)

    async def _answer(
        self,
        conversation_id: str,
        task_id: str,
        wait: bool,
        seconds: float,
        context: HttpCallContext,
    ) -> dict[str, Any]:
        """The conversation once the turn run by `task_id` ended (or `seconds` passed)."""
        waited = await self._wait_for_task(task_id, seconds, context) if wait else {}
        summary = await self.get({"conversation_id": conversation_id}, context)
        if "waited" in waited:
            summary["waited"] = waited["waited"]
        return summary

    async def get(self, arguments: dict[str, Any], context: HttpCallContext) -> dict[str, Any]:
        request = cpb.GetConversationRequest(conversation_id=_text(arguments, "conversation_id"))
        conversation = await self.servicers.conversations.GetConversation(request, context)
        return conversation_summary(conversation)


def _wait(arguments: dict[str, Any]) -> bool:
    wait = arguments.get("wait", True)
    if not isinstance(wait, bool):
        raise ConversationToolFailed("wait: must be true or false")
    return wait
