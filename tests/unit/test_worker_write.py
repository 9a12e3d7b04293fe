"""A write to a worker session that already ended says why it ended (a real grpc call)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from taskrun.v1 import workers_pb2 as wpb
from taskrun.worker.daemon import write


async def refuse(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAVAILABLE, "the control plane is shutting down")


async def test_a_write_to_an_ended_session_raises_the_status_it_ended_with() -> None:
    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(refuse)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("taskrun.v1.RunService", {"StreamConnect": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream(
                "/taskrun.v1.RunService/StreamConnect",
                request_serializer=wpb.WorkerMessage.SerializeToString,
                response_deserializer=wpb.ServerMessage.FromString,
            )()
            assert await call.code() is grpc.StatusCode.UNAVAILABLE  # ended before any write
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await write(call, wpb.WorkerMessage(hello=wpb.WorkerHello(worker_id="w")))
            assert ended.value.code() is grpc.StatusCode.UNAVAILABLE
            assert ended.value.details() == "the control plane is shutting down"
    finally:
        await server.stop(None)
