"""The bare baseline of scripts/bench: what gRPC alone costs on this machine, with the control
plane's mTLS and nothing stored, validated or converted.

A bare grpc.aio server (`serve`, a child process) answers a unary echo, counts a one-way stream,
and relays a call to a bare worker process (`worker`) over a stream that worker holds: the
shape of a task's round trip, the floor for any design with a worker process in the loop.
The stored relay does the same with TaskRun's two commits on the way, through its SQLite store
and with the rows an echo task writes: the task and its run as created and assigned before the
request may leave for the worker, then as completed before the answer may leave. That is the
floor for a design that, like TaskRun, makes both durable first (what lets a crash lose or repeat
nothing), with nothing validated, converted or scheduled.
Both relays also run with a client's requests as messages on one stream it holds (the stream
relays): the shape of SubmitTasks, on which the Python client's latency is measured, and so
that figure's floor. A call per request costs more (its start on both sides).
`measure_baseline` and `measure_relay` time them from scripts/bench.py.
"""

from __future__ import annotations

# First, so that this process (the clients measured) and the ones it starts use the same gRPC
# endpoints as TaskRun's own processes (taskrun.grpc_transport): grpc picks them as it loads.
import taskrun  # noqa: F401

# isort: split
import asyncio
import itertools
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import grpc
from bench_report import Baseline, Latency
from benchprocs import READY_WITHIN, BenchError, Child, cpu_seconds, spawn, stop

from taskrun.controlplane.pki import PkiPaths
from taskrun.controlplane.store.rows import us
from taskrun.controlplane.store.sqlite import SqliteStore
from taskrun.core.ids import WorkerId, new_run_id, new_task_id
from taskrun.core.models import Run, Task, TaskPolicy, utcnow
from taskrun.core.status import RunStatus, TaskStatus
from taskrun.core.store import ChangeSet, LoggedEvent
from taskrun.logging import configure_logging
from taskrun.v1 import events_pb2 as epb

SCRIPT = Path(__file__).resolve()
BARE_SERVICE = "taskrun.bench.Bare"
BARE_PAYLOAD = b"x" * 64  # about the size of a CreateTask request for echo {"text": "x"}
RELAY_KEY = 8  # the relay's requests start with their number
STORED_INPUT = '{"text":"x"}'  # the input of the bench's echo tasks
STORED_WORKER = WorkerId("bare-worker")


class _Commits:
    """The change sets TaskRun's engine commits for one echo task on its way, with the event
    log's entries for them, through its SQLite store."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        self.positions = itertools.count(1)

    def _changes(self, task: Task, run: Run) -> ChangeSet:
        time_us = us(task.updated_at)
        changed = ((epb.EVENT_KIND_RUN_CHANGED, run), (epb.EVENT_KIND_TASK_CHANGED, task))
        events = [
            LoggedEvent(next(self.positions), kind, task.id, STORED_WORKER, subject=s, time=time_us)
            for kind, s in changed
        ]
        return ChangeSet(tasks=[task], runs=[run], events=events)

    async def created(self) -> tuple[Task, Run]:
        now = utcnow()
        task_id = new_task_id()
        run = Run(
            id=new_run_id(),
            task_id=task_id,
            attempt=1,
            status=RunStatus.ASSIGNED,
            created_at=now,
            worker_id=STORED_WORKER,
            assigned_at=now,
        )
        task = Task(
            id=task_id,
            agent="echo",
            input=STORED_INPUT,
            labels={},
            policy=TaskPolicy(),
            status=TaskStatus.RUNNING,
            created_at=now,
            updated_at=now,
            attempts=1,
            current_run_id=run.id,
            worker_id=STORED_WORKER,
        )
        await self.store.apply(self._changes(task, run))
        return task, run

    async def completed(self, task: Task, run: Run, result: str) -> None:
        now = utcnow()
        run.status, run.started_at, run.finished_at, run.result = (
            RunStatus.COMPLETED,
            now,
            now,
            result,
        )
        task.status, task.updated_at, task.finished_at, task.result = (
            TaskStatus.COMPLETED,
            now,
            now,
            result,
        )
        await self.store.apply(self._changes(task, run))


async def serve_baseline(certs: Path, store_path: Path) -> None:
    """A bare grpc.aio server with the control plane's mTLS setup and, for the stored relay,
    TaskRun's SQLite store at `store_path`; prints its port, then serves until SIGTERM."""
    paths = PkiPaths.at(certs)
    creds = grpc.ssl_server_credentials(
        [(paths.server_key.read_bytes(), paths.server_cert.read_bytes())],
        root_certificates=paths.ca_cert.read_bytes(),
        require_client_auth=True,
    )

    async def unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return request

    # The relay: a bare worker holds a Work stream; a Relay call answers at once ("created"),
    # hands its request to the worker, and answers again with the worker's reply: the shape
    # of CreateAndFollowTask with a worker in the loop, the floor for any design that has one.
    to_worker: asyncio.Queue[bytes] = asyncio.Queue()
    waiting: dict[bytes, asyncio.Future[bytes]] = {}

    async def work(
        replies: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        async def read() -> None:
            async for reply in replies:
                waiting.pop(reply[:RELAY_KEY]).set_result(reply)

        reader = asyncio.create_task(read())
        try:
            while True:
                yield await to_worker.get()
        finally:
            reader.cancel()

    async def relay(
        request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        answered: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        waiting[request[:RELAY_KEY]] = answered
        to_worker.put_nowait(request)
        yield b"created"
        yield await answered

    store = SqliteStore(store_path)
    await store.open()
    commits = _Commits(store)

    async def stored_relay(
        request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        task, run = await commits.created()
        answered: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        waiting[request[:RELAY_KEY]] = answered
        to_worker.put_nowait(request)
        yield b"created"
        reply = await answered
        await commits.completed(task, run, STORED_INPUT)
        yield reply

    # The same two relays with a client's requests as messages on one stream it holds, each
    # answered twice on it: the shape of SubmitTasks, whose latency the bench measures.
    def on_one_stream(
        one: Callable[[bytes, grpc.aio.ServicerContext[bytes, bytes]], AsyncIterator[bytes]],
    ) -> Callable[
        [AsyncIterator[bytes], grpc.aio.ServicerContext[bytes, bytes]], AsyncIterator[bytes]
    ]:
        async def streamed(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
        ) -> AsyncIterator[bytes]:
            async for request in requests:
                async for answer in one(request, context):
                    yield answer

        return streamed

    async def stream(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        count = 0
        async for _ in requests:
            count += 1
        yield str(count).encode()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                BARE_SERVICE,
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(unary),
                    "Stream": grpc.stream_stream_rpc_method_handler(stream),
                    "Work": grpc.stream_stream_rpc_method_handler(work),
                    "Relay": grpc.unary_stream_rpc_method_handler(relay),
                    "StoredRelay": grpc.unary_stream_rpc_method_handler(stored_relay),
                    "StreamRelay": grpc.stream_stream_rpc_method_handler(on_one_stream(relay)),
                    "StoredStreamRelay": grpc.stream_stream_rpc_method_handler(
                        on_one_stream(stored_relay)
                    ),
                },
            ),
        )
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    await server.stop(1.0)
    await store.close()


async def bare_worker(certs: Path, address: str) -> None:
    """The relay's worker: holds one Work stream and answers each request with itself."""
    paths = PkiPaths.at(certs)
    creds = grpc.ssl_channel_credentials(
        root_certificates=paths.ca_cert.read_bytes(),
        private_key=paths.operator_key.read_bytes(),
        certificate_chain=paths.operator_cert.read_bytes(),
    )
    async with grpc.aio.secure_channel(address, creds) as channel:
        call = channel.stream_stream(f"/{BARE_SERVICE}/Work")()
        async for request in call:
            await call.write(request)


async def start_baseline(pki: PkiPaths, tmp: Path) -> tuple[Child, int]:
    argv = [sys.executable, str(SCRIPT), "serve", str(pki.directory), str(tmp / "bare-relay.db")]
    child = await spawn("bare server", argv, tmp / "bare-server.log", pipe_stdout=True)
    assert child.proc.stdout is not None
    try:
        async with asyncio.timeout(READY_WITHIN):
            line = await child.proc.stdout.readline()
    except TimeoutError:
        raise BenchError(f"bare server did not start within {READY_WITHIN:g}s") from None
    if not line.strip().isdigit():
        await child.proc.wait()
        child.check()
    return child, int(line)


async def measure_baseline(address: str, pki: PkiPaths, unary_n: int, stream_n: int) -> Baseline:
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.ca_cert.read_bytes(),
        private_key=pki.operator_key.read_bytes(),
        certificate_chain=pki.operator_cert.read_bytes(),
    )
    async with grpc.aio.secure_channel(address, creds) as channel:
        async with asyncio.timeout(READY_WITHIN):
            await channel.channel_ready()
        unary = channel.unary_unary(f"/{BARE_SERVICE}/Unary")
        for _ in range(min(200, unary_n)):
            await unary(BARE_PAYLOAD)
        samples: list[float] = []
        started = time.perf_counter()
        for _ in range(unary_n):
            t0 = time.perf_counter()
            await unary(BARE_PAYLOAD)
            samples.append(time.perf_counter() - t0)
        unary_seconds = time.perf_counter() - started

        open_stream = channel.stream_stream(f"/{BARE_SERVICE}/Stream")

        async def one_stream(n: int) -> float:
            call = open_stream()
            t0 = time.perf_counter()
            for _ in range(n):
                await call.write(BARE_PAYLOAD)
            await call.done_writing()
            reply = await call.read()
            elapsed = time.perf_counter() - t0
            if reply != str(n).encode():
                raise BenchError(f"bare stream: server counted {reply!r}, sent {n}")
            return elapsed

        await one_stream(min(1000, stream_n))
        stream_seconds = await one_stream(stream_n)
    return Baseline(
        unary=Latency.of(samples),
        unary_ops_per_s=unary_n / unary_seconds,
        stream_messages=stream_n,
        stream_seconds=stream_seconds,
        stream_msgs_per_s=stream_n / stream_seconds,
    )


async def measure_relay(
    address: str,
    pki: PkiPaths,
    tmp: Path,
    n: int,
    warmup: int,
    server_pid: int,
    method: str = "Relay",
) -> tuple[Latency, dict[str, float]]:
    """Sequential requests to `method` through a bare worker process, from the request to its
    second answer (the worker's), as the latency figure measures a task; and the CPU per
    request of the bare server, the bare worker and this client. Relay and StoredRelay make a
    call of each request; StreamRelay and StoredStreamRelay send them all on one stream."""
    argv = [sys.executable, str(SCRIPT), "worker", str(pki.directory), address]
    worker = await spawn("bare worker", argv, tmp / "bare-worker.log")
    try:
        creds = grpc.ssl_channel_credentials(
            root_certificates=pki.ca_cert.read_bytes(),
            private_key=pki.operator_key.read_bytes(),
            certificate_chain=pki.operator_cert.read_bytes(),
        )
        async with grpc.aio.secure_channel(address, creds) as channel:
            ask = _asker(channel, method)
            samples: list[float] = []
            pids = {"server": server_pid, "workers": worker.proc.pid}
            cpu0: dict[str, float | None] = {}
            for i in range(warmup + n):
                if i == warmup:
                    cpu0 = {k: cpu_seconds(pid) for k, pid in pids.items()}
                    cpu0["client"] = time.process_time()
                request = i.to_bytes(RELAY_KEY, "big") + BARE_PAYLOAD
                t0 = time.perf_counter()
                async with asyncio.timeout(READY_WITHIN):
                    answers = await ask(request)
                if answers != [b"created", request]:
                    raise BenchError(f"bare {method}: answered {answers!r}")
                if i >= warmup:
                    samples.append(time.perf_counter() - t0)
            cpu1 = {k: cpu_seconds(pid) for k, pid in pids.items()}
            cpu1["client"] = time.process_time()
        return Latency.of(samples), per_call(cpu0, cpu1, n)
    finally:
        await stop(worker)


def _asker(channel: grpc.aio.Channel, method: str) -> Callable[[bytes], Awaitable[list[bytes]]]:
    """Sends one request to `method` and returns its answers (two, when all is well)."""
    path = f"/{BARE_SERVICE}/{method}"
    if not method.endswith("StreamRelay"):
        call = channel.unary_stream(path)

        async def ask_call(request: bytes) -> list[bytes]:
            return [answer async for answer in call(request)]

        return ask_call
    stream = channel.stream_stream(path)()

    async def ask_stream(request: bytes) -> list[bytes]:
        await stream.write(request)
        return [await stream.read(), await stream.read()]

    return ask_stream


def per_call(
    before: dict[str, float | None], after: dict[str, float | None], n: int
) -> dict[str, float]:
    """CPU seconds per call by process, for those measured at both ends."""
    out: dict[str, float] = {}
    for name, end in after.items():
        start = before.get(name)
        if start is not None and end is not None and n:
            out[name] = round(end - start, 3) / n
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """`serve CERTS STORE`: the bare server (prints its port); `worker CERTS ADDRESS`: the
    relay's worker. Both run until stopped."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"] and len(args) == 3:
        configure_logging(json=True, level="warning")  # stdout carries the port
        asyncio.run(serve_baseline(Path(args[1]), Path(args[2])))
        return 0
    if args[:1] == ["worker"] and len(args) == 3:
        asyncio.run(bare_worker(Path(args[1]), args[2]))
        return 0
    sys.stderr.write("usage: bench_bare.py serve CERTS STORE | worker CERTS ADDRESS\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
