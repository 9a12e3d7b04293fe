"""What the control plane can say about agents before a task is stored, and about a pending task
while it waits: computed at read time from the catalog and the workers connected now."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from datetime import datetime

from taskrun.controlplane.dispatcher import backends_fit
from taskrun.core.errors import InvalidArgument
from taskrun.core.models import Task, Worker, asked_model
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


def _backend_text(provider: str, model: str) -> str:
    return " ".join(part for part in (provider, model) if part)


def offered_backends(agent: str, workers: Iterable[Worker]) -> list[tuple[str, str]]:
    """(provider, model) of every backend online workers announce for the agent, where they can
    run it now."""
    return sorted(
        {
            (b.provider, b.model_name)
            for w in workers
            if w.status is WorkerStatus.ONLINE
            for a in w.agents
            if a.name == agent and a.available
            for b in a.backends
        }
    )


def check_offered(
    agent: str,
    provider: str,
    model: str,
    workers: Collection[Worker],
    prefix: str = "",
    model_field: str = "policy.required_model",
) -> None:
    """Refuse a provider/model requirement that no online worker meets for the agent, naming
    the field (`model_field` when the model is what is missing: the input's `model` binds like
    the required model) and what is offered. Passes when no online worker offers the agent at
    all (the task waits for one, showing why) or nothing is required."""
    if not (provider or model):
        return
    offers_agent = False
    for w in workers:  # stops at the first worker that meets it: one, among thousands, will do
        if w.status is not WorkerStatus.ONLINE:
            continue
        for a in w.agents:
            if a.name != agent:
                continue
            offers_agent = True
            if a.available and backends_fit(
                provider, model, [(b.provider, b.model_name) for b in a.backends]
            ):
                return
    if not offers_agent:
        return
    offered = offered_backends(agent, workers)
    field = prefix + (model_field if model else "policy.required_provider")
    listed = ", ".join(f"{p}/{m}" for p, m in offered) or "none (no online worker can run it now)"
    raise InvalidArgument(
        f"no online worker offers a {_backend_text(provider, model)} model backend for agent "
        f"{agent!r} (offered: {listed}); submit anyway with allow_unknown_agent "
        "(`--allow-unknown-agent`) to let it wait",
        field=field,
    )


def _could_take(
    worker: Worker, agent: str, labels: Mapping[str, str], provider: str, model: str
) -> bool:
    """Whether the worker is online and offers the agent, available, with the labels and a
    backend that fit (what `waiting_reason` checks one by one to say which is missing)."""
    if worker.status is not WorkerStatus.ONLINE:
        return False
    if labels and any(worker.labels.get(k) != v for k, v in labels.items()):
        return False
    return any(
        a.name == agent
        and a.available
        and backends_fit(provider, model, [(b.provider, b.model_name) for b in a.backends])
        for a in worker.agents
    )


def waiting_reason(
    task: Task,
    workers: Collection[Worker],
    quarantined_until: Callable[[Worker], datetime | None] = lambda w: None,
) -> str:
    """Why a PENDING task has no worker: the first requirement no online worker meets.

    "" when the task is not pending or some online worker could take it (it waits for a free
    slot, its retry backoff, or the next dispatch round).
    """
    if task.status is not TaskStatus.PENDING:
        return ""
    policy = task.policy
    provider, model = policy.required_provider, asked_model(policy.required_model, task.input)
    required = policy.required_labels
    for w in workers:  # the common case, found at the first worker that could take it
        if _could_take(w, task.agent, required, provider, model) and quarantined_until(w) is None:
            return ""
    online = [w for w in workers if w.status is WorkerStatus.ONLINE]
    offering = [(w, a) for w in online for a in w.agents if a.name == task.agent]
    wanted = f"agent {task.agent!r}"
    if not offering:
        return f"no online worker offers {wanted}"
    candidates = [(w, a) for w, a in offering if a.available]
    if not candidates:
        why = "; ".join(f"{w.id}: {a.unavailable_reason}" for w, a in offering[:5])
        return f"no online worker can run {wanted} now ({why})"
    if policy.required_labels:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(policy.required_labels.items()))
        wanted += f" with label {labels}"
        candidates = [
            (w, a)
            for w, a in candidates
            if all(w.labels.get(k) == v for k, v in policy.required_labels.items())
        ]
        if not candidates:
            return f"no online worker offers {wanted}"
    if provider or model:
        wanted += f" with a {_backend_text(provider, model)} model backend"
        candidates = [
            (w, a)
            for w, a in candidates
            if backends_fit(provider, model, [(b.provider, b.model_name) for b in a.backends])
        ]
        if not candidates:
            return f"no online worker offers {wanted}"
    held = [(w, quarantined_until(w)) for w, _ in candidates]
    if all(until is not None for _, until in held):
        why = "; ".join(f"{w.id} until {until:%H:%M:%S} UTC" for w, until in held[:5])
        return f"every online worker that offers {wanted} is quarantined ({why})"
    return ""
