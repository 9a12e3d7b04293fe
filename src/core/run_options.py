"""Validation of what a task asks of its agent's model: output schema, model settings, cost limit.

Each rule raises InvalidArgument naming the field (`policy.output_schema_json`,
`policy.model_settings.max_tokens`, ...), so bad input is refused at submission, before any
state changes, rather than failing later on a worker.

jsonschema and referencing are imported where a schema is checked: every command of the CLI
imports this module (through `convert`), and they take about 90 ms to import.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

from taskrun.core.errors import InvalidArgument
from taskrun.core.models import ModelSettings
from taskrun.core.text import quoted, utf8_size

MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 32
MAX_OUTPUT_RETRIES = 10
MAX_TOKENS_LIMIT = 1_000_000
TEMPERATURE_RANGE = (0.0, 2.0)  # OpenAI's range; Anthropic's models take 0 to 1
MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 256
MAX_PROMPT_CHARS = 256 * 1024
MAX_ENV = 64
MAX_ENV_VALUE = 32 * 1024
MAX_TOOLS = 200
MAX_TOOL_CHARS = 512
MAX_MCP_BYTES = 64 * 1024
MAX_COST_USD = 1_000_000.0
# all settings together: they travel in every assignment, next to a 1 MiB input, under gRPC's
# 4 MiB message limit
MAX_SETTINGS_BYTES = 256 * 1024

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# The worker decides these: its credentials and the endpoints they are sent to, where its
# state lives, how often the CLI retries, what runs as a program. A task could otherwise
# send the worker's API key to a server of its choosing (ANTHROPIC_BASE_URL).
_ENV_DENIED_PREFIXES = ("ANTHROPIC_", "TASKRUN_", "AWS_", "GOOGLE_", "CLOUD_ML_", "OPENAI_", "LD_")
_ENV_DENIED = {
    "HOME",
    "PATH",
    "CLAUDE_CONFIG_DIR",
    "CLAUDE_CODE_MAX_RETRIES",
    "CLAUDE_CODE_USE_BEDROCK",
    "CLAUDE_CODE_USE_VERTEX",
    "CLAUDE_CODE_USE_FOUNDRY",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NODE_OPTIONS",
}
_MCP_TYPES = ("stdio", "sse", "http")


def validate_output_schema(text: str, field: str) -> str:
    """The schema as compact JSON text ('' when none): an object that is a valid JSON Schema
    (draft 2020-12)."""
    if not text.strip():
        return ""
    size = utf8_size(text)
    if size > MAX_SCHEMA_BYTES:
        raise InvalidArgument(f"is {size} bytes, over the limit of {MAX_SCHEMA_BYTES}", field=field)
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"is not valid JSON: {exc}", field=field) from None
    if not isinstance(schema, dict):
        raise InvalidArgument(
            f"must be a JSON Schema object, got {type(schema).__name__}", field=field
        )
    _check_nesting_and_refs(schema, field)
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise InvalidArgument(
            f"is not a valid JSON Schema (draft 2020-12): at {where}: {exc.message}", field=field
        ) from None
    try:
        return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    except UnicodeEncodeError:  # pragma: no cover - json.dumps keeps surrogates as text
        raise InvalidArgument("holds text that is not valid Unicode", field=field) from None


def _check_nesting_and_refs(schema: dict[str, Any], field: str) -> None:
    """At most MAX_SCHEMA_DEPTH levels (the validators recurse), and `$ref`s only inside the
    schema: a worker never fetches a schema from elsewhere."""
    stack: list[tuple[Any, int]] = [(schema, 1)]
    refs: list[str] = []
    scoped = False  # a nested $id changes what refs are relative to: leave those to the worker
    while stack:
        item, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise InvalidArgument(
                f"is nested too deep (at most {MAX_SCHEMA_DEPTH} levels)", field=field
            )
        if isinstance(item, dict):
            ref = item.get("$ref")
            scoped = scoped or (depth > 1 and "$id" in item)
            if isinstance(ref, str):
                refs.append(ref)
            if isinstance(ref, str) and not ref.startswith("#"):
                raise InvalidArgument(
                    f"$ref {quoted(ref)} points outside the schema; only local references "
                    "(#/$defs/...) are supported",
                    field=field,
                )
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    if scoped or not refs:
        return
    from referencing import Registry
    from referencing.exceptions import Unresolvable
    from referencing.jsonschema import DRAFT202012

    resolver = Registry().with_resource("", DRAFT202012.create_resource(schema)).resolver()
    for ref in refs:
        try:
            resolver.lookup(ref)
        except Unresolvable:
            raise InvalidArgument(
                f"$ref {quoted(ref)} does not point to anything in the schema", field=field
            ) from None


def validate_output_retries(value: int, field: str) -> int:
    if not 0 <= value <= MAX_OUTPUT_RETRIES:
        raise InvalidArgument(f"must be between 0 and {MAX_OUTPUT_RETRIES}", field=field)
    return value


def validate_max_cost(value: float, field: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(
            f"must be a positive amount of US dollars (0 = no limit), got {value}", field=field
        )
    if value > MAX_COST_USD:
        raise InvalidArgument(f"must be at most {MAX_COST_USD:.0f} USD", field=field)
    return value


def _text(value: str, limit: int, field: str) -> str:
    if len(value) > limit:
        raise InvalidArgument(f"is {len(value)} characters, at most {limit}", field=field)
    return value


def _names(values: list[str], what: str, field: str) -> list[str]:
    if len(values) > MAX_TOOLS:
        raise InvalidArgument(f"has {len(values)} {what}, at most {MAX_TOOLS}", field=field)
    for value in values:
        if not value.strip() or len(value) > MAX_TOOL_CHARS:
            raise InvalidArgument(
                f"{quoted(value)} is not a {what[:-1]} name (1 to {MAX_TOOL_CHARS} characters)",
                field=field,
            )
    return list(values)


def _env(env: dict[str, str], field: str) -> dict[str, str]:
    if len(env) > MAX_ENV:
        raise InvalidArgument(f"has {len(env)} variables, at most {MAX_ENV}", field=field)
    for name, value in env.items():
        if not _ENV_NAME.fullmatch(name):
            raise InvalidArgument(
                f"{quoted(name)} is not an environment variable name (letters, digits and '_', "
                "not starting with a digit)",
                field=field,
            )
        if name in _ENV_DENIED or name.startswith(_ENV_DENIED_PREFIXES):
            raise InvalidArgument(
                f"{quoted(name)} is set by the worker, not by a task (credentials, endpoints, "
                f"state and retries are the worker's: {', '.join(_ENV_DENIED_PREFIXES)}* and "
                f"{', '.join(sorted(_ENV_DENIED))})",
                field=field,
            )
        if len(value) > MAX_ENV_VALUE or "\0" in value:
            raise InvalidArgument(
                f"the value of {quoted(name)} must be at most {MAX_ENV_VALUE} characters, "
                "without NUL",
                field=field,
            )
    return dict(env)


def _mcp_servers(text: str, field: str) -> str:
    if not text.strip():
        return ""
    if utf8_size(text) > MAX_MCP_BYTES:
        raise InvalidArgument(f"is over the limit of {MAX_MCP_BYTES} bytes", field=field)
    try:
        servers: Any = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"is not valid JSON: {exc}", field=field) from None
    if isinstance(servers, dict) and isinstance(servers.get("mcpServers"), dict):
        servers = servers["mcpServers"]  # the file form Claude Code writes (.mcp.json)
    if not isinstance(servers, dict):
        raise InvalidArgument(
            'must be a JSON object of server name to server config ({"name": {"command": ...}})',
            field=field,
        )
    for name, config in servers.items():
        where = f"{field}.{name}"
        if not isinstance(config, dict):
            raise InvalidArgument("must be a JSON object (a server config)", field=where)
        kind = config.get("type", "stdio")
        if kind not in _MCP_TYPES:
            raise InvalidArgument(
                f"type {quoted(str(kind))} is not one of {', '.join(_MCP_TYPES)}", field=where
            )
        key = "command" if kind == "stdio" else "url"
        if not isinstance(config.get(key), str) or not config[key]:
            raise InvalidArgument(f"a {kind} server needs a {key!r} string", field=where)
    return json.dumps(servers, separators=(",", ":"), ensure_ascii=False)


def validate_model_settings(s: ModelSettings, field: str) -> ModelSettings:
    if s.empty:  # most tasks set none: nothing to check, and no encoding to measure
        return ModelSettings()
    if not 0 <= s.max_tokens <= MAX_TOKENS_LIMIT:
        raise InvalidArgument(
            f"must be between 1 and {MAX_TOKENS_LIMIT} (0 = the agent's default), got "
            f"{s.max_tokens}",
            field=f"{field}.max_tokens",
        )
    low, high = TEMPERATURE_RANGE
    if s.temperature is not None and not (
        math.isfinite(s.temperature) and low <= s.temperature <= high
    ):
        raise InvalidArgument(
            f"must be between {low:g} and {high:g}, got {s.temperature}",
            field=f"{field}.temperature",
        )
    if len(s.stop_sequences) > MAX_STOP_SEQUENCES:
        raise InvalidArgument(
            f"has {len(s.stop_sequences)}, at most {MAX_STOP_SEQUENCES}",
            field=f"{field}.stop_sequences",
        )
    for stop in s.stop_sequences:
        if not stop or len(stop) > MAX_STOP_SEQUENCE_CHARS:
            raise InvalidArgument(
                f"each must be 1 to {MAX_STOP_SEQUENCE_CHARS} characters",
                field=f"{field}.stop_sequences",
            )
    checked = ModelSettings(
        system_prompt=_text(s.system_prompt, MAX_PROMPT_CHARS, f"{field}.system_prompt"),
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        stop_sequences=list(s.stop_sequences),
        append_system_prompt=_text(
            s.append_system_prompt, MAX_PROMPT_CHARS, f"{field}.append_system_prompt"
        ),
        env=_env(s.env, f"{field}.env"),
        mcp_servers=_mcp_servers(s.mcp_servers, f"{field}.mcp_servers_json"),
        allowed_tools=_names(s.allowed_tools, "tools", f"{field}.allowed_tools"),
        disallowed_tools=_names(s.disallowed_tools, "tools", f"{field}.disallowed_tools"),
    )
    size = len(json.dumps(dataclasses.asdict(checked)).encode())
    if size > MAX_SETTINGS_BYTES:
        raise InvalidArgument(
            f"take {size} bytes together, over the limit of {MAX_SETTINGS_BYTES}", field=field
        )
    return checked
