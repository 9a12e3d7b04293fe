"""One connected worker: what it offers, which runs it holds, its lease, and its outbound queue.

The gRPC handler owns the stream; this object owns the state. Only the writer coroutine writes
to the stream, and it merges everything queued into one ServerMessage per write, as many
assignments as fit in `max_message_bytes` (a conversation's turn may carry a large transcript or
session snapshot); the rest go in the next write.

Acknowledgements are not urgent (they let the worker forget reports it would otherwise send
again after a reconnect), so one alone waits up to ACK_DELAY for something else to go with: the
next assignment, a cancel, a lease renewal, a later ack. A round trip then costs the worker's
report and the follower's update one stream write fewer, and a busy session writes one message
where it wrote two.

The lease: the worker numbers its heartbeats and remembers when it sent each; the server renews
the lease when one arrives (now + duration) and answers with its number, from which the worker
counts the same duration. The worker's lease therefore always ends before the server's.

A worker that holds no runs heartbeats less often (`idle_heartbeat_interval`), and its lease may
lapse between them: it has nothing to stop. Given a run then, it renews before starting it, so
the session with runs waits for that renewal one lease from when it got its first run
(`busy_since`), not from the lapsed lease: the bound a run assigned to a silent worker waits is
the same as for a worker that went silent just after its last renewal.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from taskrun.controlplane.dispatcher import Candidate
from taskrun.core.ids import RunId, WorkerId
from taskrun.core.models import AgentSpec, Worker
from taskrun.v1 import workers_pb2 as wpb

ACK_DELAY = 0.1  # seconds an acknowledgement may wait for company (see the module doc)


class RunSet(set[RunId]):
    """The runs a worker holds; tells its session when their number may have changed (the
    dispatcher's index orders workers by load)."""

    __slots__ = ("busy_since", "changed")

    def __init__(self, changed: Callable[[], None]) -> None:
        super().__init__()
        self.changed = changed
        self.busy_since = 0.0  # time.monotonic() when it last went from no runs to some

    def add(self, run_id: RunId) -> None:
        if not self:
            self.busy_since = time.monotonic()
        super().add(run_id)
        self.changed()

    def discard(self, run_id: object) -> None:
        super().discard(run_id)
        self.changed()


class WorkerSession:
    def __init__(
        self,
        worker: Worker,
        session_id: str,
        lease_duration: float,
        max_message_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.worker = worker
        self.max_message_bytes = max_message_bytes
        self.session_id = session_id
        self.lease_duration = lease_duration
        self.lease_expires = time.monotonic() + lease_duration  # the hello starts it
        self._lease_seq = 0
        # held by the worker: assigned, running, or cancel not acked
        self.runs = RunSet(self.load_changed)
        self.on_load_change: Callable[[WorkerSession], None] | None = None  # set by the engine
        self.draining = False
        self.last_seen = time.monotonic()
        self.closed = False
        self.kick_reason = ""
        self.kick_denied = False  # ended because the identity was revoked: PERMISSION_DENIED
        self.handler: asyncio.Task[object] | None = None
        self._assignments: list[wpb.RunAssignment] = []
        self._cancels: list[wpb.CancelRun] = []
        self._drain = False
        self._ack = 0
        self._ack_timer: asyncio.TimerHandle | None = None
        self._wake = asyncio.Event()
        self._candidate = Candidate(
            worker_id=worker.id,
            agents={},
            labels=worker.labels,
            capacity=worker.max_concurrent_runs,
            active=0,
        )
        self.set_agents(worker.agents)

    @property
    def worker_id(self) -> WorkerId:
        return self.worker.id

    def set_agents(self, agents: tuple[AgentSpec, ...]) -> None:
        """What the worker announces it can run (its hello, or a later update): the agents it
        can run now, each with its own backends."""
        self.worker.agents = agents
        self._candidate.agents = {
            a.name: frozenset((b.provider, b.model_name) for b in a.backends)
            for a in agents
            if a.available
        }
        self.load_changed()

    def load_changed(self) -> None:
        if self.on_load_change is not None:
            self.on_load_change(self)

    def candidate(self, *, quarantined: bool = False) -> Candidate:
        """This worker as the dispatcher sees it (one object, brought up to date)."""
        c = self._candidate
        c.active, c.draining = len(self.runs), self.draining or quarantined
        return c

    # --- outbound ----------------------------------------------------------------------------

    def send_assignment(self, assignment: wpb.RunAssignment) -> None:
        self._assignments.append(assignment)
        self._wake.set()

    def send_cancel(self, run_id: str, attempt: int, reason: str) -> None:
        self._cancels.append(wpb.CancelRun(run_id=run_id, attempt=attempt, reason=reason))
        self._wake.set()

    def send_ack(self, message_seq: int) -> None:
        """Acknowledge the worker's messages up to `message_seq` (they are committed)."""
        if message_seq > self._ack:
            self._ack = message_seq
            if self._ack_timer is None:
                self._ack_timer = asyncio.get_running_loop().call_later(ACK_DELAY, self._wake.set)

    def renew_lease(self, heartbeat_seq: int) -> None:
        """A heartbeat arrived: extend the lease, and tell the worker which numbered one did
        (number 0 asks for no answer: the server writes nothing for it)."""
        self.lease_expires = time.monotonic() + self.lease_duration
        if heartbeat_seq > self._lease_seq:
            self._lease_seq = heartbeat_seq
            self._wake.set()

    def renew_deadline(self, idle_interval: float) -> float:
        """When (time.monotonic()) the worker must have renewed its lease, short of the margin.

        With runs: when its lease runs out, or a lease after it got its first run while it held
        none (its lease may have lapsed then; it renews before starting). Without: one idle
        heartbeat interval later (its next idle heartbeat is due by then).
        """
        if not self.runs:
            return self.lease_expires + idle_interval
        return max(self.lease_expires, self.runs.busy_since + self.lease_duration)

    def send_drain(self) -> None:
        self._drain = True
        self._wake.set()

    async def write_loop(self, write: Callable[[wpb.ServerMessage], Awaitable[None]]) -> None:
        """Merge whatever is queued into one message per write, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            fit, size = 0, 0
            for assignment in self._assignments:
                size += assignment.ByteSize() + 8
                if fit and size > self.max_message_bytes:
                    break
                fit += 1
            msg = wpb.ServerMessage(
                assignments=self._assignments[:fit],
                cancels=self._cancels,
                drain=self._drain,
                ack_seq=self._ack,
                lease_seq=self._lease_seq,
            )
            self._assignments, self._cancels = self._assignments[fit:], []
            if self._ack_timer is not None:  # the ack goes with this message
                self._ack_timer.cancel()
                self._ack_timer = None
            if self._assignments:
                self._wake.set()  # the rest in the next message
            self._drain = False
            await write(msg)

    def kick(self, reason: str, *, denied: bool = False) -> None:
        """End this session from outside its handler (replaced, revoked, heartbeat lost).

        `denied` ends the call PERMISSION_DENIED (the worker must not retry), else UNAVAILABLE.
        """
        self.kick_reason = reason
        self.kick_denied = denied
        if self.handler is not None and not self.handler.done():
            self.handler.cancel()
