"""Agent plumbing that needs no server: registration, input schemas, prices, triage checking."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import pytest

from taskrun.core.agent import AgentError, AgentResult, Readiness
from taskrun.core.models import AgentSpec, Usage
from taskrun.core.status import Fault
from taskrun.worker.agents import available_agents, load_agents
from taskrun.worker.agents.backends import announced_backends, check_input, choose_model, cost_usd
from taskrun.worker.agents.claude_cli import claude_result_fault
from taskrun.worker.agents.support_triage import INPUT_SCHEMA as TRIAGE_INPUT
from taskrun.worker.agents.support_triage import usable_backend, violations
from taskrun.worker.readiness import announce


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
    monkeypatch.delenv("TASKRUN_ANTHROPIC_MODELS", raising=False)
    monkeypatch.setenv("TASKRUN_ANTHROPIC_MODEL", "claude-custom-1")
    backends = announced_backends()
    assert backends[0].model_name == "claude-custom-1"
    assert backends[0].context_window == 0  # unknown model: unknown window
    # only what the worker is configured for, not every model of the price table
    assert [b.model_name for b in backends] == ["claude-custom-1"]


def test_configured_models_are_announced_the_first_being_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TASKRUN_ANTHROPIC_MODEL", raising=False)
    monkeypatch.setenv(
        "TASKRUN_ANTHROPIC_MODELS", " claude-opus-5-5, claude-haiku-5-5,,claude-opus-5-5"
    )
    assert [b.model_name for b in announced_backends()] == ["claude-opus-5-5", "claude-haiku-5-5"]
    assert choose_model("", None) == "claude-opus-5-5"
    assert choose_model("", "claude-haiku-5-5") == "claude-haiku-5-5"
    # the task's required model wins over the input's
    assert choose_model("claude-haiku-5-5", "claude-opus-5-5") == "claude-haiku-5-5"


def test_without_configuration_only_the_default_model_is_announced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("TASKRUN_ANTHROPIC_MODEL", "TASKRUN_ANTHROPIC_MODELS"):
        monkeypatch.delenv(name, raising=False)
    assert [b.model_name for b in announced_backends()] == ["claude-sonnet-5-5"]


def test_an_anthropic_agent_without_a_key_is_announced_unavailable_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no `claude login` credentials either
    agents = load_agents(["echo", "anthropic", "claude_code", "support_triage"])
    specs = {s.name: s for s in announce(agents)}
    assert specs["echo"].available
    for name in ("anthropic", "support_triage"):
        assert not specs[name].available
        assert "ANTHROPIC_API_KEY" in specs[name].unavailable_reason
    assert not specs["claude_code"].available
    assert "credentials" in specs["claude_code"].unavailable_reason

    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-x")
    specs = {s.name: s for s in announce(agents)}
    assert all(s.available for s in specs.values()), specs


def test_claude_code_without_its_cli_is_unavailable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-x")
    monkeypatch.setenv("TASKRUN_CLAUDE_CLI_PATH", str(tmp_path / "no-such-claude"))
    agents = load_agents(["claude_code"])
    [spec] = announce(agents)
    assert "TASKRUN_CLAUDE_CLI_PATH" in spec.unavailable_reason


def test_support_triage_is_available_where_either_backend_can_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("claude_agent_sdk", reason="needs the taskrun-agents[claude] extra")
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "TASKRUN_CLAUDE_CLI_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CLAUDE_CODE_OAUTH_TOKEN", "token")  # Claude Code only
    agents = load_agents(["anthropic", "claude_code", "support_triage"])
    specs = {s.name: s for s in announce(agents)}
    assert not specs["anthropic"].available
    assert specs["claude_code"].available and specs["support_triage"].available

    monkeypatch.delenv("CLAUDE_CODE_OAUTH_TOKEN")  # neither
    [spec] = announce({"support_triage": agents["support_triage"]})
    assert spec.unavailable_reason.startswith("neither backend can run here (backend anthropic: ")
    assert "backend claude_code: no credentials for Claude Code" in spec.unavailable_reason


def test_support_triage_picks_a_backend_this_worker_has_or_says_why_not() -> None:
    only_cli = {"anthropic": "no Anthropic credentials", "claude_code": ""}
    both = {"anthropic": "", "claude_code": ""}
    assert usable_backend(None, both) == "anthropic"
    assert usable_backend(None, only_cli) == "claude_code"
    assert usable_backend("claude_code", only_cli) == "claude_code"
    with pytest.raises(AgentError) as err:
        usable_backend("anthropic", only_cli)
    assert str(err.value) == (
        "input.backend: 'anthropic' cannot run on this worker (no Anthropic credentials); it has "
        "backend 'claude_code': leave `backend` out to use it, or run the task where anthropic "
        "can run"
    )
    assert err.value.fault is Fault.TASK  # the worker serves other triage tasks
    with pytest.raises(AgentError) as err:
        usable_backend(None, {"anthropic": "no key", "claude_code": "no CLI"})
    assert err.value.fault is Fault.WORKER


def test_a_readiness_check_that_raises_makes_the_agent_unavailable_not_the_worker_fail() -> None:
    class Broken:
        spec = AgentSpec("broken")

        async def run(self, ctx: object) -> AgentResult:
            raise AssertionError

        def readiness(self) -> Readiness:
            raise RuntimeError("boom")

    [spec] = announce({"broken": Broken()})
    assert spec.unavailable_reason == "its readiness check failed: boom"


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


@pytest.mark.parametrize(
    ("status", "said", "fault"),
    [
        (401, "Invalid API key", Fault.WORKER),
        (529, "Overloaded", Fault.WORKER),
        (503, "unavailable", Fault.WORKER),
        (429, "rate limited", Fault.WORKER),
        (None, "Not logged in · Please run /login", Fault.WORKER),
        (400, "prompt is too long", Fault.TASK),
        (None, "error_max_turns", Fault.TASK),
    ],
)
def test_claude_codes_own_failures_say_whose_fault_they_are(
    status: int | None, said: str, fault: Fault
) -> None:
    result = SimpleNamespace(api_error_status=status, errors=[], result=said, subtype="success")
    assert claude_result_fault(result) is fault
