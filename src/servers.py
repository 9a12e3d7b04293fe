"""Several control-plane addresses, and following the leader among them.

`--server` takes one address or several, comma separated (`cp1:50051,cp2:50051`); a single DNS
name that resolves to several addresses counts as several (the TLS name checked stays the DNS
name). Workers and clients use one address at a time. A standby control plane refuses every call
with UNAVAILABLE and names the leader in the trailing metadata `taskrun-leader`: the caller moves
there. When an address cannot be reached the caller moves to the next one.

Shared by the worker daemon and the CLI client (neither imports the other).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

LEADER_METADATA = "taskrun-leader"
DEFAULT_TLS_NAME = "localhost"  # what the server certificate of `taskrun certs init` names
STANDBY_PREFIX = "this control plane is a standby"


@dataclass(frozen=True, slots=True)
class Endpoint:
    target: str  # host:port to connect to
    tls_name: str | None  # the name to verify in the server certificate (None: the host)


def parse_servers(text: str) -> list[str]:
    """`a:1, b:2` -> ["a:1", "b:2"]; ValueError naming the bad entry. One address is taken as
    it is (any gRPC target: `unix:PATH`, `dns:///name:port`; grpc says what is wrong)."""
    out = [part.strip() for part in text.split(",") if part.strip()]
    if not out:
        raise ValueError("no server address given (host:port, several comma separated)")
    if len(out) > 1:
        for part in out:
            host, sep, port = part.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"server address {part!r} is not host:port")
    return out


def _host(target: str) -> str:
    return target.rpartition(":")[0].strip("[]")


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def lookup(host: str, port: int) -> list[str]:
    """The IP addresses of a DNS name, as the system resolver gives them."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return []  # grpc reports the failure when it connects
    return [str(info[4][0]) for info in infos]


def _resolve(target: str, resolver: Callable[[str, int], list[str]]) -> list[str]:
    """The addresses a DNS name stands for (several for a name with several records)."""
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    if is_ip(host) or host == "localhost" or not port.isdigit() or ":" in host or "/" in host:
        return [target]  # an IP, or a target grpc resolves itself (unix:, dns:///…)
    found: list[str] = []
    for address in resolver(host, int(port)):
        item = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        if item not in found:
            found.append(item)
    return found if len(found) > 1 else [target]


class ServerList:
    """The addresses of the control planes, and the one in use."""

    def __init__(
        self,
        servers: str | Sequence[str],
        server_name: str | None = None,
        resolver: Callable[[str, int], list[str]] = lookup,
    ) -> None:
        given = parse_servers(servers) if isinstance(servers, str) else list(servers)
        self.given = given
        self.server_name = server_name or None
        self._resolver = resolver
        self.endpoints = self._expand(given)
        self.index = 0

    def _endpoint(self, target: str, dns_name: str | None = None) -> Endpoint:
        if self.server_name:
            return Endpoint(target, self.server_name)
        if dns_name:
            return Endpoint(target, dns_name)
        return Endpoint(target, DEFAULT_TLS_NAME if is_ip(_host(target)) else None)

    def _expand(self, given: Sequence[str]) -> list[Endpoint]:
        out: list[Endpoint] = []
        for target in given:
            resolved = _resolve(target, self._resolver)
            name = _host(target) if resolved != [target] else None
            out.extend(self._endpoint(r, name) for r in resolved)
        return out

    @property
    def several(self) -> bool:
        return len(self.endpoints) > 1

    @property
    def current(self) -> Endpoint:
        return self.endpoints[self.index]

    def __str__(self) -> str:
        return ",".join(self.given)

    def follow(self, leader: str) -> None:
        """Use `leader` (host:port, as a standby named it) from now on."""
        for n, endpoint in enumerate(self.endpoints):
            if endpoint.target == leader:
                self.index = n
                return
        self.endpoints.append(self._endpoint(leader))
        self.index = len(self.endpoints) - 1

    def next(self) -> None:
        """Move on to the next address (resolving the names again after the last one)."""
        self.index += 1
        if self.index >= len(self.endpoints):
            self.endpoints = self._expand(self.given)
            self.index = 0

    def failed(self, exc: BaseException) -> bool:
        """After a failed call or session: follow the leader a standby named, else move to the
        next address when the control plane could not be reached or stands by. True when the
        call may be repeated at once (nothing was done: a standby refused it, or the address
        could not be reached)."""
        if isinstance(exc, grpc.aio.AioRpcError):
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and self.several:
                self.next()  # a control plane that does not answer (frozen, cut off)
                return False
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                return False
            leader = leader_of(exc)
            if leader:
                self.follow(leader)
                return True
            details = exc.details() or ""
            unreached = not_reached(details)
            if unreached or details.startswith(STANDBY_PREFIX) or self.several:
                self.next()
            return unreached or details.startswith(STANDBY_PREFIX)
        if self.several:
            self.next()
        return False


def not_reached(details: str) -> bool:
    """grpc's words for a connection that was never made (nothing of the call was sent)."""
    lowered = details.lower()
    return "failed to connect" in lowered or "connection refused" in lowered


def leader_of(exc: grpc.aio.AioRpcError) -> str:
    """The leader's address a standby named in its refusal, or ""."""
    for key, value in exc.trailing_metadata() or ():
        if key == LEADER_METADATA:
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""
