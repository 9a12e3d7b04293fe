"""Agents are plugins: the `taskrun.agents` entry-point group maps a name to a class or factory."""

from __future__ import annotations

from importlib.metadata import entry_points

import structlog

from taskrun.core.agent import Agent

log = structlog.get_logger(__name__)

GROUP = "taskrun.agents"


def available_agents() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=GROUP))


def load_agents(names: list[str] | None = None) -> dict[str, Agent]:
    """Instantiate the named agents (all installed ones when `names` is empty)."""
    eps = {ep.name: ep for ep in entry_points(group=GROUP)}
    wanted = names or sorted(eps)
    missing = [n for n in wanted if n not in eps]
    if missing:
        raise ValueError(
            f"unknown agent(s) {', '.join(missing)}; installed: {', '.join(sorted(eps)) or 'none'}"
        )
    agents: dict[str, Agent] = {}
    for name in wanted:
        agent = eps[name].load()()
        if not isinstance(agent, Agent):
            raise TypeError(f"entry point {name!r} did not produce an agent (spec + async run)")
        if agent.spec.name != name:
            log.warning(
                "agent spec name differs from entry point", entry_point=name, spec=agent.spec.name
            )
        agents[name] = agent
    return agents
