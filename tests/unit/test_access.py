"""Access-control rules that need no network: scopes, token strings, and the audit refusal cap."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskrun.controlplane.access import REJECTIONS_PER_WINDOW, AccessControl
from taskrun.controlplane.config import ServerConfig
from taskrun.controlplane.engine import Engine
from taskrun.controlplane.pki import PkiPaths
from taskrun.controlplane.store.memory import MemoryStore
from taskrun.core.access import (
    API_PREFIX,
    BOOTSTRAP_PREFIX,
    AuditKind,
    AuditQuery,
    Scope,
    grants,
    new_token,
    parse_token,
    secret_matches,
)
from taskrun.core.errors import FailedPrecondition


@pytest.mark.parametrize(
    ("held", "needed", "allowed"),
    [
        ({Scope.READ}, Scope.READ, True),
        ({Scope.READ}, Scope.SUBMIT, False),
        ({Scope.READ}, Scope.ADMIN, False),
        ({Scope.SUBMIT}, Scope.READ, True),
        ({Scope.SUBMIT}, Scope.SUBMIT, True),
        ({Scope.SUBMIT}, Scope.ADMIN, False),
        ({Scope.ADMIN}, Scope.SUBMIT, True),
        ({Scope.ADMIN}, Scope.READ, True),
        (set(), Scope.READ, False),
    ],
)
def test_scopes_grant_what_they_include(held: set[Scope], needed: Scope, allowed: bool) -> None:
    assert grants(frozenset(held), needed) is allowed


def test_a_token_parses_only_as_its_own_kind_and_matches_only_its_secret() -> None:
    issued = new_token(BOOTSTRAP_PREFIX)
    parsed = parse_token(issued.token, BOOTSTRAP_PREFIX)
    assert parsed is not None and parsed.token_id == issued.token_id
    assert secret_matches(parsed.secret, issued.secret_hash)
    assert not secret_matches(parsed.secret[:-1] + "x", issued.secret_hash)
    assert parse_token(issued.token, API_PREFIX) is None
    assert len(parsed.secret) == 43  # 32 random bytes, URL-safe base64


@pytest.mark.parametrize(
    "text", ["", "trb_", "trb_abc.def", "tra_0123456789abcdef." + "a" * 43, "x" * 80]
)
def test_malformed_bootstrap_tokens_do_not_parse(text: str) -> None:
    assert parse_token(text, BOOTSTRAP_PREFIX) is None


async def test_a_flood_of_refusals_is_stored_only_up_to_the_cap_per_window(
    pki: PkiPaths,
) -> None:
    store = MemoryStore()
    config = ServerConfig(store="memory", ca_cert=pki.ca_cert)
    engine = Engine(store, config)
    await engine.start()
    access = AccessControl(engine, config)
    await access.load()
    for n in range(REJECTIONS_PER_WINDOW + 50):
        access.audit(AuditKind.REQUEST_REJECTED, detail=f"refusal {n}", rejection=True)
    access.audit(AuditKind.WORKER_REVOKED, subject="worker-9", detail="revoked")
    events = await access.list_audit_events(AuditQuery(limit=1000))
    refusals = [e for e in events if e.kind is AuditKind.REQUEST_REJECTED]
    assert len(refusals) == REJECTIONS_PER_WINDOW
    assert access.suppressed_rejections == 50
    # events that are not refusals are always stored
    assert events[0].kind is AuditKind.WORKER_REVOKED


async def test_without_the_ca_key_enrollment_is_refused_naming_the_missing_file(
    pki: PkiPaths, tmp_path: Path
) -> None:
    store = MemoryStore()
    config = ServerConfig(store="memory", ca_cert=pki.ca_cert, ca_key=tmp_path / "absent.pem")
    engine = Engine(store, config)
    await engine.start()
    access = AccessControl(engine, config)
    await access.load()
    with pytest.raises(FailedPrecondition, match=r"absent\.pem"):
        await access.enroll("trb_" + "0" * 16 + "." + "a" * 43, b"", "host", "peer")
