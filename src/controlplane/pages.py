"""Page tokens: where a listing's next page starts, opaque to callers.

A token is `v1:` and the fields of the last item sent (an id; a name; a time and an id), in
URL-safe base64. One that is not ours is refused naming `page_token` and the call that gives
them, never taken for the first page.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Protocol, TypeVar

from google.protobuf.message import Message

from taskrun.controlplane.sizing import fitting
from taskrun.core import errors

_MAX_TEXT = 300  # a token's decoded text: ids, names and a time are far shorter


def page_token(*fields: str) -> str:
    return base64.urlsafe_b64encode(":".join(("v1", *fields)).encode()).decode()


def token_fields(token: str, count: int, listing: str) -> list[str]:
    """The `count` fields of a token from `listing` ([] for "", the first page)."""
    if not token:
        return []
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    fields = text.split(":", count)
    if len(text) > _MAX_TEXT or len(fields) != count + 1 or fields[0] != "v1":
        raise errors.InvalidArgument(f"is not a token returned by {listing}", field="page_token")
    return fields[1:]


def token_field(token: str, listing: str) -> str:
    """The one field of a token from `listing` ("" for the first page)."""
    fields = token_fields(token, 1, listing)
    return fields[0] if fields else ""


def position_token(created_at: datetime, item_id: str) -> str:
    """A token after the item created at `created_at` with `item_id`."""
    return page_token(str(round(created_at.timestamp() * 1_000_000)), item_id)


def token_position(token: str, listing: str) -> tuple[datetime, str] | None:
    """(created_at, id) of the last item of the page before (None for the first page)."""
    if not (fields := token_fields(token, 2, listing)):
        return None
    micros, item_id = fields
    if not micros.isdigit():
        raise errors.InvalidArgument(f"is not a token returned by {listing}", field="page_token")
    return datetime.fromtimestamp(int(micros) / 1_000_000, UTC), item_id


class Dated(Protocol):
    @property
    def created_at(self) -> datetime: ...
    @property
    def id(self) -> str: ...


D = TypeVar("D", bound=Dated)
M = TypeVar("M", bound=Message)


def page_size(value: int, most: int = 1000) -> int:
    """A request's `page_size`: 0 for as many as fit one message."""
    if not 0 <= value <= most:
        raise errors.InvalidArgument(f"must be between 0 and {most}", field="page_size")
    return value


def dated_page(
    items: Sequence[D],
    size: int,
    token: str,
    listing: str,
    to_pb: Callable[[D], M],
    budget: int,
) -> tuple[list[M], str]:
    """One page of `items` (oldest first, by created_at and id) after `token`: at most `size`
    (0: no count), as many as fit `budget` bytes; and the next page's token ("" at the end)."""
    after = token_position(token, listing)
    rest = [i for i in items if after is None or (i.created_at, i.id) > after]
    size = size or len(rest)
    listed, cut = fitting((to_pb(i) for i in rest[:size]), budget)
    if not (cut or len(rest) > size) or not listed:
        return listed, ""
    last = rest[len(listed) - 1]
    return listed, position_token(last.created_at, last.id)
