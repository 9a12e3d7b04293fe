"""TaskRun: a control plane for AI agents on remote machines.

`taskrun.Client` is the typed async client; it is imported lazily so that `taskrun.core` stays
free of grpc.

Importing `taskrun` first picks gRPC's TCP endpoints for the process, before grpc loads (see
`taskrun.grpc_transport`; `GRPC_EXPERIMENTS`, when set, is left as it is).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from taskrun.grpc_transport import choose_endpoints

__version__ = "0.1.0"

choose_endpoints()

if TYPE_CHECKING:
    from taskrun.cli.client import Client

__all__ = ["Client", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from taskrun.cli.client import Client

        return Client
    raise AttributeError(name)
