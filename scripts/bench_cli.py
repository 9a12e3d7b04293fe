"""The command line's figure for scripts/bench: `taskrun task create echo --follow` as a person
runs it, a new process each time, against a Python process that imports nothing.

A person who types the command waits for the interpreter to start and import the CLI, the
parser, the connection (mTLS) and the task's round trip; the sequential latency figure has only
the last of them. With --compare-ref the sides take turns, each command run with its side's
code (its PYTHONPATH) against its side's control plane. The commands run as installed code
does, from bytecode caches (see `benchprocs.child_env`; an unmeasured first round writes them).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench_compare import Side
from benchprocs import BenchError, child_env

from taskrun.controlplane.pki import PkiPaths

ECHO_INPUT = '{"text": "x"}'  # the sequential latency figure's echo task
# A mistyped command, or one whose task did not complete, fails the bench rather than its figure.
COMMAND_TIMEOUT = 30.0


@dataclass
class CommandLine:
    """Milliseconds from starting each process until it exited, p50 over the runs."""

    runs: int
    python_start_ms: float  # `python -c pass`: the interpreter, importing nothing
    cli_import_ms: float  # `python -c "import taskrun.cli.main"`
    create_follow_ms: float  # `taskrun task create echo --input ... --follow`, exit 0


def _cli_script() -> list[str]:
    """The `taskrun` a person runs (the console script beside this interpreter), else -m."""
    script = Path(sys.executable).with_name("taskrun")
    return [str(script)] if script.exists() else [sys.executable, "-m", "taskrun.cli.main"]


async def _timed(argv: Sequence[str], side: Side | None) -> float:
    """Seconds from starting `argv` until it exited 0."""
    env = child_env(side.env if side is not None else None)  # from bytecode caches
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        async with asyncio.timeout(COMMAND_TIMEOUT):
            _, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BenchError(f"{' '.join(argv)} did not exit within {COMMAND_TIMEOUT:g} s") from None
    took = time.perf_counter() - started
    if proc.returncode != 0:
        raise BenchError(
            f"{' '.join(argv)} exited {proc.returncode}: {err.decode(errors='replace').strip()}"
        )
    return took


async def measure_cli(
    sides: Sequence[Side], addresses: Sequence[str], pki: PkiPaths, runs: int
) -> list[CommandLine]:
    """`runs` rounds after an unmeasured one; in each, a bare Python start, then each side's
    import and command."""

    async def one_round() -> tuple[float, list[tuple[float, float]]]:
        bare = await _timed([sys.executable, "-c", "pass"], None)
        each = []
        for side, address in zip(sides, addresses, strict=True):
            imported = await _timed([sys.executable, "-c", "import taskrun.cli.main"], side)
            argv = [
                *_cli_script(),
                "--server",
                address,
                "--certs-dir",
                str(pki.directory),
                "task",
                "create",
                "echo",
                "--input",
                ECHO_INPUT,
                "--follow",
            ]
            each.append((imported, await _timed(argv, side)))
        return bare, each

    await one_round()  # writes the bytecode caches
    rounds = [await one_round() for _ in range(runs)]
    return [
        CommandLine(
            runs=runs,
            python_start_ms=_p50_ms([bare for bare, _ in rounds]),
            cli_import_ms=_p50_ms([each[i][0] for _, each in rounds]),
            create_follow_ms=_p50_ms([each[i][1] for _, each in rounds]),
        )
        for i in range(len(sides))
    ]


def _p50_ms(seconds: list[float]) -> float:
    ordered = sorted(seconds)
    return ordered[(len(ordered) - 1) // 2] * 1000
