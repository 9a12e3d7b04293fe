"""gRPC health checking and server reflection are on."""

from __future__ import annotations

from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import Cluster
from tests.integration.test_bad_input import channel


async def test_health_reports_serving_for_the_server_and_each_service(cluster: Cluster) -> None:
    await cluster.start_server()
    async with channel(cluster) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "taskrun.v1.TaskService", "taskrun.v1.RunService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_taskrun_services(cluster: Cluster) -> None:
    await cluster.start_server()
    async with channel(cluster) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        call = stub.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await call.read()
        await call.done_writing()
        names = {s.name for s in reply.list_services_response.service}
    assert {"taskrun.v1.TaskService", "taskrun.v1.WorkerService", "taskrun.v1.RunService"} <= names
    assert "grpc.health.v1.Health" in names
