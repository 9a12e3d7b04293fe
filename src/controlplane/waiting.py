"""What the control plane can say about agents before a task is stored, and about a pending task
while it waits: computed at read time from the catalog and the workers connected now."""

from __future__ import annotations

from collections.abc import Iterable

from taskrun.core.errors import InvalidArgument
from taskrun.core.models import Task, Worker
from taskrun.core.status import TaskStatus, WorkerStatus


def check_known_agent(agent: str, known: list[str], field: str = "agent") -> None:
    """Refuse an agent that no worker has ever announced, naming the ones that were."""
    if agent in known:
        return
    offered = ", ".join(repr(name) for name in known) if known else "none yet"
    raise InvalidArgument(
        f"no worker has announced an agent {agent!r} (known agents: {offered}); start a worker "
        "that offers it, or submit anyway with allow_unknown_agent (`--allow-unknown-agent`)",
        field=field,
    )


def waiting_reason(task: Task, workers: Iterable[Worker]) -> str:
    """Why a PENDING task has no worker: the first requirement no online worker meets.

    "" when the task is not pending or some online worker could take it (it waits for a free
    slot, its retry backoff, or the next dispatch round).
    """
    if task.status is not TaskStatus.PENDING:
        return ""
    policy = task.policy
    candidates = [
        w
        for w in workers
        if w.status is WorkerStatus.ONLINE and any(a.name == task.agent for a in w.agents)
    ]
    wanted = f"agent {task.agent!r}"
    if not candidates:
        return f"no online worker offers {wanted}"
    if policy.required_labels:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(policy.required_labels.items()))
        wanted += f" with label {labels}"
        candidates = [
            w
            for w in candidates
            if all(w.labels.get(k) == v for k, v in policy.required_labels.items())
        ]
        if not candidates:
            return f"no online worker offers {wanted}"
    provider, model = policy.required_provider, policy.required_model
    if provider or model:
        backend = " ".join(part for part in (provider, model) if part)
        wanted += f" with a {backend} model backend"
        candidates = [
            w
            for w in candidates
            for a in w.agents
            if a.name == task.agent
            and any(
                (not provider or b.provider == provider) and (not model or b.model_name == model)
                for b in a.backends
            )
        ]
        if not candidates:
            return f"no online worker offers {wanted}"
    return ""
