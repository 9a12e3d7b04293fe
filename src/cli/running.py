"""The running `taskrun` main module, for the command modules that main imports.

They register their parsers with main's helpers and open clients from main's global flags. When
the CLI runs as `python -m taskrun.cli.main`, that module is `__main__`, not `taskrun.cli.main`:
importing the latter would load a second copy, with its own parser helpers and state. (CliError
and the exit codes are in exits.py, of which there is one copy either way.)
"""

from __future__ import annotations

import sys
from typing import Any


def main_module() -> Any:
    running = sys.modules.get("__main__")
    if running is not None and hasattr(running, "build_parser") and hasattr(running, "CliError"):
        return running
    from taskrun.cli import main

    return main
