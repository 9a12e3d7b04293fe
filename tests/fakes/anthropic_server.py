"""A fake Anthropic Messages API: a real HTTP server on 127.0.0.1, scripted per test.

It speaks what the real service speaks on `POST /v1/messages`: a JSON `Message` when the request
has no `"stream": true`, otherwise Server-Sent Events in the documented order (`message_start`,
`content_block_start`, `ping`, `content_block_delta`..., `content_block_stop`, `message_delta`,
`message_stop`), sent with chunked transfer encoding. Errors are the API's JSON error bodies
with their status codes (and `retry-after-ms`, so client retries are quick), or an
`event: error` frame in the middle of a stream. Every request is recorded.

Tests script replies in order with `enqueue(...)`; when the queue is empty `default` answers
(a reply, or a function of the request). `api_key` makes the server answer 401 to any other
key, like the real service.

    with FakeAnthropic() as api:
        api.enqueue(Overloaded(), Text(["Hel", "lo"]))
        client = anthropic.AsyncAnthropic(base_url=api.base_url, api_key="k")
"""

from __future__ import annotations

import itertools
import json
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class ToolUse:
    """A `tool_use` content block the model asks for."""

    name: str
    input: dict[str, Any]
    id: str = ""


@dataclass(frozen=True)
class Text:
    """A normal model turn: text streamed in `chunks` (one text_delta each), then tool uses."""

    chunks: list[str] | str = "Hello from the fake API."
    stop_reason: str = ""  # default: "tool_use" when there are tool uses, else "end_turn"
    input_tokens: int = 12
    output_tokens: int | None = None  # default: one per chunk
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    delay: float = 0.0  # seconds before each text delta (a slow stream)
    tool_uses: tuple[ToolUse, ...] = ()

    @property
    def pieces(self) -> list[str]:
        return [self.chunks] if isinstance(self.chunks, str) else list(self.chunks)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


@dataclass(frozen=True)
class Error:
    """An HTTP error with the API's JSON error body."""

    status: int
    type: str
    message: str
    retry_after_ms: int | None = 10


def Overloaded() -> Error:
    return Error(529, "overloaded_error", "Overloaded")


def Unauthorized() -> Error:
    return Error(401, "authentication_error", "invalid x-api-key", retry_after_ms=None)


def InvalidRequest(message: str) -> Error:
    return Error(400, "invalid_request_error", message, retry_after_ms=None)


@dataclass(frozen=True)
class ErrorMidStream:
    """A stream that starts normally, sends `before` as text, then an `event: error` frame."""

    before: list[str] = field(default_factory=lambda: ["partial "])
    type: str = "overloaded_error"
    message: str = "Overloaded"


@dataclass(frozen=True)
class DropMidStream:
    """A stream that starts normally, sends `before` as text, then closes the connection."""

    before: list[str] = field(default_factory=lambda: ["partial "])


Reply = Text | Error | ErrorMidStream | DropMidStream
Responder = Callable[["RecordedRequest"], Reply]


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: Any
    peer: tuple[str, int] = ("", 0)  # the client's address: one per connection

    @property
    def stream(self) -> bool:
        return isinstance(self.body, dict) and bool(self.body.get("stream"))

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages", [])) if isinstance(self.body, dict) else []

    def last_user_text(self) -> str:
        """The text of the last user message (string content or its text blocks)."""
        for message in reversed(self.messages):
            if message.get("role") != "user":
                continue
            content = message.get("content")
            if isinstance(content, str):
                return content
            texts = [b.get("text", "") for b in content or [] if b.get("type") == "text"]
            if texts:
                return "\n".join(texts)
        return ""

    def tool_results(self) -> list[dict[str, Any]]:
        """The tool_result blocks of the last user message."""
        for message in reversed(self.messages):
            if message.get("role") == "user" and isinstance(message.get("content"), list):
                return [b for b in message["content"] if b.get("type") == "tool_result"]
        return []


_ids = itertools.count(1)


class FakeAnthropic:
    """The server; start/stop it, or use it as a context manager."""

    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.default: Reply | Responder = Text()
        self.requests: list[RecordedRequest] = []
        self.streams_started = 0
        self.streams_finished = 0
        self.streams_aborted = 0  # the client went away mid-stream
        self.client_gone = threading.Event()
        self._queue: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FakeAnthropic:
        fake = self

        class Handler(_Handler):
            owner = fake

        server = _Server(("127.0.0.1", 0), Handler)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closing.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeAnthropic:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- scripting ---------------------------------------------------------------------------

    def enqueue(self, *replies: Reply) -> None:
        with self._lock:
            self._queue.extend(replies)

    @property
    def message_requests(self) -> list[RecordedRequest]:
        """The `POST /v1/messages` requests, in order."""
        return [r for r in self.requests if r.method == "POST" and _route(r.path) == "/v1/messages"]

    def _remember(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _next_reply(self, request: RecordedRequest) -> Reply:
        with self._lock:
            self.requests.append(request)
            if self._queue:
                return self._queue.popleft()
        return self.default(request) if callable(self.default) else self.default


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up (e.g. a cancelled run) is normal here; stay quiet about it."""


def _route(path: str) -> str:
    return path.split("?", 1)[0].rstrip("/")


class _Handler(BaseHTTPRequestHandler):
    owner: FakeAnthropic
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # -- plumbing ----------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    def _record(self) -> RecordedRequest:
        raw = self._read_body()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        headers = {k.lower(): v for k, v in self.headers.items()}
        return RecordedRequest(self.command, self.path, headers, body, self.client_address[:2])

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("request-id", f"req_fake_{next(_ids)}")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, error: Error) -> None:
        headers = {}
        if error.retry_after_ms is not None:
            headers["retry-after-ms"] = str(error.retry_after_ms)
        payload = {"type": "error", "error": {"type": error.type, "message": error.message}}
        self._json(error.status, payload, headers)

    # -- methods -----------------------------------------------------------------------------

    def do_GET(self) -> None:
        self.owner._remember(self._record())
        self._error(Error(404, "not_found_error", f"no route {self.path}", None))

    def do_POST(self) -> None:
        request = self._record()
        if _route(request.path) != "/v1/messages":
            self.owner._remember(request)
            self._error(Error(404, "not_found_error", f"no route {self.path}", None))
            return
        key = request.headers.get("x-api-key") or request.headers.get("authorization", "")
        key = key.removeprefix("Bearer ")
        if self.owner.api_key is not None and key != self.owner.api_key:
            self.owner._remember(request)
            self._error(Error(401, "authentication_error", "invalid x-api-key", None))
            return
        reply = self.owner._next_reply(request)
        if isinstance(reply, Error):
            self._error(reply)
            return
        model = str(request.body.get("model", "claude-fake"))
        if not request.stream:
            if isinstance(reply, ErrorMidStream):  # no stream to break: answer the error
                self._error(Error(529, reply.type, reply.message))
            elif isinstance(reply, DropMidStream):
                self.close_connection = True
            else:
                self._json(200, _message_json(reply, model))
            return
        self._stream(reply, model)

    # -- SSE ---------------------------------------------------------------------------------

    def _stream(self, reply: Text | ErrorMidStream | DropMidStream, model: str) -> None:
        owner = self.owner
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.send_header("request-id", f"req_fake_{next(_ids)}")
        self.end_headers()
        with owner._lock:
            owner.streams_started += 1
        try:
            if isinstance(reply, DropMidStream):
                events = itertools.islice(_sse_events(Text(reply.before), model, owner._closing), 4)
                for event, data in events:  # message_start, block start, ping, first delta
                    self._chunk(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
                self.close_connection = True  # no terminating chunk: the body is cut short
                return
            for event, data in _sse_events(reply, model, owner._closing):
                self._chunk(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
            self._chunk(b"")
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            with owner._lock:
                owner.streams_aborted += 1
            owner.client_gone.set()
            self.close_connection = True
            return
        with owner._lock:
            owner.streams_finished += 1

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def _usage(reply: Text, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": reply.input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": reply.cache_creation_input_tokens,
        "cache_read_input_tokens": reply.cache_read_input_tokens,
    }


def _stop_reason(reply: Text) -> str:
    return reply.stop_reason or ("tool_use" if reply.tool_uses else "end_turn")


def _tool_id(tool: ToolUse) -> str:
    return tool.id or f"toolu_fake_{next(_ids):04d}"


def _message_json(reply: Text, model: str) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if reply.text:
        content.append({"type": "text", "text": reply.text})
    for tool in reply.tool_uses:
        content.append(
            {"type": "tool_use", "id": _tool_id(tool), "name": tool.name, "input": tool.input}
        )
    output = reply.output_tokens if reply.output_tokens is not None else len(reply.pieces)
    return {
        "id": f"msg_fake_{next(_ids)}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": _stop_reason(reply),
        "stop_sequence": None,
        "usage": _usage(reply, output),
    }


def _sse_events(
    reply: Text | ErrorMidStream, model: str, closing: threading.Event
) -> Iterator[tuple[str, dict[str, Any]]]:
    text = reply if isinstance(reply, Text) else Text(chunks=reply.before)
    start = _usage(text, 1)
    yield (
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": f"msg_fake_{next(_ids)}",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": start,
            },
        },
    )
    index = 0
    if text.pieces:
        yield (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": index,
                "content_block": {"type": "text", "text": ""},
            },
        )
        yield "ping", {"type": "ping"}
        for piece in text.pieces:
            if text.delay and closing.wait(text.delay):
                return
            yield (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "text_delta", "text": piece},
                },
            )
        if not isinstance(reply, ErrorMidStream):
            yield "content_block_stop", {"type": "content_block_stop", "index": index}
            index += 1
    if isinstance(reply, ErrorMidStream):
        yield "error", {"type": "error", "error": {"type": reply.type, "message": reply.message}}
        return
    for tool in text.tool_uses:
        yield (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": index,
                "content_block": {
                    "type": "tool_use",
                    "id": _tool_id(tool),
                    "name": tool.name,
                    "input": {},
                },
            },
        )
        yield (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": "input_json_delta", "partial_json": json.dumps(tool.input)},
            },
        )
        yield "content_block_stop", {"type": "content_block_stop", "index": index}
        index += 1
    output = text.output_tokens if text.output_tokens is not None else len(text.pieces)
    yield (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": _stop_reason(text), "stop_sequence": None},
            "usage": {"output_tokens": output},
        },
    )
    yield "message_stop", {"type": "message_stop"}
