"""Which of gRPC's TCP endpoints TaskRun's processes use, chosen before grpc loads.

grpcio 1.80 moved Python's connections onto gRPC's EventEngine: every read and write on a
channel or an accepted connection runs on EventEngine's own threads, then goes to grpc.aio's
poller thread, then to the event loop. With the endpoints gRPC used before (its
`event_engine_client` and `event_engine_listener` experiments off), the poller thread reads and
writes the socket itself: fewer hand-overs between threads. Measured on two cores with grpcio
1.85.3, TLS on loopback, one message and its answer on an open stream: 178-249 µs instead of
269-352 µs, and about 5 context switches per process for each instead of 8. In
`scripts/bench`, alternating runs: the bare stream relay 0.51-0.65 ms p50 instead of
0.72-0.87 ms; TaskRun with its server and workers switched in the same run
(docs/performance.md): the sequential round trip 0.95 x, throughput 1.07 x, the server's CPU
per task 0.94 x.

gRPC reads `GRPC_EXPERIMENTS` once, when grpc is imported, so `taskrun`'s package sets it
(`choose_endpoints`) before any of TaskRun's modules imports grpc. It changes nothing when:
- `GRPC_EXPERIMENTS` is set already: the operator's choice (set it empty for gRPC's defaults);
- grpc was imported before TaskRun: its choice is made;
- the installed grpcio is not one in which these experiments were checked: gRPC means to remove
  them, and an experiment it does not know is an error line on every process's stderr. A newer
  grpcio gets its own defaults until its experiments are checked and `CHECKED` widened.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Container, MutableMapping
from importlib.util import find_spec
from pathlib import Path
from typing import Final

# The older endpoints, for both sides of a connection.
EXPERIMENTS: Final = "-event_engine_client,-event_engine_listener"
# grpcio releases (major, minor) whose experiments include both, and where they were measured.
CHECKED: Final = frozenset({(1, 85)})

_VERSION = re.compile(r'__version__\s*=\s*"""(\d+)\.(\d+)')


def grpcio_version() -> tuple[int, int] | None:
    """The installed grpcio's (major, minor), read without importing grpc (which would make
    gRPC's choice at once); None when it cannot be told."""
    try:
        spec = find_spec("grpc")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    try:
        text = (Path(spec.origin).parent / "_grpcio_metadata.py").read_text()
    except OSError:
        return None
    found = _VERSION.search(text)
    return (int(found[1]), int(found[2])) if found else None


def choose_endpoints(
    environ: MutableMapping[str, str] = os.environ,
    loaded: Container[str] = sys.modules,
) -> bool:
    """Set `GRPC_EXPERIMENTS` for the older endpoints, unless one of the cases above holds.
    True when it did."""
    if "GRPC_EXPERIMENTS" in environ or "grpc" in loaded:
        return False
    if grpcio_version() not in CHECKED:
        return False
    environ["GRPC_EXPERIMENTS"] = EXPERIMENTS
    return True
