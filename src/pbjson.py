"""The protobuf JSON mapping of a message, as the HTTP API, MCP answers and webhook bodies show it.

The answer equals `json_format.MessageToDict(message, preserving_proto_field_name=True,
always_print_fields_with_no_presence=True)`: snake_case names; every field without presence
shown, with its default when unset; a field with presence (a message, a proto3 `optional`, a
oneof member) shown only when set; 64-bit integers as strings, enums by name (a number the enum
does not know as the number), bytes in base64, non-finite floats as "NaN" and "Infinity",
timestamps, durations and field masks as their strings. Keys come in the order of declaration
(json_format puts the fields that are set first; JSON objects have no order).

Why not json_format itself: it is pure Python that asks each field's descriptor what it is for
every value, calls `ListFields` and then walks the descriptor again for the defaults: a task
with one run took 88 µs, a page of 50 tasks 2.8 ms (this module: 23 µs and 0.8 ms, measured
together). Here each message type gets a printer on first use, generated from its descriptor as
straight-line Python, the way `dataclasses` writes `__init__`: for `Run` it reads

    def print_message(m):
        out = {}
        out['id'] = m.id
        out['task_id'] = m.task_id
        out['attempt'] = m.attempt
        out['worker_id'] = m.worker_id
        out['status'] = c4(m.status)            # the enum's name, by number
        if m.HasField('created_at'):
            out['created_at'] = c5(m.created_at)  # RFC 3339
        ...
        if m.HasField('usage'):
            out['usage'] = c11(m.usage)           # Usage's own printer
        ...
        return out

Types json_format prints its own way (the well-known types other than those three strings,
types with extensions, closed enums and enum values with options) are handed to json_format
whole, so the answer stays the same for every message; `test_pbjson.py` checks it on every
message type TaskRun defines, filled at random, field type by field type.
"""

from __future__ import annotations

import base64
import keyword
import math
from collections.abc import Callable
from datetime import date
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.internal import type_checkers
from google.protobuf.message import Message

__all__ = ["to_dict"]

Printer = Callable[[Message], Any]
Convert = Callable[[Any], Any]

# By descriptor, not by name: two descriptor pools may hold different types of the same name.
_printers: dict[Any, Printer] = {}


def to_dict(message: Message) -> dict[str, Any]:
    """The JSON mapping of `message` (see the module doc)."""
    printed: dict[str, Any] = _printer(message.DESCRIPTOR)(message)
    return printed


def _print_message(message: Message) -> Any:
    """A message field's value; a well-known type may print as a string or a list."""
    return _printer(message.DESCRIPTOR)(message)


def _printer(descriptor: Any) -> Printer:
    # Any: a message's DESCRIPTOR is upb's own class, which the stubs do not unify with
    # descriptor.Descriptor.
    try:
        return _printers[descriptor]
    except KeyError:
        pass
    printer = _json_format if _printed_by_json_format(descriptor) else _generate(descriptor)
    _printers[descriptor] = printer
    return printer


def _printed_by_json_format(descriptor: Descriptor) -> bool:
    """A well-known type (each has a JSON form of its own), a type with extensions, or one with
    an enum json_format may print otherwise: a closed enum (it refuses a number it does not
    know) or a value with options (they may give it a JSON name of its own)."""
    if descriptor.file.package == "google.protobuf" or descriptor.extension_ranges:
        return True
    for field in descriptor.fields:
        enum = field.enum_type
        if enum is not None and (
            enum.is_closed or any(value.GetOptions().ListFields() for value in enum.values)
        ):
            return True
    return False


def _generate(descriptor: Descriptor) -> Printer:
    """Straight-line code for the message's fields, in their order (see the module doc). A name
    enters the code only as a quoted key or, when it is an identifier and no keyword, as an
    attribute; any other is read with getattr."""
    lines = ["def print_message(m):", "    out = {}"]
    scope: dict[str, Any] = {}
    for index, field in enumerate(descriptor.fields):
        name = field.name
        plain = name.isidentifier() and not keyword.iskeyword(name)
        value = f"m.{name}" if plain else f"getattr(m, {name!r})"
        key = repr(name)
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            keys = entry.fields_by_name["key"]
            to_key = "_bool_key(k)" if keys.type == FieldDescriptor.TYPE_BOOL else "str(k)"
            item = _call(scope, f"c{index}", _converter(entry.fields_by_name["value"]), "v")
            lines.append(f"    out[{key}] = {{{to_key}: {item} for k, v in {value}.items()}}")
            continue
        convert = _converter(field)
        if field.is_repeated and convert is None:
            lines.append(f"    out[{key}] = list({value})")
        elif field.is_repeated:
            lines.append(
                f"    out[{key}] = [{_call(scope, f'c{index}', convert, 'v')} for v in {value}]"
            )
        elif field.has_presence:
            lines.append(f"    if m.HasField({key}):")
            lines.append(f"        out[{key}] = {_call(scope, f'c{index}', convert, value)}")
        else:
            lines.append(f"    out[{key}] = {_call(scope, f'c{index}', convert, value)}")
    lines.append("    return out")
    scope["_bool_key"] = _bool_key
    exec("\n".join(lines), scope)  # the code above, built from the descriptor alone
    printer: Printer = scope["print_message"]
    return printer


def _call(scope: dict[str, Any], name: str, convert: Convert | None, argument: str) -> str:
    if convert is None:
        return argument
    scope[name] = convert
    return f"{name}({argument})"


def _converter(field: Any) -> Convert | None:
    """How one value of `field` turns into JSON; None when it is its own JSON value."""
    kind = field.cpp_type
    if kind == FieldDescriptor.CPPTYPE_MESSAGE:
        name = field.message_type.full_name
        if name == "google.protobuf.Timestamp":
            return _timestamp
        if name in ("google.protobuf.Duration", "google.protobuf.FieldMask"):
            return _to_json_string
        return _print_message
    if kind == FieldDescriptor.CPPTYPE_ENUM:
        names = {value.number: value.name for value in field.enum_type.values}
        return lambda number: names.get(number, number)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return _bytes
    if kind in (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64):
        return str
    if kind == FieldDescriptor.CPPTYPE_DOUBLE:
        return _double
    if kind == FieldDescriptor.CPPTYPE_FLOAT:
        return _float
    return None  # strings, 32-bit integers and bools


def _json_format(message: Message) -> Any:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _to_json_string(message: Any) -> str:
    return message.ToJsonString()  # type: ignore[no-any-return]


# Timestamp.ToJsonString's text and range (years 1 to 9999), in about a third of its time: the
# date of a day is kept once made (a few hundred days cover what a control plane shows), and the
# time of day is read from tables of its 1,440 minutes and 60 seconds.
_MIN_SECONDS = -62135596800
_MAX_SECONDS = 253402300799
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_DAYS_KEPT = 4096
_dates: dict[int, str] = {}
_MINUTES = tuple(f"T{hour:02d}:{minute:02d}:" for hour in range(24) for minute in range(60))
_SECONDS = tuple(f"{second:02d}" for second in range(60))


def _timestamp(timestamp: Any) -> str:
    seconds: int = timestamp.seconds
    nanos: int = timestamp.nanos
    if not (_MIN_SECONDS <= seconds <= _MAX_SECONDS and 0 <= nanos < 1_000_000_000):
        return _to_json_string(timestamp)  # raises, naming the bad value, as json_format does
    days, second = divmod(seconds, 86400)
    day = _dates.get(days)
    if day is None:
        if len(_dates) >= _DAYS_KEPT:
            _dates.clear()
        day = _dates[days] = date.fromordinal(_EPOCH_ORDINAL + days).isoformat()
    minute, second = divmod(second, 60)
    text = day + _MINUTES[minute] + _SECONDS[second]
    if nanos == 0:
        return text + "Z"
    if nanos % 1_000_000 == 0:
        return f"{text}.{nanos // 1_000_000:03d}Z"
    if nanos % 1000 == 0:
        return f"{text}.{nanos // 1000:06d}Z"
    return f"{text}.{nanos:09d}Z"


def _bytes(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _bool_key(key: bool) -> str:
    return "true" if key else "false"


def _double(value: float) -> float | str:
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def _float(value: float) -> float | str:
    if math.isfinite(value):
        return type_checkers.ToShortestFloat(value)
    return _double(value)
