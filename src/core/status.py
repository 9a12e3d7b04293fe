"""Task, Run and Worker statuses, and the legal transitions between them, as data.

Every layer asks this module whether a transition is allowed instead of deciding it again.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum


class TaskStatus(IntEnum):
    PENDING = 1
    RUNNING = 2
    COMPLETED = 3
    FAILED = 4
    CANCELLED = 5

    @property
    def terminal(self) -> bool:
        return self in TASK_TERMINAL


class RunStatus(IntEnum):
    PENDING = 1
    ASSIGNED = 2
    RUNNING = 3
    COMPLETED = 4
    FAILED = 5
    CANCELLED = 6
    LOST = 7

    @property
    def terminal(self) -> bool:
        return self in RUN_TERMINAL

    @property
    def active(self) -> bool:
        """Held by a worker: assigned or running."""
        return self in (RunStatus.ASSIGNED, RunStatus.RUNNING)


class Fault(IntEnum):
    """Whose fault a failed run is (the values of the protocol's RunFault).

    WORKER: the worker cannot run such tasks now (credentials missing or refused, an SDK or CLI
    missing or crashing, the provider unreachable or failing after retries); it counts towards
    the worker's quarantine. TASK: the task asked for what cannot be done (input the agent
    refuses, an output schema the model never met, its cost limit, a request the API refused,
    the agent's own reported failure); it says nothing about the worker. UNKNOWN (a worker that
    does not say) counts as the worker's, as before workers said.
    """

    UNKNOWN = 0
    WORKER = 1
    TASK = 2


class WorkerStatus(IntEnum):
    ONLINE = 1
    DRAINING = 2
    OFFLINE = 3
    REVOKED = 4


TASK_TERMINAL = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})
RUN_TERMINAL = frozenset(
    {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.LOST}
)

TASK_TRANSITIONS: Mapping[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.PENDING: frozenset({TaskStatus.RUNNING, TaskStatus.FAILED, TaskStatus.CANCELLED}),
    # RUNNING -> PENDING: the run was lost or failed and another attempt waits for a worker.
    TaskStatus.RUNNING: frozenset(
        {
            TaskStatus.PENDING,
            TaskStatus.COMPLETED,
            TaskStatus.FAILED,
            TaskStatus.CANCELLED,
        }
    ),
    # Terminal is terminal: the next message of a conversation is a new task (a new turn).
    TaskStatus.COMPLETED: frozenset(),
    TaskStatus.FAILED: frozenset(),
    TaskStatus.CANCELLED: frozenset(),
}

RUN_TRANSITIONS: Mapping[RunStatus, frozenset[RunStatus]] = {
    RunStatus.PENDING: frozenset({RunStatus.ASSIGNED, RunStatus.CANCELLED, RunStatus.FAILED}),
    RunStatus.ASSIGNED: frozenset(
        {
            RunStatus.RUNNING,
            # a fast run may report its end before its start reached the server
            RunStatus.COMPLETED,
            RunStatus.FAILED,
            RunStatus.CANCELLED,
            RunStatus.LOST,
        }
    ),
    RunStatus.RUNNING: frozenset(
        {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.LOST}
    ),
    RunStatus.COMPLETED: frozenset(),
    RunStatus.FAILED: frozenset(),
    RunStatus.CANCELLED: frozenset(),
    RunStatus.LOST: frozenset(),
}


def task_can_move(current: TaskStatus, new: TaskStatus) -> bool:
    return new in TASK_TRANSITIONS[current]


def run_can_move(current: RunStatus, new: RunStatus) -> bool:
    return new in RUN_TRANSITIONS[current]


def task_status_for_run(run_status: RunStatus) -> TaskStatus | None:
    """The task status a run's terminal outcome leads to when no retry follows."""
    return {
        RunStatus.COMPLETED: TaskStatus.COMPLETED,
        RunStatus.FAILED: TaskStatus.FAILED,
        RunStatus.CANCELLED: TaskStatus.CANCELLED,
        RunStatus.LOST: TaskStatus.FAILED,
    }.get(run_status)
