"""Domain errors. The server maps each kind onto one gRPC status code at its edge."""

from __future__ import annotations

from taskrun.core.text import clip_bytes

# A message travels in a gRPC trailer, which clients take up to 16 KiB of, percent-encoded
# (a byte may become three): a longer one would arrive as RESOURCE_EXHAUSTED, not as itself.
MAX_MESSAGE_BYTES = 2000


class TaskRunError(Exception):
    """Base of every domain error; `field` names the offending input when there is one."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        message = clip_bytes(message, MAX_MESSAGE_BYTES)
        super().__init__(message)
        self.message = message
        self.field = field if field is None else clip_bytes(field, 200)

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class InvalidArgument(TaskRunError):
    """The request is malformed (gRPC INVALID_ARGUMENT)."""


class NotFound(TaskRunError):
    """The named object does not exist (gRPC NOT_FOUND)."""


class FailedPrecondition(TaskRunError):
    """The object is not in a state that allows the operation (gRPC FAILED_PRECONDITION)."""


class AlreadyExists(TaskRunError):
    """A different object already holds this name or key (gRPC ALREADY_EXISTS)."""


class PermissionDenied(TaskRunError):
    """The caller's identity may not do this (gRPC PERMISSION_DENIED)."""


class ResourceExhausted(TaskRunError):
    """A size or rate limit was exceeded (gRPC RESOURCE_EXHAUSTED)."""


class Unauthenticated(TaskRunError):
    """The credentials are missing, unknown, used, expired or revoked (gRPC UNAUTHENTICATED)."""


class Unavailable(TaskRunError):
    """The control plane cannot serve this now, e.g. its store cannot write; retrying later may
    succeed (gRPC UNAVAILABLE). Nothing of the request took effect."""


class StoreUnavailable(Unavailable):
    """The store refused a write: the disk is full, the database is unreachable, or an earlier
    write failed and the store refuses writes until its owner resumes it."""
