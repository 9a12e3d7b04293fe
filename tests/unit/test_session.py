"""The worker session's outbound queue: what goes in one message, and when."""

from __future__ import annotations

import asyncio

from taskrun.controlplane import session as session_module
from taskrun.controlplane.session import WorkerSession
from taskrun.core.ids import WorkerId
from taskrun.core.models import Worker
from taskrun.v1 import workers_pb2 as wpb


async def _writing(session: WorkerSession) -> tuple[list[wpb.ServerMessage], asyncio.Task[None]]:
    written: list[wpb.ServerMessage] = []

    async def write(msg: wpb.ServerMessage) -> None:
        written.append(msg)

    return written, asyncio.create_task(session.write_loop(write))


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_an_ack_alone_waits_for_company_and_goes_with_the_next_assignment() -> None:
    session = WorkerSession(Worker(id=WorkerId("w1")), "s1", lease_duration=4.0)
    written, writer = await _writing(session)
    try:
        session.send_ack(7)
        await _settle()
        assert written == []  # not written on its own at once
        session.send_assignment(wpb.RunAssignment(run_id="run_1", attempt=1))
        await _settle()
        assert [(m.ack_seq, [a.run_id for a in m.assignments]) for m in written] == [(7, ["run_1"])]
    finally:
        writer.cancel()


async def test_an_ack_alone_is_written_within_the_ack_delay() -> None:
    session = WorkerSession(Worker(id=WorkerId("w1")), "s1", lease_duration=4.0)
    written, writer = await _writing(session)
    try:
        loop = asyncio.get_running_loop()
        sent = loop.time()
        session.send_ack(3)
        session.send_ack(5)  # a later one before it went: one message carries the newest
        while not written:
            await asyncio.sleep(session_module.ACK_DELAY / 4)
        assert loop.time() - sent >= session_module.ACK_DELAY
        await asyncio.sleep(session_module.ACK_DELAY * 2)
        assert [m.ack_seq for m in written] == [5]
    finally:
        writer.cancel()


async def test_a_lease_renewal_is_not_delayed_and_carries_the_ack() -> None:
    session = WorkerSession(Worker(id=WorkerId("w1")), "s1", lease_duration=4.0)
    written, writer = await _writing(session)
    try:
        session.send_ack(2)
        session.renew_lease(9)
        await _settle()
        assert [(m.lease_seq, m.ack_seq) for m in written] == [(9, 2)]
        await asyncio.sleep(session_module.ACK_DELAY * 2)
        assert len(written) == 1  # the timer of the ack that already went is gone
    finally:
        writer.cancel()
