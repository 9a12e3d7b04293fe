"""structlog setup: JSON lines for daemons, readable console output for `taskrun dev`.

structlog is imported only by `configure_logging`: with rich installed (the TUI needs it),
importing structlog imports rich's pretty-printer and tracebacks too, 70 ms of every start of a
CLI command that logs nothing (measured), and `wants_color` is all those commands need here.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import IO


def wants_color(stream: IO[str]) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


def configure_logging(json: bool, level: str = "info") -> None:
    """Route structlog (and stdlib logging) to stderr in one format."""
    import structlog

    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=wants_color(sys.stderr))
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr)
