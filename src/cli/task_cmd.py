"""`taskrun task ...`: create, list, inspect, cancel, continue and follow tasks.

`register(subparsers)` adds the command group to the `taskrun` parser (src/cli/main.py); the
handlers reuse main's connection flags, client and exit codes. Errors are raised as domain errors
or gRPC errors, which `taskrun`'s main turns into messages and exit codes. `follow_task` prints a
followed task's output and changes, and reconnects (through `Client`) when its stream breaks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc

from taskrun.cli import output
from taskrun.cli.client import Client, TaskChanged, TaskEvent
from taskrun.cli.exits import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    FOLLOW_EXIT_HELP,
    CliError,
    exit_code_for_task,
)
from taskrun.cli.model_opts import add_model_arguments, apply_model_arguments
from taskrun.cli.running import main_module as _cli
from taskrun.cli.task_tree import tree_text
from taskrun.core.models import DEFAULT_MAX_ATTEMPTS, Task, TaskPolicy, TaskSpec
from taskrun.core.status import TaskStatus
from taskrun.core.validation import parse_label_args, validate_input, validate_task_spec

T = TypeVar("T")


# --- parser ----------------------------------------------------------------------------------


def register(commands: Any) -> None:
    """`taskrun task create|list|get|cancel|continue|logs`."""
    cli = _cli()
    task = cli._group(commands, "task", "create, inspect, follow and cancel tasks")
    p = cli._leaf(
        task,
        "create",
        cmd_task_create,
        help="submit a task",
        description="Submit a task and print its id (or, with --output json, the task).",
        epilog=FOLLOW_EXIT_HELP,
    )
    p.add_argument("agent", metavar="AGENT")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--input", metavar="JSON", help="the input, a JSON object (default {})")
    source.add_argument("--input-file", metavar="PATH", help="read the input from PATH (- = stdin)")
    p.add_argument("--label", action="append", metavar="K=V", help="a task label (repeat)")
    p.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    p.add_argument("--timeout", type=cli.positive_float, metavar="S", help="run timeout in seconds")
    p.add_argument(
        "--max-attempts",
        type=cli.attempts_arg,
        default=0,  # 0 on the wire asks for the server's default
        metavar="N",
        help="at least 1 (default: the server's, 3)",
    )
    p.add_argument("--idempotency-key", default="", metavar="K")
    p.add_argument(
        "--require-label",
        action="append",
        metavar="K=V",
        help="only workers with this label may run it (repeat)",
    )
    p.add_argument(
        "--queue-timeout",
        type=cli.positive_float,
        metavar="S",
        help="fail if no worker takes it within S seconds",
    )
    p.add_argument(
        "--retry-on-failure", action="store_true", help="retry failed runs too, not only lost ones"
    )
    p.add_argument(
        "--require-provider",
        default="",
        metavar="P",
        help="only workers whose AGENT has a model backend of this provider (e.g. anthropic); "
        "refused when no online worker offers it (unless --allow-unknown-agent)",
    )
    p.add_argument(
        "--require-model",
        default="",
        metavar="M",
        help="run on this model: only workers whose AGENT offers it, and the agent uses it; "
        'refused when no online worker offers it (unless --allow-unknown-agent). A "model" '
        "in the input binds the same way when this is not given",
    )
    p.add_argument(
        "--allow-unknown-agent",
        action="store_true",
        help="submit even if no worker has announced AGENT yet (its workers are not up yet), "
        "or no online worker offers the required provider/model: the task waits and `task get` "
        "says why; without it such a task is refused",
    )
    p.add_argument(
        "--allow-subtasks",
        action="store_true",
        help="give its runs (claude_code) the MCP server with a credential of their own, to "
        "create sub-tasks of this task and read, wait for and cancel them; needs the HTTP API",
    )
    p.add_argument(
        "--max-subtasks",
        type=int,
        default=0,
        metavar="N",
        help="at most N sub-tasks in the whole tree below this task (default: no limit)",
    )
    p.add_argument(
        "--subtask-budget-usd",
        type=float,
        default=0.0,
        metavar="USD",
        help="no new sub-task once the finished ones cost this much, and pending ones fail "
        "(default: no limit)",
    )
    p.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="stream the output until the task ends; the exit status is its outcome",
    )
    add_model_arguments(p)
    cli._add_output(p, stream=True)

    p = cli._leaf(task, "list", cmd_task_list, help="list tasks, newest first")
    p.add_argument(
        "--status",
        action="append",
        type=cli.enum_arg(TaskStatus),
        metavar="S",
        help="pending, running, completed, failed, cancelled (repeat or comma-separate)",
    )
    p.add_argument("--agent", default="")
    p.add_argument("--label", action="append", metavar="K=V", help="must match (repeat)")
    p.add_argument("--worker", default="", metavar="ID")
    p.add_argument("--schedule", default="", metavar="NAME", help="tasks this schedule created")
    p.add_argument("--parent", default="", metavar="ID", help="the sub-tasks of this task")
    p.add_argument("--limit", type=int, default=50, help="page size (default 50, at most 1000)")
    p.add_argument("--page-token", default="", metavar="T")
    p.add_argument("--all", action="store_true", help="fetch every page")
    cli._add_output(p)

    p = cli._leaf(task, "get", cmd_task_get, help="show a task with its policy, runs and result")
    p.add_argument("task_id", metavar="ID")
    cli._add_output(p)

    p = cli._leaf(task, "cancel", cmd_task_cancel, help="cancel a task that has not finished")
    p.add_argument("task_id", metavar="ID")
    p.add_argument("--reason", default="")
    cli._add_output(p)

    p = cli._leaf(
        task,
        "continue",
        cmd_task_continue,
        help="send the next message of the conversation a task belongs to",
        description="Send MESSAGE as the next turn of the conversation task ID belongs to (a "
        "conversation is created around a task that had none). The turn is a new task, on any "
        "worker offering the agent; task ID itself never changes. See also `taskrun chat`.",
        epilog=FOLLOW_EXIT_HELP,
    )
    p.add_argument("task_id", metavar="ID")
    p.add_argument("message", help="the next message")
    p.add_argument("--follow", action="store_true", help="stream the new answer until it ends")
    cli._add_output(p, stream=True)

    p = cli._leaf(
        task,
        "logs",
        cmd_task_logs,
        help="print a task's output",
        description="Print a task's stored output; with -f keep streaming until it ends. "
        'With --output json, one JSON document when it ends ({"task": …, "output": […]}); '
        "with --output jsonl, one JSON object per line as it streams (output chunks and task "
        "changes).",
        epilog=FOLLOW_EXIT_HELP,
    )
    p.add_argument("task_id", metavar="ID")
    p.add_argument("--follow", "-f", action="store_true", help="keep streaming until it ends")
    cli._add_output(p, stream=True)


# --- the submission --------------------------------------------------------------------------


def task_spec_from_args(args: argparse.Namespace) -> TaskSpec:
    """The submission described by `task create` flags, validated locally (InvalidArgument)."""
    if args.input_file:
        try:
            text = sys.stdin.read() if args.input_file == "-" else Path(args.input_file).read_text()
        except OSError as exc:
            raise CliError(f"cannot read --input-file {args.input_file}: {exc.strerror}") from None
    else:
        text = args.input or "{}"
    text, _ = validate_input(text, "input_json")
    spec = TaskSpec(
        agent=args.agent,
        input=text,
        labels=parse_label_args(args.label or [], "labels"),
        policy=TaskPolicy(
            priority=args.priority,
            timeout=args.timeout,
            max_attempts=args.max_attempts,
            idempotency_key=args.idempotency_key,
            required_labels=parse_label_args(args.require_label or [], "policy.required_labels"),
            queue_timeout=args.queue_timeout,
            retry_on_failure=args.retry_on_failure,
            required_provider=args.require_provider,
            required_model=args.require_model,
            allow_subtasks=args.allow_subtasks,
            max_subtasks=args.max_subtasks,
            subtask_budget_usd=args.subtask_budget_usd,
        ),
    )
    apply_model_arguments(args, spec.policy)
    # max_attempts 0 asks for the server's default; check the rest as the server would.
    check = replace(
        spec,
        policy=replace(spec.policy, max_attempts=spec.policy.max_attempts or DEFAULT_MAX_ATTEMPTS),
    )
    validate_task_spec(check)
    return spec


# --- streaming -------------------------------------------------------------------------------


OnReconnect = Callable[[grpc.aio.AioRpcError | None], None]


@dataclass
class FollowState:
    """What a follow loop has seen, for the Ctrl-C message and the exit status."""

    task_id: str = ""
    last: Task | None = None


def _printer(args: argparse.Namespace) -> output.StreamPrinter | output.DocumentPrinter:
    """How a followed task is printed: text, one JSON document (json), or JSON lines (jsonl)."""
    if args.output == "json":
        return output.DocumentPrinter(sys.stdout)
    return output.StreamPrinter(sys.stdout, sys.stderr, json_lines=args.output == "jsonl")


async def follow_task(
    client: Client,
    task_id: str,
    printer: output.StreamPrinter | output.DocumentPrinter,
    state: FollowState,
    *,
    follow: bool,
    events: Callable[[OnReconnect], AsyncGenerator[TaskEvent, None]] | None = None,
    announce: bool = False,
) -> int:
    """Print a task's output; with follow, until it ends (from `events` when given, e.g. a
    task created on the stream that follows it). Returns the exit status."""
    state.task_id = task_id

    def on_reconnect(error: grpc.aio.AioRpcError | None) -> None:
        printer.break_line()  # a note never continues a line of the task's output
        if error is None:
            sys.stderr.write("reconnected\n")
        else:
            code = error.code().name if error.code() else "UNAVAILABLE"
            sys.stderr.write(f"lost the connection to the server ({code}); reconnecting…\n")
        sys.stderr.flush()

    try:
        stream = (
            client.follow(task_id, follow=follow, include_events=True, on_reconnect=on_reconnect)
            if events is None
            else events(on_reconnect)
        )
        async with contextlib.aclosing(stream):
            async for event in stream:
                if isinstance(event, TaskChanged):
                    state.last = event.task
                    if not state.task_id:  # created on this stream
                        state.task_id = event.task.id
                        if announce:
                            sys.stderr.write(
                                f"task {event.task.id} created; following its output\n"
                            )
                printer.event(event)
    except grpc.aio.AioRpcError:
        printer.break_line()  # the error line starts on a line of its own
        raise
    if not follow:
        if isinstance(printer, output.DocumentPrinter) and state.last is not None:
            printer.finish(state.last)
        return EXIT_OK
    if state.last is None or not state.last.status.terminal:
        state.last, _ = await client.get_task(state.task_id)
    printer.finish(state.last)
    return exit_code_for_task(state.last.status)


def _following(run: Callable[[], Coroutine[Any, Any, int]], state: FollowState) -> int:
    """Run a command that may follow a task; Ctrl-C stops following, not the task."""
    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        return _stopped_following(state)


def _stopped_following(state: FollowState) -> int:
    if state.task_id:
        sys.stderr.write(
            f"\nstopped following {state.task_id}; the task keeps running.\n"
            f"cancel it with: taskrun task cancel {state.task_id}\n"
        )
    return EXIT_INTERRUPTED


# --- commands --------------------------------------------------------------------------------


def cmd_task_create(args: argparse.Namespace) -> int:
    cli = _cli()
    spec = task_spec_from_args(args)
    client: Client = cli._client(args)
    state = FollowState()

    async def run() -> int:
        async with client:
            if args.follow:

                def events(on_reconnect: OnReconnect) -> AsyncGenerator[TaskEvent, None]:
                    return client.submit_and_follow(
                        spec,
                        include_events=True,
                        allow_unknown_agent=args.allow_unknown_agent,
                        on_reconnect=on_reconnect,
                    )

                return await follow_task(
                    client,
                    "",
                    _printer(args),
                    state,
                    follow=True,
                    events=events,
                    announce=args.output == "table",
                )
            task = await client.submit(spec, allow_unknown_agent=args.allow_unknown_agent)
            if not args.follow:
                if args.output == "table":
                    cli._write(f"{task.id}\n")
                else:
                    indent = None if args.output == "jsonl" else 2
                    cli._write(output.dumps(output.task_doc(task), indent=indent))
                return EXIT_OK
            if args.output == "table":
                sys.stderr.write(f"task {task.id} created; following its output\n")
            return await follow_task(client, task.id, _printer(args), state, follow=True)

    return _following(run, state)


def cmd_task_list(args: argparse.Namespace) -> int:
    cli = _cli()
    statuses = cli.flatten(args.status)
    labels = parse_label_args(args.label or [], "labels")
    client: Client = cli._client(args)

    async def run() -> tuple[list[Task], str]:
        async with client:
            if args.all:
                tasks = [
                    t
                    async for t in client.iter_tasks(
                        statuses=statuses,
                        agent=args.agent,
                        labels=labels,
                        worker_id=args.worker,
                        page_size=min(max(args.limit, 1), 1000),
                        schedule=args.schedule,
                        parent_task_id=args.parent,
                    )
                ]
                return tasks, ""
            return await client.list_tasks(
                statuses=statuses,
                agent=args.agent,
                labels=labels,
                worker_id=args.worker,
                limit=args.limit,
                page_token=args.page_token,
                schedule=args.schedule,
                parent_task_id=args.parent,
            )

    tasks, token = asyncio.run(run())
    if args.output == "json":
        cli._write(
            output.dumps({"tasks": [output.task_doc(t) for t in tasks], "next_page_token": token})
        )
        return EXIT_OK
    cli._write(output.tasks_table(tasks, cli._now()) if tasks else "")
    if not tasks:
        sys.stderr.write("no tasks\n")
    if token:
        sys.stderr.write(f"more tasks: repeat with --page-token {token} (or use --all)\n")
    return EXIT_OK


TASK_ID_PREFIX = "tsk_"
TASK_ID_LENGTH = len(TASK_ID_PREFIX) + 26
MAX_CANDIDATES_SHOWN = 5


async def resolve_task_id(client: Client, text: str) -> str:
    """A full task id as given, or the one task whose id starts with `text` (`tsk_` optional),
    like git's short hashes. An ambiguous prefix is a usage error listing the matches; one that
    matches nothing is sent as it is (the server answers NOT_FOUND). Prefixes are looked up by
    listing the tasks (every page), so a full id is cheaper.
    """
    if len(text) == TASK_ID_LENGTH and text.startswith(TASK_ID_PREFIX):
        return text
    if not text:
        raise CliError("task id: must not be empty")
    prefix = text if text.startswith(TASK_ID_PREFIX) else TASK_ID_PREFIX + text
    matches = [t.id async for t in client.iter_tasks(page_size=1000) if t.id.startswith(prefix)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        return text  # the server answers NOT_FOUND naming it
    shown = ", ".join(matches[:MAX_CANDIDATES_SHOWN])
    extra = len(matches) - MAX_CANDIDATES_SHOWN
    more = f" and {extra} more" if extra > 0 else ""
    raise CliError(
        f"task id: {text!r} is ambiguous, {len(matches)} tasks match: {shown}{more}; "
        "give more characters"
    )


def _task_call(args: argparse.Namespace, call: Callable[[Client, str], Awaitable[T]]) -> T:
    """`_one_call` for a command naming a task by id or unique prefix (`args.task_id`)."""
    result: T = _cli()._one_call(args, lambda c: _with_task_id(c, args.task_id, call))
    return result


async def _with_task_id(
    client: Client, text: str, call: Callable[[Client, str], Awaitable[T]]
) -> T:
    return await call(client, await resolve_task_id(client, text))


def cmd_task_get(args: argparse.Namespace) -> int:
    cli = _cli()
    task, runs, below = _task_call(args, lambda c, task_id: c.get_task_tree(task_id))
    if args.output == "json":
        doc = output.task_doc(task, runs)
        if below:
            doc["subtasks"] = [output.task_doc(t) for t in below]
        cli._write(output.dumps(doc))
    else:
        cli._write(output.task_detail(task, runs, cli._now()) + tree_text(task, below))
    return EXIT_OK


def cmd_task_cancel(args: argparse.Namespace) -> int:
    cli = _cli()
    task = _task_call(args, lambda c, task_id: c.cancel_task(task_id, args.reason))
    if args.output == "json":
        cli._write(output.dumps(output.task_doc(task)))
    else:
        cli._write(f"task {task.id} {output.status_name(task.status)}\n")
    return EXIT_OK


def cmd_task_continue(args: argparse.Namespace) -> int:
    cli = _cli()
    client: Client = cli._client(args)
    state = FollowState()

    async def run() -> int:
        async with client:
            task_id = await resolve_task_id(client, args.task_id)
            task = await client.continue_task(task_id, args.message)
            if not args.follow:
                if args.output == "json":
                    cli._write(output.dumps(output.task_doc(task)))
                else:
                    cli._write(
                        f"task {task.id} is turn {task.turn} of conversation "
                        f"{task.conversation_id}\n"
                    )
                return EXIT_OK
            return await follow_task(client, task.id, _printer(args), state, follow=True)

    return _following(run, state)


def cmd_task_logs(args: argparse.Namespace) -> int:
    cli = _cli()
    client: Client = cli._client(args)
    state = FollowState()

    async def run() -> int:
        async with client:
            task_id = await resolve_task_id(client, args.task_id)
            return await follow_task(client, task_id, _printer(args), state, follow=args.follow)

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
