"""`task create` flags for what a task asks of its agent's model: output schema, model settings,
cost limit. They fill the policy's `output_schema`, `output_retries`, `model_settings` and
`max_cost_usd`; the control plane validates them (so does `task_spec_from_args`, locally)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from taskrun.core.errors import InvalidArgument
from taskrun.core.models import DEFAULT_OUTPUT_RETRIES, ModelSettings, TaskPolicy
from taskrun.core.text import quoted


def add_model_arguments(p: argparse.ArgumentParser, *, update: bool = False) -> None:
    """The flags; with `update` (`schedule update`) a flag not given is None and keeps what
    it was, a repeatable flag given replaces the whole list, and '' or 0 clears a value."""
    g = p.add_argument_group(
        "model",
        "what the agent asks of its model (agents backed by one: anthropic, openai, "
        "claude_code, support_triage); --append-system-prompt, --env, --mcp-config and the tool "
        "flags are for claude_code"
        + (
            "; only the flags given change (a repeated flag replaces its whole list; '' or 0 "
            "clears a value)"
            if update
            else ""
        ),
    )
    g.add_argument(
        "--output-schema",
        metavar="FILE",
        help="a JSON Schema (file, - = stdin) the result must match: the model is asked for "
        "it and asked again with what did not validate; the worker checks the result",
    )
    g.add_argument(
        "--output-retries",
        type=int,
        default=None if update else DEFAULT_OUTPUT_RETRIES,
        metavar="N",
        help="re-asks after an answer that does not match (0-10, default "
        f"{DEFAULT_OUTPUT_RETRIES})",
    )
    g.add_argument(
        "--system", default=None if update else "", metavar="TEXT", help="the system prompt"
    )
    g.add_argument(
        "--max-tokens",
        type=int,
        default=None if update else 0,
        metavar="N",
        help="the answer's limit",
    )
    g.add_argument(
        "--temperature",
        type=str if update else float,  # on update, '' returns to the agent's default
        metavar="T",
        help="0-1 (Anthropic), 0-2 (OpenAI)" + ("; '' for the agent's default" if update else ""),
    )
    g.add_argument("--stop", action="append", metavar="SEQ", help="a stop sequence (repeat)")
    g.add_argument(
        "--append-system-prompt",
        default=None if update else "",
        metavar="TEXT",
        help="added to Claude Code's own system prompt",
    )
    g.add_argument(
        "--env",
        action="append",
        metavar="K=V",
        help="an environment variable for Claude Code and its tools (repeat; credentials, "
        "endpoints and retries stay the worker's)",
    )
    g.add_argument(
        "--mcp-config",
        metavar="FILE",
        help='MCP servers for Claude Code: {"name": {"command": ...}} or an .mcp.json file',
    )
    g.add_argument("--allowed-tool", action="append", metavar="NAME", help="(repeat)")
    g.add_argument("--disallowed-tool", action="append", metavar="NAME", help="(repeat)")
    g.add_argument(
        "--max-cost",
        type=float,
        default=None if update else 0.0,
        metavar="USD",
        help="the worker stops the run once its reported cost is over USD (usage kept)",
    )


def _read(path: str, flag: str) -> str:
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror}", field=flag) from None


def _temperature(text: str) -> float | None:
    """`schedule update --temperature`: a number, or '' for none (the agent's default; 0 is a
    temperature, so it cannot clear it as 0 clears the other numbers)."""
    if not text.strip():
        return None
    try:
        return float(text)
    except ValueError:
        raise InvalidArgument(
            f"{quoted(text)} is not a number (or '' for the agent's default)",
            field="--temperature",
        ) from None


def _env(items: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise InvalidArgument(
                f"{quoted(item)} must have the form NAME=VALUE", field="policy.model_settings.env"
            )
        env[name] = value
    return env


def apply_model_arguments(args: argparse.Namespace, policy: TaskPolicy) -> TaskPolicy:
    """`policy` with the flags' values (unvalidated: validate_task_spec checks them)."""
    if args.output_schema:
        policy.output_schema = _read(args.output_schema, "--output-schema")
    policy.output_retries = args.output_retries
    policy.max_cost_usd = args.max_cost
    policy.model_settings = ModelSettings(
        system_prompt=args.system,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        stop_sequences=list(args.stop or []),
        append_system_prompt=args.append_system_prompt,
        env=_env(args.env or []),
        mcp_servers=_read(args.mcp_config, "--mcp-config") if args.mcp_config else "",
        allowed_tools=list(args.allowed_tool or []),
        disallowed_tools=list(args.disallowed_tool or []),
    )
    return policy


def update_model_arguments(args: argparse.Namespace, policy: TaskPolicy) -> TaskPolicy | None:
    """A copy of `policy` with the model flags that were given (see add_model_arguments with
    `update`), or None when none was."""
    changed = policy.copy()
    given = False

    def given_flag(name: str) -> bool:
        nonlocal given
        value = getattr(args, name, None)
        given = given or value is not None
        return value is not None

    if given_flag("output_schema"):
        text = args.output_schema
        changed.output_schema = _read(text, "--output-schema") if text else ""
    if given_flag("output_retries"):
        changed.output_retries = args.output_retries
    if given_flag("max_cost"):
        changed.max_cost_usd = args.max_cost
    settings = changed.model_settings
    if given_flag("system"):
        settings.system_prompt = args.system
    if given_flag("max_tokens"):
        settings.max_tokens = args.max_tokens
    if given_flag("temperature"):
        settings.temperature = _temperature(args.temperature)
    if given_flag("stop"):
        settings.stop_sequences = [s for s in args.stop if s]
    if given_flag("append_system_prompt"):
        settings.append_system_prompt = args.append_system_prompt
    if given_flag("env"):
        settings.env = _env([item for item in args.env if item])
    if given_flag("mcp_config"):
        settings.mcp_servers = _read(args.mcp_config, "--mcp-config") if args.mcp_config else ""
    if given_flag("allowed_tool"):
        settings.allowed_tools = [t for t in args.allowed_tool if t]
    if given_flag("disallowed_tool"):
        settings.disallowed_tools = [t for t in args.disallowed_tool if t]
    return changed if given else None
