"""Page tokens: where a listing's next page starts, opaque to callers.

A token is `v1:` and the fields of the last item sent (an id; a name; a time and an id), in
URL-safe base64. One that is not ours is refused naming `page_token` and the call that gives
them, never taken for the first page.
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime

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
