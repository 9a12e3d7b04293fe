"""Identities carried in certificates: `spiffe://taskrun/<kind>/<name>` URI SANs."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

TRUST_DOMAIN = "taskrun"


class PrincipalKind(StrEnum):
    WORKER = "worker"
    OPERATOR = "operator"
    SERVER = "server"


@dataclass(frozen=True, slots=True)
class Principal:
    kind: PrincipalKind
    name: str

    @property
    def uri(self) -> str:
        return f"spiffe://{TRUST_DOMAIN}/{self.kind.value}/{self.name}"

    def __str__(self) -> str:
        return self.uri


def parse_spiffe_id(uri: str) -> Principal | None:
    """The principal named by a TaskRun SPIFFE id, or None if it is not one."""
    prefix = f"spiffe://{TRUST_DOMAIN}/"
    if not uri.startswith(prefix):
        return None
    kind, sep, name = uri[len(prefix) :].partition("/")
    if not sep or not name or "/" in name:
        return None
    try:
        return Principal(PrincipalKind(kind), name)
    except ValueError:
        return None
