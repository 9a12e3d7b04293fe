"""The exit codes of `taskrun`, its CliError, and how a gRPC error becomes a message and a code.

Apart from main so that the command modules import them directly: when the CLI runs as
`python -m taskrun.cli.main` there are two copies of main, but one of this module.
"""

from __future__ import annotations

import grpc

from taskrun.core.status import TaskStatus

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_CANCELLED = 130
EXIT_INTERRUPTED = 130

# gRPC status codes that mean "your request is wrong" rather than "something broke".
_CALLER_ERRORS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
# CANCELLED too: this CLI never causes it as an error (Ctrl-C is handled apart), so it is the
# server ending the call as it stopped, which is to try again like a server not reached.
_UNREACHABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)

FOLLOW_EXIT_HELP = (
    "With --follow the exit status is the task's outcome: 0 COMPLETED, 1 FAILED, 130 CANCELLED "
    "(Ctrl-C stops following without cancelling the task, and also exits 130). "
    "Other exit codes: 2 invalid request, 3 server unreachable."
)


class CliError(Exception):
    """A problem to report as `error: <message>` with an exit code, without a traceback."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# --- exit codes ------------------------------------------------------------------------------


def exit_code_for_status(code: grpc.StatusCode) -> int:
    """2 for a request the server refused, 3 when it could not be reached, 1 otherwise."""
    if code in _CALLER_ERRORS:
        return EXIT_USAGE
    if code in _UNREACHABLE:
        return EXIT_UNAVAILABLE
    return EXIT_FAILED


def exit_code_for_task(status: TaskStatus) -> int:
    """The exit status of a command that followed a task until it ended."""
    return {
        TaskStatus.COMPLETED: EXIT_OK,
        TaskStatus.FAILED: EXIT_FAILED,
        TaskStatus.CANCELLED: EXIT_CANCELLED,
    }.get(status, EXIT_FAILED)


def describe_rpc_error(exc: grpc.aio.AioRpcError, server: str) -> str:
    """`error: NOT_FOUND: task_id: no task 'x'`, with a hint when the server is unreachable."""
    code = exc.code()
    text = f"error: {code.name}: {exc.details() or 'no details'}"
    if code == grpc.StatusCode.UNAVAILABLE:
        text += (
            f"\nis the server running at {server}? (a certificate the server rejects, or a "
            "server name that does not match its certificate, also shows up as UNAVAILABLE)"
        )
    elif code == grpc.StatusCode.CANCELLED:
        text += (
            f"\nthe server at {server} ended the call, as a server that is stopping does: whether "
            "it took effect is unknown (a task created with --idempotency-key may be created "
            "again with the same key, and is then not created twice)"
        )
    return text
