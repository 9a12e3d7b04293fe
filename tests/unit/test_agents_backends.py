"""Agent plumbing that needs no server: registration, input schemas, prices, triage checking."""

from __future__ import annotations

import json

import jsonschema
import pytest

from taskrun.core.agent import AgentError
from taskrun.core.models import Usage
from taskrun.worker.agents import available_agents, load_agents
from taskrun.worker.agents.backends import announced_backends, check_input, cost_usd
from taskrun.worker.agents.support_triage import INPUT_SCHEMA as TRIAGE_INPUT
from taskrun.worker.agents.support_triage import violations


def test_the_four_agents_are_registered_and_load() -> None:
    assert {"echo", "anthropic", "claude_code", "support_triage"} <= set(available_agents())
    agents = load_agents(["echo", "anthropic", "claude_code", "support_triage"])
    for name, agent in agents.items():
        assert agent.spec.name == name
        jsonschema.Draft202012Validator.check_schema(json.loads(agent.spec.input_schema))
    assert agents["claude_code"].spec.supports_sessions
    assert not agents["anthropic"].spec.supports_sessions
    backend = agents["anthropic"].spec.backends[0]
    assert (backend.provider, backend.modalities) == ("anthropic", ("text",))
    assert "Read" in agents["claude_code"].spec.backends[0].tools


def test_the_configured_default_model_is_announced_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKRUN_ANTHROPIC_MODEL", "claude-custom-1")
    backends = announced_backends()
    assert backends[0].model_name == "claude-custom-1"
    assert backends[0].context_window == 0  # unknown model: unknown window
    assert "claude-sonnet-5-5" in [b.model_name for b in backends]


def test_cost_uses_the_price_table_and_is_zero_for_unknown_models() -> None:
    usage = Usage(input_tokens=1_000_000, output_tokens=100_000, cache_read_tokens=1_000_000)
    assert cost_usd("claude-haiku-5-5", usage) == pytest.approx(0.10 + 0.05 + 0.01)
    assert cost_usd("claude-opus-5-5", Usage(cache_creation_tokens=1_000_000)) == 5.0
    assert cost_usd("some-other-model", usage) == 0.0


def test_check_input_names_the_field() -> None:
    check_input(TRIAGE_INPUT, {"ticket_id": "T", "subject": "s", "body": "b"})
    with pytest.raises(AgentError, match=r"invalid input: backend: 'gpt' is not one of"):
        check_input(TRIAGE_INPUT, {"ticket_id": "T", "subject": "s", "body": "b", "backend": "gpt"})
    with pytest.raises(AgentError, match="'body' is a required property"):
        check_input(TRIAGE_INPUT, {"ticket_id": "T", "subject": "s"})


VALID = {"category": "billing", "priority": "low", "summary": "Wants an invoice copy."}


@pytest.mark.parametrize(
    "reply",
    [json.dumps(VALID), f"```json\n{json.dumps(VALID)}\n```", f"  {json.dumps(VALID)}\n"],
)
def test_triage_accepts_a_json_object_bare_or_fenced(reply: str) -> None:
    assert violations(reply) == (VALID, [])


@pytest.mark.parametrize(
    ("reply", "needle"),
    [
        ("It is a billing question.", "not valid JSON"),
        ("[1, 2]", "is not of type 'object'"),
        (json.dumps({**VALID, "summary": "x" * 201}), "summary: "),
        (json.dumps({**VALID, "priority": "p0"}), "priority: 'p0' is not one of"),
        (json.dumps({**VALID, "mood": "sad"}), "Additional properties are not allowed"),
        (json.dumps({"category": "bug"}), "'priority' is a required property"),
    ],
)
def test_triage_says_what_is_wrong(reply: str, needle: str) -> None:
    triage, problems = violations(reply)
    assert triage is None
    assert any(needle in p for p in problems), problems
