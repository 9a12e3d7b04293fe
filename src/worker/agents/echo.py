"""The built-in `echo` agent: streams its input text back in chunks, for tests and demos."""

from __future__ import annotations

import asyncio
import json

from taskrun.core.agent import AgentError, AgentResult, RunContext
from taskrun.core.models import AgentSpec, ModelBackend

INPUT_SCHEMA = {
    "type": "object",
    "properties": {
        "text": {"type": "string", "description": "what to send back"},
        "chunks": {"type": "integer", "minimum": 1, "maximum": 100000, "default": 1},
        "delay": {"type": "number", "minimum": 0, "maximum": 3600, "default": 0},
        "fail": {"type": "string", "description": "fail the run with this message at the end"},
    },
    "additionalProperties": False,
}


class EchoAgent:
    spec = AgentSpec(
        name="echo",
        description="Streams its input text back in chunks (optional delay between chunks).",
        backends=(ModelBackend(provider="none", model_name="echo"),),
        input_schema=json.dumps(INPUT_SCHEMA),
    )

    async def run(self, ctx: RunContext) -> AgentResult:
        text = ctx.input.get("text", "")
        chunks = ctx.input.get("chunks", 1)
        delay = ctx.input.get("delay", 0)
        if not isinstance(text, str):
            raise AgentError("input.text must be a string")
        if not isinstance(chunks, int) or not 1 <= chunks <= 100_000:
            raise AgentError("input.chunks must be an integer from 1 to 100000")
        if not isinstance(delay, int | float) or not 0 <= delay <= 3600:
            raise AgentError("input.delay must be a number of seconds from 0 to 3600")
        size = max(1, -(-len(text) // chunks))
        pieces = [text[i : i + size] for i in range(0, len(text), size)] or [""]
        pieces += [""] * (chunks - len(pieces)) if len(text) < chunks else []
        for i, piece in enumerate(pieces):
            if i and delay:
                await asyncio.sleep(delay)
            if piece:
                await ctx.emit(piece)
        if "fail" in ctx.input:
            raise AgentError(str(ctx.input["fail"]))
        return AgentResult(result={"chars": len(text), "chunks": len(pieces)})
