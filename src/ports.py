"""Is a listen address free? Checked before a server binds, so a busy port is a clear error.

grpc binds with SO_REUSEPORT unless told otherwise, and reports a failed bind only as a C-core log
line; checking first with a plain socket gives the operator one sentence naming the port.
"""

from __future__ import annotations

import errno
import socket


class AddressUnavailable(OSError):
    """The address cannot be listened on: its port is in use, or it is not an address here."""


def split_host_port(address: str) -> tuple[str, int]:
    """`127.0.0.1:50051` -> ("127.0.0.1", 50051); `[::1]:0` -> ("::1", 0)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{address!r} is not host:port")
    return host.strip("[]"), int(port)


def check_listen_address(address: str) -> None:
    """Raise AddressUnavailable naming `address` when a server could not listen there now.

    Port 0 (any free port) always passes. The check binds and closes at once, with SO_REUSEADDR
    as servers do, so a port in TIME_WAIT after a restart counts as free.
    """
    host, port = split_host_port(address)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise AddressUnavailable(f"cannot listen on {address}: {exc.strerror}") from None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise AddressUnavailable(
                        f"cannot listen on {address}: port {port} is already in use "
                        "(is another taskrun server running?)"
                    ) from None
                raise AddressUnavailable(f"cannot listen on {address}: {exc.strerror}") from None
