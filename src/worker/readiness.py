"""What the worker announces it can run: each agent's spec with its readiness applied.

An agent that cannot run here now (no credentials, SDK or CLI missing) is announced with the
reason, so the control plane sends it no runs and operators see why (`taskrun workers get`).
The daemon checks at start and every `agent_check_interval` seconds, and tells the control plane
on the live session when something changed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import structlog

from taskrun.core.agent import Agent, Readiness
from taskrun.core.models import AgentSpec

log = structlog.get_logger(__name__)

MAX_REASON = 1000  # characters; the control plane refuses longer reasons


def readiness_of(agent: Agent) -> Readiness:
    """The agent's own check, if it has one (without one it is always ready)."""
    check = getattr(agent, "readiness", None)
    if check is None:
        return Readiness()
    try:
        result = check()
    except Exception as exc:  # a plugin's bug must not take the worker down
        log.warning("an agent's readiness check failed", agent=agent.spec.name, error=repr(exc))
        return Readiness(f"its readiness check failed: {exc}")
    if not isinstance(result, Readiness):
        return Readiness(f"its readiness check returned {type(result).__name__}, not Readiness")
    return result


def announce(agents: Mapping[str, Agent]) -> tuple[AgentSpec, ...]:
    """The specs to announce now, in the worker's order."""
    out = []
    for agent in agents.values():
        ready = readiness_of(agent)
        spec = agent.spec
        out.append(
            dataclasses.replace(
                spec,
                backends=ready.backends if ready.backends is not None else spec.backends,
                unavailable_reason=ready.reason[:MAX_REASON],
            )
        )
    return tuple(out)
