"""A RunContext (core.agent protocol) that records what an agent emits, for direct agent tests."""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskrun.core.agent import CostLimitReached, SubtaskAccess
from taskrun.core.ids import RunId, TaskId
from taskrun.core.models import RunOptions, TurnContext, Usage
from taskrun.worker.workspace import Workspaces

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
    model: str = ""
    subtasks: SubtaskAccess | None = None
    options: RunOptions = field(default_factory=RunOptions)
    reported: list[Usage] = field(default_factory=list)  # every report_usage, in order
    texts: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    first_text: asyncio.Event = field(default_factory=asyncio.Event)
    # the worker's workspace settings (the real class); by default a fresh root, nothing
    # protected, and any `cwd` under the system's temporary directory allowed (tests' tmp_path)
    workspaces: Workspaces | None = None
    workspace: Path = field(default_factory=Path)

    def __post_init__(self) -> None:
        if self.workspaces is None:
            self.workspaces = Workspaces.create(
                Path(tempfile.mkdtemp(prefix="taskrun-ws-")), (), [Path(tempfile.gettempdir())]
            )
        self.workspace = self.workspaces.open(self.run_id)

    @property
    def protected_paths(self) -> tuple[Path, ...]:
        assert self.workspaces is not None
        return self.workspaces.protected

    @property
    def sandbox(self) -> bool:
        assert self.workspaces is not None
        return self.workspaces.sandbox

    def working_directory(self, requested: str | None) -> Path:
        assert self.workspaces is not None
        return self.workspaces.cwd_for(requested, self.workspace)

    def supervised_program(self, program: str) -> str:
        return program  # tests of one agent run without a worker around it

    async def report_usage(self, usage: Usage) -> None:
        self.reported.append(dataclasses.replace(usage))
        limit = self.options.max_cost_usd
        if limit and usage.cost_usd > limit:
            raise CostLimitReached(dataclasses.replace(usage), limit)

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
