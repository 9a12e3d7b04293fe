"""Core: ids, status machines and validation rules (each rule with a bad value)."""

from __future__ import annotations

import dataclasses
import random
import time
from datetime import UTC, datetime

import pytest

from taskrun.core.durations import human_duration
from taskrun.core.errors import InvalidArgument
from taskrun.core.identity import Principal, PrincipalKind, parse_spiffe_id
from taskrun.core.ids import (
    ConversationId,
    RunId,
    TaskId,
    WorkerId,
    is_valid_worker_id,
    new_run_id,
    new_task_id,
)
from taskrun.core.models import ModelSettings, Task, TaskPolicy, TaskSpec, Usage
from taskrun.core.status import (
    RUN_TRANSITIONS,
    TASK_TERMINAL,
    TASK_TRANSITIONS,
    RunStatus,
    TaskStatus,
    run_can_move,
    task_can_move,
)
from taskrun.core.validation import (
    parse_label_args,
    validate_input,
    validate_policy,
    validate_task_spec,
)


def test_ids_are_prefixed_and_unique() -> None:
    ids = [new_task_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(i.startswith("tsk_") and len(i) == 30 for i in ids)
    assert new_run_id().startswith("run_")


def test_ids_from_later_milliseconds_sort_after() -> None:
    earlier = new_task_id()
    time.sleep(0.002)
    assert new_task_id() > earlier


@pytest.mark.parametrize("bad", ["", "UPPER", "-lead", "trail-", "has space", "x" * 65, "a/b"])
def test_bad_worker_ids(bad: str) -> None:
    assert not is_valid_worker_id(bad)


def test_good_worker_ids() -> None:
    assert is_valid_worker_id("worker-1")
    assert is_valid_worker_id("gpu.box_7")


def test_terminal_states_have_no_way_out() -> None:
    for status in (TaskStatus.FAILED, TaskStatus.CANCELLED):
        assert status.terminal and not TASK_TRANSITIONS[status]
    # a completed task can only be continued (a follow-up message starts a new run)
    assert all(not TASK_TRANSITIONS[s] for s in TASK_TERMINAL)  # terminal is terminal
    for run_status in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.LOST):
        assert run_status.terminal and not RUN_TRANSITIONS[run_status]


def test_cancelled_run_never_completes() -> None:
    assert not run_can_move(RunStatus.CANCELLED, RunStatus.COMPLETED)
    assert not task_can_move(TaskStatus.CANCELLED, TaskStatus.COMPLETED)


def test_run_lifecycle_and_retry_edge() -> None:
    assert run_can_move(RunStatus.PENDING, RunStatus.ASSIGNED)
    assert run_can_move(RunStatus.ASSIGNED, RunStatus.RUNNING)
    assert run_can_move(RunStatus.RUNNING, RunStatus.LOST)
    assert not run_can_move(RunStatus.PENDING, RunStatus.RUNNING)
    assert task_can_move(TaskStatus.RUNNING, TaskStatus.PENDING)  # a retry waits for a worker


def test_every_status_has_a_transition_entry() -> None:
    assert set(TASK_TRANSITIONS) == set(TaskStatus)
    assert set(RUN_TRANSITIONS) == set(RunStatus)


def test_empty_input_means_empty_object() -> None:
    assert validate_input("") == ("{}", {})
    assert validate_input('{"a": 1}')[1] == {"a": 1}


@pytest.mark.parametrize("bad", ["nope", "[1]", "1", "null", '"s"', "{"])
def test_input_must_be_a_json_object(bad: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_input(bad)
    assert err.value.field == "input_json"


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        (TaskPolicy(priority=1001), "policy.priority"),
        (TaskPolicy(priority=-1001), "policy.priority"),
        (TaskPolicy(max_attempts=0), "policy.max_attempts"),
        (TaskPolicy(max_attempts=101), "policy.max_attempts"),
        (TaskPolicy(timeout=-1), "policy.timeout"),
        (TaskPolicy(timeout=float("nan")), "policy.timeout"),
        (TaskPolicy(timeout=10**9), "policy.timeout"),
        (TaskPolicy(queue_timeout=-5), "policy.queue_timeout"),
        (TaskPolicy(idempotency_key="k" * 257), "policy.idempotency_key"),
        (TaskPolicy(required_labels={"": "x"}), "policy.required_labels"),
    ],
)
def test_bad_policies(policy: TaskPolicy, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_policy(policy)
    assert err.value.field == field


@pytest.mark.parametrize("bad", ["novalue", "=v", "k=v v", "k=" + "v" * 64, "a b=c"])
def test_bad_label_args(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_label_args([bad])


def test_label_args() -> None:
    assert parse_label_args(["a=b", "example.com/zone=eu-1", "empty="]) == {
        "a": "b",
        "example.com/zone": "eu-1",
        "empty": "",
    }


def test_spec_field_prefix_names_the_batch_index() -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_task_spec(TaskSpec(agent="echo", input="[]"), "tasks[3].")
    assert str(err.value).startswith("tasks[3].input_json:")


def test_spiffe_ids() -> None:
    assert parse_spiffe_id("spiffe://taskrun/worker/w1") == Principal(PrincipalKind.WORKER, "w1")
    assert parse_spiffe_id("spiffe://taskrun/operator/admin") == Principal(
        PrincipalKind.OPERATOR, "admin"
    )
    for bad in ("spiffe://other/worker/w1", "spiffe://taskrun/robot/x", "spiffe://taskrun/worker/"):
        assert parse_spiffe_id(bad) is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (2_592_000, "30d"),
        (86_400, "1d"),
        (5_400, "1h30m"),
        (90, "1m30s"),
        (45, "45s"),
        (0.5, "0.5s"),
    ],
)
def test_durations_are_written_as_people_write_them(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


def test_ids_are_the_26_base32_digits_of_time_and_randomness_most_significant_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from taskrun.core import ids

    def digits(value: int) -> str:  # the definition, one digit at a time
        out = []
        for _ in range(26):
            out.append(ids._ALPHABET[value & 31])
            value >>= 5
        return "".join(reversed(out))

    before = time.time_ns() // 1_000_000
    task_id = new_task_id()
    after = time.time_ns() // 1_000_000
    value = 0
    for char in task_id.removeprefix("tsk_"):
        value = value * 32 + ids._ALPHABET.index(char)
    assert before <= value >> 80 <= after
    assert digits(value) == task_id.removeprefix("tsk_")
    edges = (
        (0, 0),
        (1, 1),
        ((1 << 50) - 1, (1 << 80) - 1),
        (0x1234567890A, 0xFEDCBA9876543210ABCD),
    )
    for ms, rnd in edges:
        monkeypatch.setattr(ids, "_last", (-1, "", 0))  # a fresh process
        # ids calls both through their modules, so patching the modules reaches it
        monkeypatch.setattr(time, "time_ns", lambda ms=ms: ms * 1_000_000)
        monkeypatch.setattr(random, "getrandbits", lambda _bits, rnd=rnd: rnd)
        assert ids._sortable("") == digits(ms << 80 | rnd)


def test_ids_increase_in_the_order_made_within_a_millisecond_and_when_the_clock_steps_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from taskrun.core import ids

    now = [1_700_000_000_000]
    monkeypatch.setattr(ids, "_last", (-1, "", 0))  # a fresh process
    monkeypatch.setattr(time, "time_ns", lambda: now[0] * 1_000_000)
    made = [new_task_id() for _ in range(2000)]  # all in one millisecond
    now[0] -= 5_000  # the clock steps back five seconds
    made += [new_task_id() for _ in range(100)]
    now[0] += 10_000
    made += [new_task_id() for _ in range(100)]
    assert made == sorted(made) and len(set(made)) == len(made)
    # a millisecond whose random part is used up goes on in the next one
    ms = now[0] + 1
    monkeypatch.setattr(ids, "_last", (ms, "", (1 << 80) - 1))
    later = new_task_id()
    value = 0
    for char in later.removeprefix("tsk_"):
        value = value * 32 + ids._ALPHABET.index(char)
    assert value >> 80 == ms + 1 and later > made[-1]


# A value other than the default for each ModelSettings field.
MODEL_SETTING_SAMPLES: dict[str, object] = {
    "system_prompt": "Be brief.",
    "max_tokens": 300,
    "temperature": 0.0,  # zero is a setting, unlike None
    "stop_sequences": ["END"],
    "append_system_prompt": "x",
    "env": {"MODE": "ci"},
    "mcp_servers": "{}",
    "allowed_tools": ["Read"],
    "disallowed_tools": ["Bash"],
}


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(ModelSettings)])
def test_model_settings_with_any_one_field_set_are_not_empty(name: str) -> None:
    samples = MODEL_SETTING_SAMPLES
    assert name in samples, "a new ModelSettings field: add it to ModelSettings.empty and here"
    assert ModelSettings().empty
    assert not ModelSettings(**{name: samples[name]}).empty  # type: ignore[arg-type]


def test_a_task_snapshot_holds_every_field_and_none_of_later_changes() -> None:
    now = datetime.now(UTC)
    task = Task(
        id=TaskId("tsk_1"),
        agent="echo",
        input="{}",
        labels={"a": "b"},
        policy=TaskPolicy(priority=2),
        status=TaskStatus.RUNNING,
        created_at=now,
        updated_at=now,
        attempts=2,
        current_run_id=RunId("run_1"),
        worker_id=WorkerId("w-1"),
        finished_at=now,
        error="e",
        result="{}",
        usage=Usage(input_tokens=3, cost_usd=0.5),
        schedule="nightly",
        cancel_requested=True,
        waiting_reason="why",
        conversation_id=ConversationId("cnv_1"),
        turn=4,
        parent_task_id=TaskId("tsk_0"),
        root_task_id=TaskId("tsk_r"),
        depth=1,
    )
    defaults = Task(TaskId(""), "", "", {}, TaskPolicy(), TaskStatus.PENDING, now, now)
    for f in dataclasses.fields(Task):
        if f.name not in ("created_at", "updated_at"):
            assert getattr(task, f.name) != getattr(defaults, f.name), f"set {f.name} above"
    copied = task.snapshot()
    assert copied == task and copied is not task
    task.usage.add(Usage(input_tokens=1))
    task.status = TaskStatus.COMPLETED
    assert copied.usage.input_tokens == 3 and copied.status is TaskStatus.RUNNING
