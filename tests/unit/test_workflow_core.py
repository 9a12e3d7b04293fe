"""Workflow definitions, templates and the step graph (core.workflow), without a server."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from taskrun.core.errors import InvalidArgument
from taskrun.core.workflow import (
    StepStatus,
    Workflow,
    check_output,
    context_of,
    new_run,
    parse_definition,
    ready_steps,
    render,
    wait_due,
)

NOW = datetime(2026, 12, 2, 6, 30, tzinfo=UTC)


def workflow(text: str) -> Workflow:
    return Workflow("w", 1, parse_definition(text), NOW)


def refused(text: str) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        parse_definition(text)
    return info.value


def test_json_is_accepted_as_well_as_yaml() -> None:
    doc = parse_definition('{"name": "j", "steps": {"a": {"type": "wait", "duration": 1}}}')
    assert doc["steps"]["a"]["duration"] == 1


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("steps: {a: {type: wait, duration: 1}}", "(document)", "'name' is a required property"),
        ("name: x\nsteps: {}", "steps", "should be non-empty"),
        ("name: Bad Name\nsteps: {a: {type: wait, duration: 1}}", "name", "does not match"),
        ("name: x\nsteps: {a: {type: task, agent: e, colour: red}}", "steps.a", "colour"),
        (
            "name: x\nsteps: {a: {type: task, agent: e, policy: {max_attempts: 0}}}",
            "steps.a.policy.max_attempts",
            "less than the minimum",
        ),
        ("name: x\nsteps: {a: {type: wait}}", "steps.a", "either duration (seconds) or until"),
        ("name: x\nsteps: {a: {type: wait, duration: 1, until: '07:00'}}", "steps.a", "either"),
        (
            "name: x\nsteps: {a: {type: approval, question: q, choices: [x], branches: {y: []}}}",
            "steps.a.branches.y",
            "valid: x, approved, rejected, timeout",
        ),
        (
            "name: x\nsteps: {a: {type: approval, question: q, branches: {timeout: []}}}",
            "steps.a.branches.timeout",
            "needs a timeout",
        ),
        (
            "name: x\nsteps: {a: {type: task, agent: e, input: {t: '${input.[}'}}}",
            "steps.a.input.t",
            "JMESPath",
        ),
        (
            "name: x\nsteps: {a: {type: task, agent: e, output_schema: {type: nope}}}",
            "steps.a.output_schema",
            "JSON Schema",
        ),
        ("name: x\nsteps: {a: {type: wait, until: 'half past'}}", "steps.a.until", "HH:MM"),
        (
            "name: x\nsteps:\n  c: {type: condition, expression: 'true', then: [d]}\n"
            "  e: {type: condition, expression: 'true', then: [d]}\n  d: {type: wait, duration: 0}",
            "steps.e.then",
            "already a branch of 'c'",
        ),
        ("name: x\nsteps: [1, 2]", "steps", "is not of type 'object'"),
        ("name: x\nsteps: {a_: {type: wait, duration: 1}}", "steps", "does not match"),
        ("name: x\nsteps: {a: {type: task, agent: Echo}}", "steps.a.agent", "valid agent name"),
        (
            "name: x\nsteps: {a: {type: task, agent: e, labels: {k: 'v v'}}}",
            "steps.a.labels",
            "not a valid label value",
        ),
        (
            "name: x\nsteps: {a: {type: task, agent: e, policy: {priority: 100000}}}",
            "steps.a.policy.priority",
            "greater than the maximum of 1000",
        ),
        ("name: x\nsteps: {a: {type: wait, duration: 1}\n", "definition", "line 3"),
        ("name: x\nsteps:\n  no: {type: wait, duration: 1}\n", "steps.False", "quote it"),
        (
            "name: x\nsteps: {a: {type: task, agent: e, input: {when: 2026-12-24}}}",
            "steps.a.input.when",
            "datetime.date(2026, 12, 24) is not a JSON value",
        ),
        ("name: x\nsteps: {a: {type: wait, duration: .nan}}", "steps.a.duration", "finite"),
        (
            "name: x\nsteps:\n  a: {type: wait, duration: 1}\n"
            "  b: {type: wait, duration: 1, needs: [off]}\n",
            "steps.b.needs[0]",
            "False is not of type 'string' (YAML reads no/yes/on/off as booleans: quote it)",
        ),
        (
            "name: x\nsteps:\n  a: {type: task, agent: e, input: {x: &l [1, 1]}}\n"
            "  b: {type: task, agent: e, input: {y: [*l, *l]}}\n",
            "definition",
            "aliases (*name) are not allowed",
        ),
    ],
)
def test_invalid_definitions_name_the_path(text: str, field: str, words: str) -> None:
    error = refused(text)
    assert error.field == field, error
    assert words in error.message, error


def test_templates_keep_types_when_whole_and_write_text_otherwise() -> None:
    context = {"input": {"n": 3, "topic": "owls"}, "steps": {"a": {"result": {"xs": [1, 2]}}}}
    value = {"n": "${input.n}", "xs": "${steps.a.result.xs}", "t": "${input.topic}: ${input.n}"}
    assert render(value, context) == {"n": 3, "xs": [1, 2], "t": "owls: 3"}
    assert render(["${input.missing}"], context) == [None]


def test_a_branch_not_taken_is_skipped_and_a_join_runs_on_the_other() -> None:
    wf = workflow(
        "name: w\nsteps:\n"
        "  c: {type: condition, expression: 'input.go', then: [go_on], else: [stop]}\n"
        "  go_on: {type: wait, duration: 0}\n"
        "  stop: {type: wait, duration: 0}\n"
        "  after_no: {type: wait, duration: 0, needs: [stop]}\n"
        "  join: {type: wait, duration: 0, needs: [go_on, after_no]}\n"
    )
    run = new_run("r", wf, {"go": True}, NOW)
    assert ready_steps(wf, run) == (["c"], [])
    run.steps["c"].status, run.steps["c"].branch = StepStatus.COMPLETED, "then"
    assert ready_steps(wf, run) == (["go_on"], ["stop"])
    run.steps["go_on"].status = StepStatus.COMPLETED
    run.steps["stop"].status = StepStatus.SKIPPED
    assert ready_steps(wf, run) == ([], ["after_no"])
    run.steps["after_no"].status = StepStatus.SKIPPED
    assert ready_steps(wf, run) == (["join"], [])
    assert context_of(run)["steps"]["c"]["branch"] == "then"


def test_wait_until_a_local_time_in_a_zone() -> None:
    step = {"type": "wait", "until": "07:00", "timezone": "Europe/Paris"}
    due = wait_due(step, NOW)  # 06:30 UTC is 07:30 in Paris: tomorrow's 07:00
    assert due.astimezone(UTC) == datetime(2026, 12, 3, 6, 0, tzinfo=UTC)
    step = {"type": "wait", "until": "2026-12-24T18:00", "timezone": "America/New_York"}
    assert wait_due(step, NOW).astimezone(UTC) == datetime(2026, 12, 24, 23, 0, tzinfo=UTC)
    assert (wait_due({"duration": 90}, NOW) - NOW).total_seconds() == 90


def test_output_schema_problems_name_the_path() -> None:
    schema = {"type": "object", "required": ["score"], "properties": {"score": {"type": "integer"}}}
    assert check_output(schema, {"score": 3}) == ""
    assert (
        check_output(schema, {"score": "high"}) == "result.score: 'high' is not of type 'integer'"
    )
    assert check_output(schema, "text") == "result: 'text' is not of type 'object'"


def test_a_step_on_several_branches_of_one_decision_runs_on_any_of_them() -> None:
    wf = workflow(
        "name: w\nsteps:\n"
        "  ask: {type: approval, question: q, choices: [a, b, c], "
        "branches: {a: [one], b: [one], rejected: [one], c: [two]}}\n"
        "  one: {type: wait, duration: 0}\n"
        "  two: {type: wait, duration: 0}\n"
    )
    for branch, expected in (("a", (["one"], ["two"])), ("b", (["one"], ["two"]))):
        run = new_run("r", wf, {}, NOW)
        run.steps["ask"].status, run.steps["ask"].branch = StepStatus.COMPLETED, branch
        assert ready_steps(wf, run) == expected
    run = new_run("r", wf, {}, NOW)
    run.steps["ask"].status, run.steps["ask"].branch = StepStatus.COMPLETED, "c"
    assert ready_steps(wf, run) == (["two"], ["one"])


def test_a_workflow_run_and_an_inbox_item_survive_the_protobuf_round_trip() -> None:
    from taskrun import convert
    from taskrun.core.workflow import InboxItem, WorkflowRunStatus

    wf = workflow("name: w\nsteps: {ask: {type: approval, question: q, choices: [a]}}")
    run = new_run("wfr_1", wf, {"k": [1, None]}, NOW, key="key")
    run.status, run.error, run.finished_at = WorkflowRunStatus.FAILED, "step 'ask': no", NOW
    step = run.steps["ask"]
    step.status, step.result, step.branch = StepStatus.FAILED, {"decision": "rejected"}, "x"
    step.started_at = step.finished_at = step.due_at = NOW
    step.question, step.choices, step.comment, step.answered_by = "q?", ["a"], "no", "ana"
    step.inbox_item_id, step.error = "inb_1", "rejected by ana: no"
    assert convert.workflow_run_from_pb(convert.workflow_run_to_pb(run)) == run
    item = InboxItem("inb_1", "wfr_1", "w", "ask", "q?", ("a",), NOW, None)
    assert convert.inbox_item_from_pb(convert.inbox_item_to_pb(item)) == item
    assert convert.workflow_from_pb(convert.workflow_to_pb(wf)) == wf


@pytest.mark.parametrize("depth", [100, 20_000])
def test_deep_nesting_is_refused(depth: int) -> None:
    text = "name: x\nsteps: {a: {type: task, agent: e, input: {x: " + "[" * depth
    error = refused(text + "]" * depth + "}}}")
    assert error.message == "nests deeper than 64 levels"
