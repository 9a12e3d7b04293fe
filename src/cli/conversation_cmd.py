"""`taskrun chat AGENT` and `taskrun conversation list|get|delete`.

`chat` is an interactive prompt: each line read from stdin is the next message of the
conversation; the answer streams to stdout as it is written, tool calls and the end of each turn
(status, tokens, cost) to stderr. Ctrl-C while an answer streams cancels that turn (its task) and
the chat goes on; Ctrl-C at the prompt, or end of input (Ctrl-D), ends the chat, and
`--conversation ID` returns to it later, on whichever workers are there then.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from typing import Any

import grpc

from taskrun.cli import output
from taskrun.cli.client import Client, OutputReceived, TurnEnded, TurnStarted
from taskrun.cli.running import main_module as _cli
from taskrun.core.errors import InvalidArgument
from taskrun.core.models import Conversation, OutputKind, Turn
from taskrun.core.validation import parse_label_args, validate_input

CHAT_HELP = (
    "Each line you type is one message. Ctrl-C while an answer streams cancels that turn; the "
    "chat goes on (a cancelled or failed turn stays in the history, and the next message "
    "continues from it). Ctrl-C at the prompt or Ctrl-D ends the chat; return with "
    "--conversation ID."
)


def register(subparsers: Any) -> None:
    """Add `chat` and `conversation` to the `taskrun` parser."""
    cli = _cli()
    p = cli._leaf(
        subparsers,
        "chat",
        cmd_chat,
        help="talk with an agent: an interactive conversation kept by the control plane",
        description="Start a conversation with AGENT (or return to one with --conversation) "
        "and send each line of input as the next message.",
        epilog=CHAT_HELP,
    )
    p.add_argument("agent", metavar="AGENT", nargs="?", default="", help="for a new conversation")
    p.add_argument("--conversation", default="", metavar="ID", help="return to this conversation")
    p.add_argument(
        "--input",
        default=None,
        metavar="JSON",
        help='agent options for every turn, a JSON object without "prompt" (e.g. {"cwd": "/src"})',
    )
    p.add_argument("--title", default="", help="default: the start of the first message")
    p.add_argument("--label", action="append", metavar="K=V", help="label (repeat)")
    p.add_argument("--events", action="store_true", help="show tool calls and other events")
    p.add_argument(
        "--allow-unknown-agent",
        action="store_true",
        help="start even if no worker has announced AGENT yet, or no online worker offers the "
        'model asked for (a "model" in --input): the turns wait; without it that is refused',
    )

    group = cli._group(subparsers, "conversation", "conversations with agents, kept by the server")
    p = cli._leaf(group, "list", cmd_list, help="list conversations, newest first")
    p.add_argument("--agent", default="")
    p.add_argument("--label", action="append", metavar="K=V", help="must have it (repeat)")
    p.add_argument("--limit", type=int, default=50, metavar="N")
    cli._add_output(p)
    p = cli._leaf(group, "get", cmd_get, help="show a conversation and its turns in order")
    p.add_argument("conversation_id", metavar="ID")
    cli._add_output(p)
    p = cli._leaf(
        group, "delete", cmd_delete, help="delete a conversation (its tasks stay, as history)"
    )
    p.add_argument("conversation_id", metavar="ID")


# --- documents -----------------------------------------------------------------------------


def turn_doc(turn: Turn) -> dict[str, Any]:
    return {
        "index": turn.index,
        "task_id": turn.task_id,
        "status": output.status_name(turn.status),
        "message": turn.message,
        "answer": turn.answer,
        "tools": output._embedded_json(turn.tools) if turn.tools else [],
        "error": turn.error,
        "usage": output.to_json_value(turn.usage),
        "created_at": turn.created_at.isoformat(),
        "finished_at": turn.finished_at.isoformat() if turn.finished_at else None,
    }


def conversation_doc(c: Conversation, turns: list[Turn] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": c.id,
        "agent": c.agent,
        "title": c.title,
        "labels": c.labels,
        "options": output._embedded_json(c.input) or {},
        "turns": c.turns,
        "usage": output.to_json_value(c.usage),
        "session_id": c.session_id,
        "created_at": c.created_at.isoformat(),
        "updated_at": c.updated_at.isoformat(),
    }
    if turns is not None:
        doc["turn_list"] = [turn_doc(t) for t in turns]
    return doc


def _turn_line(turn: Turn) -> str:
    usage = output.format_usage(turn.usage)
    end = f"turn {turn.index} {output.status_name(turn.status)}"
    if turn.error:
        end += f": {turn.error}"
    return f"[{end} · {usage}]"


# --- commands ------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    labels = parse_label_args(args.label or [], "labels")
    found = _cli()._one_call(
        args, lambda c: c.list_conversations(agent=args.agent, labels=labels, limit=args.limit)
    )
    if args.output == "json":
        _write(output.dumps([conversation_doc(c) for c in found]))
        return 0
    if not found:
        sys.stderr.write("no conversations\n")
        return 0
    rows = [("ID", "AGENT", "TURNS", "COST", "UPDATED", "TITLE")]
    for c in found:
        cost = f"${c.usage.cost_usd:.4f}" if c.usage.cost_usd else output.NONE
        rows.append((c.id, c.agent, str(c.turns), cost, output.format_time(c.updated_at), c.title))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        _write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=False)) + f"  {row[-1]}\n")
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    conversation, turns = _cli()._one_call(args, lambda c: c.get_conversation(args.conversation_id))
    if args.output == "json":
        _write(output.dumps(conversation_doc(conversation, turns)))
        return 0
    c = conversation
    _write(
        f"conversation {c.id}  {c.agent}  {c.title}\n"
        f"  turns {c.turns}  usage {output.format_usage(c.usage)}\n"
        f"  labels {output.format_labels(c.labels)}  updated {output.format_time(c.updated_at)}\n"
    )
    for turn in turns:
        _write(f"\n[{output.format_time(turn.created_at)}] you: {turn.message}\n")
        if turn.answer:
            _write(f"{c.agent}: {turn.answer}\n")
        _write(f"{_turn_line(turn)}  task {turn.task_id}\n")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    _cli()._one_call(args, lambda c: c.delete_conversation(args.conversation_id))
    _write(f"conversation {args.conversation_id} deleted\n")
    return 0


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _note(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


class _Lines:
    """Lines of stdin as an async iterator, read without a thread (so Ctrl-C never waits on one)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._buffer = b""
        self._fd = sys.stdin.fileno()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        data = os.read(self._fd, 65536)
        if not data:
            if self._buffer:
                self.queue.put_nowait(self._buffer.decode(errors="replace"))
            self.queue.put_nowait(None)
            self._loop.remove_reader(self._fd)
            return
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self.queue.put_nowait(line.decode(errors="replace"))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._fd)


def cmd_chat(args: argparse.Namespace) -> int:
    if not args.agent and not args.conversation:
        raise InvalidArgument(
            "give AGENT for a new conversation, or --conversation ID", field="agent"
        )
    options: dict[str, Any] = {}
    if args.input is not None:
        _, options = validate_input(args.input, "--input")
    labels = parse_label_args(args.label or [], "labels")
    client: Client = _cli()._client(args)
    return asyncio.run(_chat(client, args, options, labels))


async def _chat(
    client: Client, args: argparse.Namespace, options: dict[str, Any], labels: dict[str, str]
) -> int:
    loop = asyncio.get_running_loop()
    conversation_id: str = args.conversation
    interactive = sys.stdin.isatty()
    turn_task: asyncio.Task[None] | None = None
    current: dict[str, str] = {}  # the streaming turn's task id, once known
    interrupted = asyncio.Event()
    cancels: set[asyncio.Task[Any]] = set()

    def on_sigint() -> None:
        if turn_task is not None and not turn_task.done():
            task_id = current.get("task_id")
            if task_id and not current.get("cancelling"):
                current["cancelling"] = task_id
                _note("\n^C cancelling this turn (the chat goes on)\n")
                cancel = loop.create_task(
                    client.cancel_task(task_id, "cancelled from the chat (Ctrl-C)")
                )
                cancels.add(cancel)
                cancel.add_done_callback(cancels.discard)
                return
        interrupted.set()

    async def one_turn(message: str) -> None:
        nonlocal conversation_id
        ends_with_newline = True
        stream = client.chat(
            message,
            agent=args.agent,
            conversation_id=conversation_id,
            options=options,
            labels=labels,
            title=args.title,
            allow_unknown_agent=args.allow_unknown_agent,
        )
        async with contextlib.aclosing(stream) as events:
            async for event in events:
                if isinstance(event, TurnStarted):
                    current["task_id"] = event.turn.task_id
                    if event.conversation is not None:
                        conversation_id = event.conversation.id
                        _note(f"conversation {conversation_id} with {event.conversation.agent}\n")
                elif isinstance(event, OutputReceived):
                    chunk = event.chunk
                    if chunk.kind is OutputKind.TEXT:
                        _write(chunk.data)
                        ends_with_newline = chunk.data.endswith("\n")
                    elif args.events:
                        _note(f"  · {output.format_event(chunk.data)}\n")
                elif isinstance(event, TurnEnded):
                    if not ends_with_newline:
                        _write("\n")
                    _note(_turn_line(event.turn) + "\n")

    lines = _Lines()
    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        if conversation_id:
            conversation, turns = await client.get_conversation(conversation_id)
            _note(
                f"conversation {conversation.id} with {conversation.agent}: {conversation.turns} "
                f"turns so far, {output.format_usage(conversation.usage)}\n"
            )
            if turns and turns[-1].answer:
                _note(f"last answer: {turns[-1].answer}\n")
        while True:
            if interactive:
                _note("you> ")
            line_task = asyncio.ensure_future(lines.queue.get())
            stop = asyncio.ensure_future(interrupted.wait())
            await asyncio.wait({line_task, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not line_task.done():
                line_task.cancel()
                break  # Ctrl-C at the prompt
            line = line_task.result()
            if line is None:
                break  # end of input
            if not line.strip():
                continue
            current.clear()
            turn_task = asyncio.ensure_future(one_turn(line))
            stop = asyncio.ensure_future(interrupted.wait())
            await asyncio.wait({turn_task, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not turn_task.done():  # a second Ctrl-C: stop following, end the chat
                turn_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await turn_task
                break
            try:
                turn_task.result()
            except grpc.aio.AioRpcError as exc:  # refused (the last turn still runs, ...)
                if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND):
                    raise
                _note(f"error: {exc.code().name}: {exc.details()}\n")
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        lines.close()
    if conversation_id:
        _note(f"return with: taskrun chat --conversation {conversation_id}\n")
    return 130 if interrupted.is_set() else 0
