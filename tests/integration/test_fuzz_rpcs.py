"""Every RPC of every service, fed random bytes, generated messages and mutated ones, by an
operator, a worker and an anonymous caller: no call may end UNKNOWN (an exception escaped a
handler) or INTERNAL (the guard caught one), and no reply may carry our internals.

Hypothesis drives a synchronous grpc client in a thread while the server runs on the test's
event loop. Bounded: a few hundred calls, a few seconds (TASKRUN_FUZZ_EXAMPLES=5000 for a
longer hunt).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskrun.controlplane.app import SERVICE_NAMES
from tests.conftest import Cluster
from tests.integration.test_security_round2 import INTERNALS

FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
STREAM_TIMEOUT = 0.3  # follow/watch calls with a valid request wait for news: cut them short

# Strings that have broken parsers before: trailing newlines, deep JSON, long numbers, huge text.
NASTY = [
    "enr-a\n",
    "echo\n",
    '{"a": ' + "[" * 5000 + "]" * 5000 + "}",
    '{"a": ' + "9" * 5000 + "}",
    '{"t": "\\ud800"}',
    "x" * 100_000,
    "spiffe://taskrun/worker/../x",
    "FREQ=DAILY;COUNT=99999999999999999999",
    "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
]
TEXT = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"]), max_size=40), st.sampled_from(NASTY)
)
INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return TEXT
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64) | TEXT.map(str.encode)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=32 if kind == FieldDescriptor.TYPE_FLOAT else 64)
    if kind == FieldDescriptor.TYPE_ENUM:
        return st.integers(-2, 12)
    low, high = INT_RANGES[kind]
    edges = st.sampled_from([low, high, 0, 1, -1 if low < 0 else 2, 2**62 if high > 2**62 else 7])
    return st.integers(low, high) | edges


def messages(desc: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of type `desc` with some fields set to generated values (nested up to 2 deep)."""
    cls = GetMessageClass(desc)

    @st.composite
    def build(draw: Callable[..., Any]) -> Message:
        message = cls()
        for field in desc.fields:
            if not draw(st.booleans()):
                continue
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                key_f, value_f = (
                    field.message_type.fields_by_name["key"],
                    field.message_type.fields_by_name["value"],
                )
                if value_f.message_type is not None:
                    continue
                entries = draw(st.dictionaries(scalar(key_f), scalar(value_f), max_size=3))
                getattr(message, field.name).update(entries)
            elif field.message_type is not None:
                if depth >= 2:
                    continue
                values = draw(st.lists(messages(field.message_type, depth + 1), max_size=2))
                if field.is_repeated:
                    getattr(message, field.name).extend(values)
                elif values:
                    getattr(message, field.name).CopyFrom(values[0])
            elif field.is_repeated:
                getattr(message, field.name).extend(draw(st.lists(scalar(field), max_size=3)))
            else:
                setattr(message, field.name, draw(scalar(field)))
        return message

    return build()


def mutate(data: bytes) -> st.SearchStrategy[bytes]:
    """`data` with a few bytes changed, inserted or cut."""

    def apply(edits: list[tuple[int, int, int]]) -> bytes:
        out = bytearray(data)
        for kind, at, value in edits:
            at = at % (len(out) + 1)
            if kind == 0 and out:
                out[at % len(out)] = value
            elif kind == 1:
                out.insert(at, value)
            else:
                del out[at:]
        return bytes(out)

    edit = st.tuples(st.integers(0, 2), st.integers(0, 1 << 16), st.integers(0, 255))
    return st.lists(edit, min_size=1, max_size=4).map(apply)


def payloads(desc: Descriptor) -> st.SearchStrategy[bytes]:
    valid = messages(desc).map(lambda m: m.SerializeToString())
    return st.one_of(st.binary(max_size=200), valid, valid.flatmap(mutate))


@dataclass(frozen=True)
class Rpc:
    path: str
    method: MethodDescriptor

    def __repr__(self) -> str:
        return self.path


def every_rpc() -> list[Rpc]:
    pool = descriptor_pool.Default()
    rpcs = []
    for name in SERVICE_NAMES:
        service = pool.FindServiceByName(name)
        rpcs += [Rpc(f"/{service.full_name}/{m.name}", m) for m in service.methods]
    return rpcs


def call(ch: grpc.Channel, rpc: Rpc, payload: bytes) -> grpc.StatusCode:
    """Send `payload` as the request (as it is: no serializer); the status the call ended with."""
    m = rpc.method
    try:
        if m.client_streaming:
            responses = ch.stream_stream(rpc.path)(iter([payload]), timeout=STREAM_TIMEOUT)
            for _ in responses:
                pass
        elif m.server_streaming:
            for _ in ch.unary_stream(rpc.path)(payload, timeout=STREAM_TIMEOUT):
                pass
        else:
            ch.unary_unary(rpc.path)(payload, timeout=5)
    except grpc.RpcError as err:
        code: grpc.StatusCode = err.code()
        details: str = err.details() or ""
        assert code not in FORBIDDEN, f"{rpc.path}: {code.name} {details!r} for {payload[:80]!r}"
        assert not INTERNALS.search(details), f"{rpc.path}: {details!r}"
        return code
    return grpc.StatusCode.OK


def fuzz(channels: dict[str, grpc.Channel]) -> None:
    rpcs = every_rpc()

    @settings(
        max_examples=int(os.environ.get("TASKRUN_FUZZ_EXAMPLES", "300")),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data(), rpc=st.sampled_from(rpcs), who=st.sampled_from(sorted(channels)))
    def one_call(data: st.DataObject, rpc: Rpc, who: str) -> None:
        payload = data.draw(payloads(rpc.method.input_type), label="payload")
        call(channels[who], rpc, payload)

    one_call()
    # and every RPC at least once with random bytes, whatever the draws above chose
    for rpc in rpcs:
        for ch in channels.values():
            call(ch, rpc, b"\xff\x00garbage")


async def test_no_rpc_ends_unknown_or_internal_whatever_it_is_sent(cluster: Cluster) -> None:
    await cluster.start_server(ca_key=cluster.pki.ca_key, public_listen="127.0.0.1:0")
    pki = cluster.pki
    ca = pki.ca_cert.read_bytes()

    def mtls(cert: bytes, key: bytes) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(ca, private_key=key, certificate_chain=cert)
        return grpc.secure_channel(cluster.address, creds)

    channels = {
        "operator": mtls(pki.operator_cert.read_bytes(), pki.operator_key.read_bytes()),
        "worker": mtls(
            pki.worker_cert("worker-5").read_bytes(), pki.worker_key("worker-5").read_bytes()
        ),
        "anonymous": grpc.secure_channel(cluster.public_address, grpc.ssl_channel_credentials(ca)),
    }
    try:
        async with asyncio.timeout(600):
            await asyncio.to_thread(fuzz, channels)
    finally:
        for ch in channels.values():
            ch.close()
