"""What the worker has to tell the server, in order, bounded, surviving reconnects.

Runs append output chunks and status updates; the session's writer takes them in order and
packs as many as fit into one numbered WorkerMessage. A run's terminal status is always behind
its last chunk, so the server sees every chunk before the run ends. Sent messages stay here until
the server acknowledges their number (after its commit); when a session breaks, whatever was not
acknowledged goes back to the front of the queue and is sent again (the server drops duplicates
by `(run_id, attempt, seq)`). Queued and unacknowledged items share one bound: when it is
reached, `put` waits, so a flood of output slows the agent, never grows the worker's memory.
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
        self._unacked: deque[tuple[int, list[tuple[Item, int]]]] = deque()
        self._unacked_count = 0
        self._seq = 0
        self._bytes = 0  # queued and unacknowledged
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._ready = asyncio.Event()  # something to send
        self._space = asyncio.Event()  # room to put
        self._space.set()
        self._empty = asyncio.Event()
        self._empty.set()
        self._settled = asyncio.Event()  # nothing queued and nothing unacknowledged
        self._settled.set()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def unacknowledged(self) -> int:
        return self._unacked_count

    def _full(self) -> bool:
        count = len(self._items) + self._unacked_count
        return count >= self._max_items or self._bytes >= self._max_bytes

    def put_nowait(self, item: Item, size: int | None = None) -> None:
        """Append without waiting (status updates and acks: must not be dropped). `size`: what
        the item takes in a message, measured when not given (a status may carry a result of
        up to 1 MiB, and a message must not pass the server's limit)."""
        if size is None:
            size = item.ByteSize() + 16
        self._items.append((item, size))
        self._bytes += size
        self._ready.set()
        self._empty.clear()
        self._settled.clear()
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
        """Pop items in order into one numbered message, within the limits; None when empty.

        The items stay unacknowledged until `ack` covers the message's number.
        """
        if not self._items:
            self._ready.clear()
            return None
        msg = wpb.WorkerMessage()
        taken: list[tuple[Item, int]] = []
        chunks = 0
        size = 0
        while self._items:
            item, item_size = self._items[0]
            if size and (
                size + item_size > max_bytes
                or (isinstance(item, pb.OutputChunk) and chunks >= max_chunks)
            ):
                break
            taken.append(self._items.popleft())
            size += item_size
            if isinstance(item, pb.OutputChunk):
                msg.chunks.append(item)
                chunks += 1
            elif isinstance(item, wpb.RunStatusUpdate):
                msg.statuses.append(item)
            else:
                msg.cancel_acks.append(item)
        self._seq += 1
        msg.message_seq = self._seq
        self._unacked.append((self._seq, taken))
        self._unacked_count += len(taken)
        if not self._items:
            self._ready.clear()
            self._empty.set()
        return msg

    def ack(self, seq: int) -> None:
        """The server committed every message up to `seq`: forget their items."""
        while self._unacked and self._unacked[0][0] <= seq:
            _, items = self._unacked.popleft()
            self._unacked_count -= len(items)
            self._bytes -= sum(size for _, size in items)
        if not self._full():
            self._space.set()
        if not self._unacked and not self._items:
            self._settled.set()

    def requeue_unacknowledged(self) -> int:
        """A session ended: put unacknowledged items back in front, in their order."""
        count = 0
        while self._unacked:
            _, items = self._unacked.pop()
            self._items.extendleft(reversed(items))
            count += len(items)
        self._unacked_count = 0
        if self._items:
            self._ready.set()
            self._empty.clear()
        return count

    async def wait_settled(self) -> None:
        """Until everything put so far was sent and acknowledged."""
        await self._settled.wait()

    def pending_statuses(self) -> dict[str, wpb.RunStatusUpdate]:
        """Latest queued status per run (for the hello after a reconnect)."""
        latest: dict[str, wpb.RunStatusUpdate] = {}
        pending = [entry for _, items in self._unacked for entry in items]
        for item, _ in [*pending, *self._items]:
            if isinstance(item, wpb.RunStatusUpdate):
                latest[item.run_id] = item
        return latest
