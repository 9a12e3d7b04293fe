"""The `taskrun` command line, the TUI and the typed client.

grpc's C core writes INFO lines (`I1202 ... ssl_transport_security.cc ... Handshake failed`) to
stderr on its own; a command line reports errors itself, so only the core's errors are kept.
This runs before grpc is imported; an explicit GRPC_VERBOSITY wins, and processes started from
here (`taskrun dev`'s server and workers) inherit it.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
