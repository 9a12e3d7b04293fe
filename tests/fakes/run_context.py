"""A RunContext (core.agent protocol) that records what an agent emits, for direct agent tests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from taskrun.core.ids import RunId, TaskId
from taskrun.core.models import TurnContext

TASK_ID = TaskId("task-test")
RUN_ID = RunId("run-test")


@dataclass
class RecordingContext:
    input: dict[str, Any]
    resume_session_id: str = ""
    prompt: str = ""
    conversation: TurnContext | None = None
    task_id: TaskId = TASK_ID
    run_id: RunId = RUN_ID
    attempt: int = 1
    fencing_token: int = 1
    texts: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    first_text: asyncio.Event = field(default_factory=asyncio.Event)

    def supervised_program(self, program: str) -> str:
        return program  # tests of one agent run without a worker around it

    async def emit(self, text: str) -> None:
        self.texts.append(text)
        self.first_text.set()

    async def event(self, type: str, **data: Any) -> None:
        self.events.append({"type": type, **data})

    @property
    def output(self) -> str:
        return "".join(self.texts)

    def events_of(self, type: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == type]
