"""The JSON printer gives what json_format gives, for every message TaskRun defines and for every
kind of field protobuf has."""

from __future__ import annotations

import importlib
import math
import pkgutil
import random
from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf import (
    any_pb2,
    descriptor_pb2,
    descriptor_pool,
    duration_pb2,
    field_mask_pb2,
    json_format,
    message_factory,
    struct_pb2,
    timestamp_pb2,
    wrappers_pb2,
)
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from taskrun import pbjson, v1
from taskrun.v1 import common_pb2

# Every message module TaskRun generates, found rather than listed, so a new .proto is covered.
MODULES = [
    importlib.import_module(f"taskrun.v1.{info.name}")
    for info in pkgutil.iter_modules(v1.__path__)
    if info.name.endswith("_pb2")
]


def reference(message: Message) -> Any:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def all_types(descriptors: Iterator[Descriptor]) -> Iterator[Descriptor]:
    for descriptor in descriptors:
        if descriptor.GetOptions().map_entry:
            continue
        yield descriptor
        yield from all_types(iter(descriptor.nested_types))


TASKRUN_TYPES = sorted(
    (
        d
        for module in MODULES
        for d in all_types(iter(module.DESCRIPTOR.message_types_by_name.values()))
    ),
    key=lambda d: d.full_name,
)

WORDS = ("", "a", "héllo", "x" * 40, "line\nbreak", '{"k": [1, 2]}', "\u2603")


def fill(message: Message, rng: random.Random, depth: int = 0) -> None:
    """Set each field, at random, to a value of its kind (or leave it unset)."""
    descriptor = message.DESCRIPTOR
    wkt: Any = message  # a well-known type, filled through its own attributes
    if descriptor.full_name == "google.protobuf.Timestamp":
        wkt.seconds = rng.choice((0, 1, 1_764_800_000, -86_401, -62_135_596_800, 253_402_300_799))
        wkt.nanos = rng.choice((0, 5_000_000, 123_456_000, 7, 999_999_999))
        return
    if descriptor.full_name == "google.protobuf.Duration":
        wkt.seconds = rng.choice((0, 3, -4, 315_576_000_000))
        wkt.nanos = 0 if wkt.seconds == 315_576_000_000 else rng.choice((0, 10_000_000, 1))
        if wkt.seconds < 0:
            wkt.nanos = -wkt.nanos
        return
    if descriptor.full_name == "google.protobuf.Struct":
        wkt.update({"a": 1.5, "b": [True, None, "s"], "c": {"d": "e"}})
        return
    if descriptor.full_name == "google.protobuf.Value":
        wkt.string_value = rng.choice(WORDS)
        return
    if descriptor.full_name == "google.protobuf.Any":
        wkt.Pack(timestamp_pb2.Timestamp(seconds=rng.randrange(10**9)))
        return
    for field in descriptor.fields:
        if field.containing_oneof is not None and rng.random() < 0.5:
            continue
        if rng.random() < (0.25 if depth == 0 else 0.85):
            continue  # left unset (most of them below the top, so the message stays small)
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            target = getattr(message, field.name)
            for _ in range(rng.randrange(3)):
                key = scalar(entry.fields_by_name["key"], rng)
                value_field = entry.fields_by_name["value"]
                if value_field.message_type is not None:
                    if depth < 2:
                        fill(target[key], rng, depth + 1)
                else:
                    target[key] = scalar(value_field, rng)
        elif field.is_repeated:
            target = getattr(message, field.name)
            for _ in range(rng.randrange(3)):
                if field.message_type is not None:
                    if depth < 2:
                        fill(target.add(), rng, depth + 1)
                else:
                    target.append(scalar(field, rng))
        elif field.message_type is not None:
            if depth < 2:
                fill(getattr(message, field.name), rng, depth + 1)
                getattr(message, field.name).SetInParent()
        else:
            setattr(message, field.name, scalar(field, rng))


def scalar(field: Any, rng: random.Random) -> Any:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return rng.choice(WORDS)
    if kind == FieldDescriptor.TYPE_BYTES:
        return rng.choice((b"", b"\x00\xff", b"\xfb\xef\xff", "héllo".encode()))
    if kind == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if kind == FieldDescriptor.TYPE_ENUM:
        numbers = [v.number for v in field.enum_type.values]
        return rng.choice([*numbers, 99]) if not field.enum_type.is_closed else rng.choice(numbers)
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return rng.choice(
            (
                0.0,
                -1.5,
                0.1,
                1e300 if kind == FieldDescriptor.TYPE_DOUBLE else 3.4e38,
                math.inf,
                -math.inf,
                math.nan,
            )
        )
    unsigned = kind in (
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_FIXED64,
    )
    wide = field.cpp_type in (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64)
    top = 2**63 - 1 if wide else 2**31 - 1
    if unsigned:
        return rng.choice((0, 1, top, 2 * top + 1))
    return rng.choice((0, 1, -1, top, -top - 1))


def same(message: Message) -> None:
    expected = reference(message)
    got = pbjson.to_dict(message)
    assert got == expected or _equal_with_nan(got, expected), (got, expected)


def _equal_with_nan(a: Any, b: Any) -> bool:
    """Equality in which NaN equals NaN (json_format prints a NaN double as "NaN" anyway)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal_with_nan(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_equal_with_nan, a, b))
    return bool(a == b) and type(a) is type(b)


@pytest.mark.parametrize("descriptor", TASKRUN_TYPES, ids=lambda d: d.full_name)
def test_every_taskrun_message_prints_as_json_format_prints_it(descriptor: Descriptor) -> None:
    cls = message_factory.GetMessageClass(descriptor)
    same(cls())  # nothing set: every default shown
    rng = random.Random(descriptor.full_name)
    for _ in range(25):
        message = cls()
        fill(message, rng)
        same(message)


def test_the_keys_come_in_the_order_of_declaration() -> None:
    task = common_pb2.Task(id="t", status=common_pb2.TASK_STATUS_COMPLETED, result_json="{}")
    task.created_at.seconds = 1
    task.runs.add(id="r")
    printed = list(pbjson.to_dict(task))
    declared = [f.name for f in task.DESCRIPTOR.fields]
    assert printed == [name for name in declared if name in printed]
    assert "finished_at" not in printed and "policy" not in printed  # unset, with presence


# A proto3 file with every kind of field, the well-known types json_format prints its own way,
# a oneof, proto3 optionals, maps of every key kind and a field named by a Python keyword.
SCALAR_KINDS = [
    "double",
    "float",
    "int32",
    "int64",
    "uint32",
    "uint64",
    "sint32",
    "sint64",
    "fixed32",
    "fixed64",
    "sfixed32",
    "sfixed64",
    "bool",
    "string",
    "bytes",
]


def _all_kinds_class() -> type[Message]:
    f = descriptor_pb2.FileDescriptorProto(
        name="pbjson_test.proto",
        package="pbjsontest",
        syntax="proto3",
        dependency=[
            "google/protobuf/timestamp.proto",
            "google/protobuf/duration.proto",
            "google/protobuf/field_mask.proto",
            "google/protobuf/struct.proto",
            "google/protobuf/any.proto",
            "google/protobuf/wrappers.proto",
        ],
    )
    enum = f.enum_type.add(name="Color")
    enum.value.add(name="COLOR_UNSPECIFIED", number=0)
    enum.value.add(name="COLOR_RED", number=1)
    m = f.message_type.add(name="AllKinds")
    T = descriptor_pb2.FieldDescriptorProto
    number = iter(range(1, 1000))

    def add(
        name: str, kind: int, *, label: int = T.LABEL_OPTIONAL, type_name: str = "", **kw: Any
    ) -> None:
        if type_name:
            kw["type_name"] = type_name
        m.field.add(name=name, number=next(number), type=kind, label=label, **kw)

    for name in SCALAR_KINDS:
        kind = getattr(T, f"TYPE_{name.upper()}")
        add(f"one_{name}", kind)
        add(f"many_{name}", kind, label=T.LABEL_REPEATED)
    add("color", T.TYPE_ENUM, type_name=".pbjsontest.Color")
    add("colors", T.TYPE_ENUM, type_name=".pbjsontest.Color", label=T.LABEL_REPEATED)
    for wkt in (
        "Timestamp",
        "Duration",
        "FieldMask",
        "Struct",
        "Value",
        "ListValue",
        "Any",
        "Int64Value",
        "StringValue",
        "BoolValue",
        "DoubleValue",
    ):
        add(f"wkt_{wkt.lower()}", T.TYPE_MESSAGE, type_name=f".google.protobuf.{wkt}")
    add("stamps", T.TYPE_MESSAGE, type_name=".google.protobuf.Timestamp", label=T.LABEL_REPEATED)
    add("child", T.TYPE_MESSAGE, type_name=".pbjsontest.AllKinds")
    add("children", T.TYPE_MESSAGE, type_name=".pbjsontest.AllKinds", label=T.LABEL_REPEATED)
    add("from", T.TYPE_STRING)  # a Python keyword
    m.oneof_decl.add(name="choice")
    add("choice_text", T.TYPE_STRING, oneof_index=len(m.oneof_decl) - 1)
    add(
        "choice_child",
        T.TYPE_MESSAGE,
        type_name=".pbjsontest.AllKinds",
        oneof_index=len(m.oneof_decl) - 1,
    )
    # proto3 optionals: each sits in a synthetic oneof of its own, after the real ones.
    for name, kind in (
        ("maybe_int", T.TYPE_INT64),
        ("maybe_text", T.TYPE_STRING),
        ("maybe_color", T.TYPE_ENUM),
    ):
        m.oneof_decl.add(name=f"_{name}")
        add(
            name,
            kind,
            proto3_optional=True,
            oneof_index=len(m.oneof_decl) - 1,
            type_name=".pbjsontest.Color" if kind == T.TYPE_ENUM else "",
        )
    for key_kind in ("string", "int32", "int64", "uint64", "bool", "sint32", "fixed64"):
        for value_name, value_kind, value_type in (
            ("text", T.TYPE_STRING, ""),
            ("child", T.TYPE_MESSAGE, ".pbjsontest.AllKinds"),
            ("color", T.TYPE_ENUM, ".pbjsontest.Color"),
            ("stamp", T.TYPE_MESSAGE, ".google.protobuf.Timestamp"),
        ):
            entry_name = f"Map{key_kind.title()}{value_name.title()}Entry"
            entry = m.nested_type.add(name=entry_name)
            entry.options.map_entry = True
            entry.field.add(
                name="key",
                number=1,
                type=getattr(T, f"TYPE_{key_kind.upper()}"),
                label=T.LABEL_OPTIONAL,
            )
            value = entry.field.add(name="value", number=2, type=value_kind, label=T.LABEL_OPTIONAL)
            if value_type:
                value.type_name = value_type
            add(
                f"map_{key_kind}_{value_name}",
                T.TYPE_MESSAGE,
                type_name=f".pbjsontest.AllKinds.{entry_name}",
                label=T.LABEL_REPEATED,
            )
    pool = descriptor_pool.DescriptorPool()
    for dependency in (
        timestamp_pb2,
        duration_pb2,
        field_mask_pb2,
        struct_pb2,
        any_pb2,
        wrappers_pb2,
    ):
        pool.AddSerializedFile(dependency.DESCRIPTOR.serialized_pb)
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("pbjsontest.AllKinds"))


def test_every_kind_of_field_prints_as_json_format_prints_it() -> None:
    cls = _all_kinds_class()
    same(cls())
    rng = random.Random(7)
    for _ in range(300):
        message = cls()
        fill(message, rng)
        same(message)


def test_a_timestamp_out_of_range_is_refused_as_json_format_refuses_it() -> None:
    task = common_pb2.Task(id="t")
    task.created_at.seconds = 253_402_300_800  # the year 10000
    with pytest.raises(json_format.SerializeToJsonError):
        reference(task)
    with pytest.raises(ValueError, match="Timestamp"):
        pbjson.to_dict(task)


def test_a_closed_enum_or_extensions_leave_the_message_to_json_format() -> None:
    f = descriptor_pb2.FileDescriptorProto(name="pbjson_proto2.proto", package="pbjson2")
    enum = f.enum_type.add(name="Size")
    enum.value.add(name="SIZE_SMALL", number=1)
    T = descriptor_pb2.FieldDescriptorProto
    closed = f.message_type.add(name="Closed")
    closed.field.add(
        name="size", number=1, type=T.TYPE_ENUM, type_name=".pbjson2.Size", label=T.LABEL_OPTIONAL
    )
    extendable = f.message_type.add(name="Extendable")
    extendable.field.add(name="n", number=1, type=T.TYPE_INT64, label=T.LABEL_OPTIONAL)
    extendable.extension_range.add(start=100, end=200)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    for name in ("pbjson2.Closed", "pbjson2.Extendable"):
        cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(name))
        message = cls()
        same(message)
        fill(message, random.Random(1))
        same(message)
        assert pbjson._printers[cls.DESCRIPTOR] is pbjson._json_format


def test_two_types_of_one_name_in_two_pools_each_print_their_own_fields() -> None:
    printed = []
    for field_name in ("first", "second"):
        f = descriptor_pb2.FileDescriptorProto(name="dup.proto", package="dup", syntax="proto3")
        m = f.message_type.add(name="M")
        m.field.add(
            name=field_name,
            number=1,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
            label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
        )
        pool = descriptor_pool.DescriptorPool()
        pool.Add(f)
        cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("dup.M"))
        printed.append(pbjson.to_dict(cls(**{field_name: "x"})))
    assert printed == [{"first": "x"}, {"second": "x"}]
