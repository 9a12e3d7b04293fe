"""A fake OpenAI-compatible chat completions API: a real HTTP server on 127.0.0.1, scripted.

It speaks what OpenAI (and vLLM, llama.cpp's server, Ollama) speak on `POST
/v1/chat/completions`: a JSON `chat.completion` without `"stream": true`, otherwise Server-Sent
Events of `chat.completion.chunk` objects (`data: {...}` lines, the first delta carrying the
role, one per text piece, a last one with `finish_reason`; with `stream_options.include_usage`
a final chunk with empty `choices` and the `usage`), then `data: [DONE]`. Errors are the API's
JSON error bodies with their status codes. Every request is recorded.

    with FakeOpenAI(api_key="sk-test") as api:
        api.enqueue(Chat(["Hel", "lo"], prompt_tokens=9))
        client = openai.AsyncOpenAI(base_url=api.base_url, api_key="sk-test")
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Chat:
    """A completion: text streamed in `chunks` (one delta each)."""

    chunks: list[str] | str = "Hello from the fake OpenAI API."
    finish_reason: str = "stop"
    prompt_tokens: int = 10
    completion_tokens: int | None = None  # default: one per chunk
    cached_tokens: int = 0
    delay: float = 0.0  # seconds before each delta (a slow stream)
    usage: bool = True  # False: a server that ignores stream_options
    drop_after: int | None = None  # close the connection after this many deltas, mid-stream

    @property
    def pieces(self) -> list[str]:
        return [self.chunks] if isinstance(self.chunks, str) else list(self.chunks)


@dataclass(frozen=True)
class Error:
    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None


def Unauthorized() -> Error:
    return Error(401, "Incorrect API key provided", "invalid_request_error", "invalid_api_key")


Reply = Chat | Error
Responder = Callable[["Recorded"], Reply]


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    peer: tuple[str, int] = ("", 0)  # the client's address: one per connection

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages", [])) if isinstance(self.body, dict) else []


_ids = itertools.count(1)


class FakeOpenAI:
    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.default: Reply | Responder = Chat()
        self.requests: list[Recorded] = []
        self._queue: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> FakeOpenAI:
        fake = self

        class Handler(_Handler):
            owner = fake

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def stop(self) -> None:
        self._closing.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def enqueue(self, *replies: Reply) -> None:
        with self._lock:
            self._queue.extend(replies)

    @property
    def chat_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.path.split("?")[0] == "/v1/chat/completions"]

    def _next(self, request: Recorded) -> Reply:
        with self._lock:
            self.requests.append(request)
            if self._queue:
                return self._queue.popleft()
        return self.default(request) if callable(self.default) else self.default


class _Handler(BaseHTTPRequestHandler):
    owner: FakeOpenAI
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        headers = {k.lower(): v for k, v in self.headers.items()}
        request = Recorded("POST", self.path, headers, body, self.client_address[:2])
        owner = self.owner
        if self.path.split("?")[0] != "/v1/chat/completions":
            with owner._lock:
                owner.requests.append(request)
            self._send_json(404, {"error": {"message": f"no route {self.path}"}})
            return
        key = request.headers.get("authorization", "").removeprefix("Bearer ")
        if owner.api_key is not None and key != owner.api_key:
            with owner._lock:
                owner.requests.append(request)
            self._error(Unauthorized())
            return
        reply = owner._next(request)
        if isinstance(reply, Error):
            self._error(reply)
            return
        model = str(body.get("model", "fake-model"))
        if not body.get("stream"):
            self._send_json(200, _completion(reply, model))
            return
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        try:
            for sent, data in enumerate(_chunks(reply, model, include_usage, owner._closing)):
                if reply.drop_after is not None and sent > reply.drop_after:
                    self.close_connection = True  # no terminating chunk: the body is cut
                    return
                self._chunk(f"data: {data}\n\n".encode())
            self._chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _error(self, error: Error) -> None:
        payload = {
            "error": {
                "message": error.message,
                "type": error.type,
                "param": None,
                "code": error.code,
            }
        }
        self._send_json(error.status, payload)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def _usage(reply: Chat) -> dict[str, Any]:
    completion = reply.completion_tokens
    if completion is None:
        completion = len(reply.pieces)
    prompt = reply.prompt_tokens + reply.cached_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": reply.cached_tokens},
    }


def _completion(reply: Chat, model: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-fake{next(_ids)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(reply.pieces)},
                "finish_reason": reply.finish_reason,
            }
        ],
        "usage": _usage(reply),
    }


def _chunks(
    reply: Chat, model: str, include_usage: bool, closing: threading.Event
) -> Iterator[str]:
    ident, created = f"chatcmpl-fake{next(_ids)}", int(time.time())

    def chunk(choices: list[dict[str, Any]], usage: Any = None) -> str:
        payload = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if include_usage:
            payload["usage"] = usage
        return json.dumps(payload)

    start = {"role": "assistant", "content": ""}
    yield chunk([{"index": 0, "delta": start, "finish_reason": None}])
    for piece in reply.pieces:
        if reply.delay and closing.wait(reply.delay):
            return
        yield chunk([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
    yield chunk([{"index": 0, "delta": {}, "finish_reason": reply.finish_reason}])
    if include_usage and reply.usage:
        yield chunk([], _usage(reply))
    yield "[DONE]"
