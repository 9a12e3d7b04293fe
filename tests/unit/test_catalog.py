"""The agent catalog's input checks: a text found valid is remembered for that schema only."""

from __future__ import annotations

import json

import pytest

from taskrun.controlplane.catalog import VALID_INPUTS_KEPT, AgentCatalog
from taskrun.core.errors import InvalidArgument
from taskrun.core.models import AgentSpec


def spec(required: str) -> AgentSpec:
    schema = {"type": "object", "required": [required], "properties": {required: {}}}
    return AgentSpec(name="triage", input_schema=json.dumps(schema))


def test_a_text_valid_under_one_schema_is_checked_again_under_the_next() -> None:
    catalog = AgentCatalog()
    catalog.learn([spec("ticket")])
    catalog.check_input_text("triage", '{"ticket":"T-1"}')
    catalog.check_input_text("triage", '{"ticket":"T-1"}')  # remembered: passes again
    catalog.learn([spec("body")])  # the worker announced a new schema
    with pytest.raises(InvalidArgument, match="'body' is a required property") as caught:
        catalog.check_input_text("triage", '{"ticket":"T-1"}', "tasks[3].input_json")
    assert caught.value.field == "tasks[3].input_json"


def test_an_invalid_text_is_refused_every_time() -> None:
    catalog = AgentCatalog()
    catalog.learn([spec("ticket")])
    for _ in range(2):
        with pytest.raises(InvalidArgument, match="'ticket' is a required property"):
            catalog.check_input_text("triage", '{"subject":"s"}')


def test_what_is_remembered_stays_bounded() -> None:
    catalog = AgentCatalog()
    catalog.learn([spec("ticket")])
    for n in range(VALID_INPUTS_KEPT * 3):
        catalog.check_input_text("triage", json.dumps({"ticket": n}))
    entry = catalog._agents["triage"]
    assert 0 < len(entry.valid_inputs) <= VALID_INPUTS_KEPT


def test_unknown_agents_and_agents_without_a_schema_pass() -> None:
    catalog = AgentCatalog()
    catalog.learn([AgentSpec(name="echo")])
    catalog.check_input_text("echo", '{"anything":1}')
    catalog.check_input_text("nobody", '{"anything":1}')
