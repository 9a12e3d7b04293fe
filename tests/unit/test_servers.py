"""Several control-plane addresses: parsing, a DNS name standing for several, following the
leader a standby names, moving on from an address that cannot be reached."""

from __future__ import annotations

import grpc
import pytest

from taskrun.servers import LEADER_METADATA, ServerList, parse_servers


def refusal(details: str, leader: str = "") -> grpc.aio.AioRpcError:
    metadata = grpc.aio.Metadata((LEADER_METADATA, leader)) if leader else grpc.aio.Metadata()
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), metadata, details)


def test_addresses_are_comma_separated_and_checked() -> None:
    assert parse_servers(" cp1:50051, cp2:50051 ,") == ["cp1:50051", "cp2:50051"]
    with pytest.raises(ValueError, match="'cp3' is not host:port"):
        parse_servers("cp1:50051,cp3")
    assert parse_servers("unix:/run/taskrun.sock") == ["unix:/run/taskrun.sock"]
    with pytest.raises(ValueError, match="no server address"):
        parse_servers(" , ")


def test_a_dns_name_with_several_addresses_counts_as_several_keeping_its_tls_name() -> None:
    servers = ServerList(
        "cp.example:50051", resolver=lambda host, port: ["10.0.0.1", "10.0.0.2", "10.0.0.1"]
    )
    assert [(e.target, e.tls_name) for e in servers.endpoints] == [
        ("10.0.0.1:50051", "cp.example"),
        ("10.0.0.2:50051", "cp.example"),
    ]
    single = ServerList("cp.example:50051", resolver=lambda host, port: ["10.0.0.1"])
    assert [(e.target, e.tls_name) for e in single.endpoints] == [("cp.example:50051", None)]
    ips = ServerList("127.0.0.1:1,127.0.0.1:2")
    assert [e.tls_name for e in ips.endpoints] == ["localhost", "localhost"]


def test_a_standby_naming_the_leader_is_followed_and_the_call_may_be_repeated() -> None:
    servers = ServerList("127.0.0.1:1,127.0.0.1:2")
    assert servers.failed(refusal("this control plane is a standby; …", "127.0.0.1:2"))
    assert servers.current.target == "127.0.0.1:2"
    assert servers.failed(refusal("standby", "10.9.9.9:7"))  # one it did not know
    assert servers.current.target == "10.9.9.9:7"


def test_an_unreachable_address_moves_on_a_failed_call_on_the_leader_is_not_repeated() -> None:
    servers = ServerList("127.0.0.1:1,127.0.0.1:2")
    assert servers.failed(refusal("failed to connect to all addresses; Connection refused"))
    assert servers.current.target == "127.0.0.1:2"
    # the leader died during the call: maybe done, so not repeated, but the next call moves
    assert not servers.failed(refusal("Socket closed"))
    assert servers.current.target == "127.0.0.1:1"
    not_available = grpc.aio.AioRpcError(
        grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), grpc.aio.Metadata(), "agent"
    )
    assert not servers.failed(not_available)
    assert servers.current.target == "127.0.0.1:1"


def test_one_address_stays_where_it_is() -> None:
    servers = ServerList("127.0.0.1:1")
    assert not servers.failed(refusal("Socket closed"))
    assert servers.current.target == "127.0.0.1:1"
