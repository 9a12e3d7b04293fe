"""Flags of `taskrun server` and `taskrun worker run` about agents, worker health and budgets.

Server: --dispatch-spread (how many workers a burst of runs goes to, controlplane.dispatcher),
--quarantine-after / --fast-failure / --quarantine-base / --quarantine-max (the circuit
breaker of controlplane.health) and --label-budget / --schedule-budget (daily cost caps, also
TASKRUN_LABEL_BUDGETS and TASKRUN_SCHEDULE_BUDGETS, comma-separated). Worker: --models (the
models its Anthropic-backed agents announce and accept, TASKRUN_ANTHROPIC_MODELS) and
--agent-check-interval (how often it re-checks what its agents can run).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from taskrun.controlplane.budgets import parse_caps


def _float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not (number > 0 and number < float("inf")):
        raise argparse.ArgumentTypeError(f"{value!r} must be a number > 0")
    return number


def add_server_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("dispatch, worker health and budgets")
    group.add_argument(
        "--dispatch-spread",
        type=int,
        metavar="N",
        help="runs placed together (a burst of tasks) go to about N workers, several to each, "
        "instead of one to each of as many workers; single tasks always go to the least loaded "
        "(default 4; 0 = one run per worker)",
    )
    group.add_argument(
        "--quarantine-after",
        type=int,
        metavar="N",
        help="quarantine a worker after N runs in a row failed fast (default 5; 0 = never)",
    )
    group.add_argument(
        "--fast-failure",
        type=_float,
        metavar="S",
        help="a run that fails within S seconds of its assignment failed fast (default 10)",
    )
    group.add_argument(
        "--quarantine-base",
        type=_float,
        metavar="S",
        help="the first quarantine, doubled each time the worker fails again (default 30)",
    )
    group.add_argument(
        "--quarantine-max", type=_float, metavar="S", help="the longest quarantine (default 600)"
    )
    group.add_argument(
        "--label-budget",
        action="append",
        metavar="LABEL=VALUE=USD",
        help="tasks with this label may spend USD per UTC day; then they wait for the next day "
        "(repeat; TASKRUN_LABEL_BUDGETS, comma-separated), e.g. team=research=20",
    )
    group.add_argument(
        "--schedule-budget",
        action="append",
        metavar="NAME=USD",
        help="the tasks of this schedule may spend USD per UTC day; then they wait for the next "
        "day (repeat; TASKRUN_SCHEDULE_BUDGETS, comma-separated)",
    )


def _listed(args: argparse.Namespace, name: str, variable: str) -> list[str]:
    given = getattr(args, name, None)
    if given:
        return list(given)
    return [v for v in os.environ.get(variable, "").split(",") if v.strip()]


def server_values(args: argparse.Namespace) -> dict[str, Any]:
    """ServerConfig fields from these flags (ValueError naming a bad budget)."""
    values: dict[str, Any] = {
        "dispatch_spread": getattr(args, "dispatch_spread", None),
        "quarantine_after": getattr(args, "quarantine_after", None),
        "fast_failure": getattr(args, "fast_failure", None),
        "quarantine_base": getattr(args, "quarantine_base", None),
        "quarantine_max": getattr(args, "quarantine_max", None),
    }
    labels = _listed(args, "label_budget", "TASKRUN_LABEL_BUDGETS")
    if labels:
        values["label_budgets"] = parse_caps(labels, "label")
    schedules = _listed(args, "schedule_budget", "TASKRUN_SCHEDULE_BUDGETS")
    if schedules:
        values["schedule_budgets"] = parse_caps(schedules, "schedule")
    return {k: v for k, v in values.items() if v is not None}


def add_worker_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--models",
        metavar="M,M",
        help="the models this worker's Anthropic-backed agents (anthropic, claude_code, "
        "support_triage) announce and accept, the first being their default "
        "(TASKRUN_ANTHROPIC_MODELS; default TASKRUN_ANTHROPIC_MODEL or claude-sonnet-5-5)",
    )
    p.add_argument(
        "--agent-check-interval",
        type=_float,
        metavar="S",
        help="how often to re-check what the agents can run (credentials, SDK, CLI) and tell "
        "the control plane of a change (default 30)",
    )


def worker_values(args: argparse.Namespace) -> dict[str, Any]:
    interval = getattr(args, "agent_check_interval", None)
    return {"agent_check_interval": interval} if interval is not None else {}


def apply_worker_models(args: argparse.Namespace) -> None:
    """--models reaches the agents the way their other settings do: this process's
    environment, read when they check what they can run."""
    models = getattr(args, "models", None)
    if models is not None:
        os.environ["TASKRUN_ANTHROPIC_MODELS"] = models
