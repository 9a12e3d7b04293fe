"""What the worker has to tell the server, in order, bounded, surviving reconnects.

Runs append output chunks and status updates; the session's writer takes them in order and
packs as many as fit into one WorkerMessage. A run's terminal status is always behind its last
chunk, so the server sees every chunk before the run ends. When the outbox is full, `put` waits:
a flood of output slows the agent, never the worker's memory.
"""

from __future__ import annotations

import asyncio
from collections import deque

from taskrun.v1 import common_pb2 as pb
from taskrun.v1 import workers_pb2 as wpb

Item = pb.OutputChunk | wpb.RunStatusUpdate | wpb.CancelAck


class Outbox:
    def __init__(self, max_items: int = 10_000, max_bytes: int = 16 * 1024 * 1024) -> None:
        self._items: deque[tuple[Item, int]] = deque()
        self._bytes = 0
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._ready = asyncio.Event()  # something to send
        self._space = asyncio.Event()  # room to put
        self._space.set()
        self._empty = asyncio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._items)

    def _full(self) -> bool:
        return len(self._items) >= self._max_items or self._bytes >= self._max_bytes

    def put_nowait(self, item: Item, size: int = 64) -> None:
        """Append without waiting (status updates and acks: small and must not be dropped)."""
        self._items.append((item, size))
        self._bytes += size
        self._ready.set()
        self._empty.clear()
        if self._full():
            self._space.clear()

    async def put(self, item: Item, size: int) -> None:
        """Append, waiting while the outbox is full."""
        while self._full():
            await self._space.wait()
        self.put_nowait(item, size)

    def poke(self) -> None:
        """Wake the writer even with nothing queued (heartbeat, drain notice, exit)."""
        self._ready.set()

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def wait_empty(self) -> None:
        await self._empty.wait()

    def take(self, max_chunks: int, max_bytes: int) -> wpb.WorkerMessage | None:
        """Pop items in order into one message, within the limits; None when empty."""
        if not self._items:
            self._ready.clear()
            return None
        msg = wpb.WorkerMessage()
        chunks = 0
        size = 0
        while self._items:
            item, item_size = self._items[0]
            if size and (
                size + item_size > max_bytes
                or (isinstance(item, pb.OutputChunk) and chunks >= max_chunks)
            ):
                break
            self._items.popleft()
            self._bytes -= item_size
            size += item_size
            if isinstance(item, pb.OutputChunk):
                msg.chunks.append(item)
                chunks += 1
            elif isinstance(item, wpb.RunStatusUpdate):
                msg.statuses.append(item)
            else:
                msg.cancel_acks.append(item)
        if not self._items:
            self._ready.clear()
            self._empty.set()
        if not self._full():
            self._space.set()
        return msg

    def pending_statuses(self) -> dict[str, wpb.RunStatusUpdate]:
        """Latest queued status per run (for the hello after a reconnect)."""
        latest: dict[str, wpb.RunStatusUpdate] = {}
        for item, _ in self._items:
            if isinstance(item, wpb.RunStatusUpdate):
                latest[item.run_id] = item
        return latest
