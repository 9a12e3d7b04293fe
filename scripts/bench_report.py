"""What scripts/bench measured and how it shows it: the figures of a run, the issue's aims, and
the table (this run beside a --compare-ref one) or the JSON document.

Apart from scripts/bench.py, which measures: the figures are plain data, and everything here only
reads them. Why one module past 600 lines: most of it is the table's rows, one declaration per
figure, and splitting them would only scatter the table.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench_cli import CommandLine
from bench_failover import Failover
from bench_fleet import Fleet
from bench_reach import Reach

TARGET_TASKS_PER_S = 4000.0
TARGET_P50_MS = 1.5
TARGET_P99_MS = 4.0
TARGET_IDLE_CPU_PERCENT = 10.0  # of one core, 1,000 idle workers
TARGET_IDLE_RSS_MB = 200.0
TARGET_FLEET_RATIO = 0.8  # dispatch with 1,000 workers / with two
TARGET_DEEP_RATIO = 0.8  # dispatch with 10,000 tasks queued / without
TARGET_LIST_RATIO = 1.5  # ListTasks p50 with 10,000 tasks queued / without
TARGET_MACHINE = "2-core machine"

WORKER_IDS = ("worker-1", "worker-2")


@dataclass
class Latency:
    """Milliseconds."""

    count: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latency:
        ordered = sorted(seconds)
        return cls(
            count=len(ordered),
            p50_ms=_percentile(ordered, 0.50) * 1000,
            p99_ms=_percentile(ordered, 0.99) * 1000,
            mean_ms=statistics.fmean(ordered) * 1000,
            max_ms=ordered[-1] * 1000,
        )


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted data."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass
class Baseline:
    unary: Latency
    unary_ops_per_s: float
    stream_messages: int
    stream_seconds: float
    stream_msgs_per_s: float
    # A call whose answer comes from a worker process over a stream it holds: the path of a
    # task, with nothing stored, validated or converted (see serve_baseline).
    relay: Latency | None = None
    # CPU seconds per relay call of the bare server and the bare worker (with the client: the
    # CPU any design with a worker process in the loop pays per task, on the same cores)
    relay_cpu_s: dict[str, float] = field(default_factory=dict)
    # The relay with TaskRun's two commits on the way (its SQLite store, an echo task's rows):
    # the floor for a design that makes the task durable before it leaves and the result
    # before it is answered (see bench_bare)
    stored_relay: Latency | None = None
    stored_relay_cpu_s: dict[str, float] = field(default_factory=dict)
    # Both again with a client's requests as messages on one stream it holds (SubmitTasks'
    # shape, which the latency figure measures): the floor of that figure
    stream_relay: Latency | None = None
    stream_relay_cpu_s: dict[str, float] = field(default_factory=dict)
    stored_stream_relay: Latency | None = None
    stored_stream_relay_cpu_s: dict[str, float] = field(default_factory=dict)


@dataclass
class Throughput:
    tasks: int
    clients: int
    batch: int
    submit_seconds: float
    submit_tasks_per_s: float
    end_to_end_seconds: float
    end_to_end_tasks_per_s: float
    completed: int
    not_completed: dict[str, int]
    completion_polls: int
    poll_round_trip_ms: float
    cpu_seconds: dict[str, float | None]
    server_threads_cpu_seconds: dict[str, float]


@dataclass
class SequentialLatency:
    submit_to_completed: Latency
    create_call: Latency
    follow_until_completed: Latency
    completed: int
    not_completed: dict[str, int]
    # Tasks whose FollowTask stream had not delivered the terminal update after --follow-timeout
    # (left out of the latency figures above).
    follow_missed_end: int
    follow_missed_examples: list[str]
    # CPU seconds per task over the measured tasks: "server", "workers" (all of them) and, when
    # one side ran alone, "client" (this process); on two cores the round trip waits for these
    cpu_s: dict[str, float] = field(default_factory=dict)
    # Where the round trip's time went, p50 milliseconds per stage (STAGES), from the times the
    # control plane stored with each task and run and this process's clock at either end (one
    # machine, one clock); read after the measured tasks, so the reading costs them nothing.
    stages_ms: dict[str, float] = field(default_factory=dict)
    # the same over the slowest 1 % of the tasks (those that make the p99)
    tail_stages_ms: dict[str, float] = field(default_factory=dict)
    # The same number of tasks through Client.run (the outcome only: no created update, no
    # output), right after the others; None when nothing was measured that way.
    run_to_completed: Latency | None = None


# The stages of one sequential task, in order; each from the stored time named to the next.
STAGES = (
    ("to the control plane", "submitted -> the task's created_at"),
    ("creating, assigning", "created_at -> the run's assigned_at"),
    ("committing, to the worker, started", "assigned_at -> started_at"),
    ("running, reported", "started_at -> finished_at"),
    ("committing, back to the client", "finished_at -> the terminal update read"),
)


@dataclass
class Report:
    machine: dict[str, Any]
    setup: dict[str, Any]
    baseline: Baseline
    throughput: Throughput
    latency: SequentialLatency
    ratios: dict[str, float]
    targets: dict[str, Any]
    method: dict[str, str] = field(default_factory=dict)
    failover: Failover | None = None
    deep_queue: DeepQueue | None = None
    fleet: Fleet | None = None
    cli: CommandLine | None = None
    reach: Reach | None = None


@dataclass
class DeepQueue:
    queued: int  # tasks no worker can take, waiting while the figures below are measured
    queue_seconds: float  # to create them (CreateTasks of 1,000)
    list_p50_ms_before: float  # ListTasks (first page of 50), before they were queued
    list_p50_ms: float  # the same with them queued
    list_pending_p50_ms: float  # ListTasks(statuses=PENDING) with them queued
    dispatch_tasks_per_s: float  # echo tasks end to end, as in the throughput figure


LATENCY_CALL = (
    "Client.submit_and_follow: each task a request on the client's one SubmitTasks stream, from "
    "submit to the terminal update (a server without it: a CreateAndFollowTask stream per task, "
    "or CreateTask, then FollowTask)"
)

METHOD = {
    "baseline": "bare grpc.aio server in its own process, same CA/server/operator certificates "
    "(mTLS), generic handlers on raw bytes; unary: sequential echo of 64 bytes after 200 warm-up "
    "calls; stream: one stream_stream call, the client writes N 64-byte messages, the server "
    "counts them and answers once at the end; relay: a Relay call (unary_stream) answers "
    "'created', hands its 72 bytes to a bare worker process over the Work stream it holds, and "
    "answers with the worker's reply: the shape of a task's round trip with nothing stored, "
    "validated or converted (as many calls as sequential tasks, one at a time); stored relay: the "
    "same, but the bare server first commits an echo task and its run as created and assigned "
    "through TaskRun's SQLite store (the same rows and event-log entries, in a file of its own) "
    "before handing the request on, and commits them as completed before the second answer; "
    "stream relays: the same two, with every request a message on one stream_stream call the "
    "client holds and both answers messages on it (SubmitTasks' shape)",
    "throughput": "clocks start before the first CreateTasks; clients each submit their share of "
    "batches one call at a time; after the last submit returns, one extra client polls "
    "ListTasks(statuses=PENDING,RUNNING, page_size=1) every --poll-interval until it is empty "
    "(one indexed query per poll, at most 1/interval extra calls per second, only during the "
    "tail); clocks stop at the first empty answer; the end time is therefore late by at most one "
    "poll interval plus one round trip",
    "latency": "one client, one task at a time after --warmup unmeasured ones: "
    "Client.submit_and_follow (a request on the client's one SubmitTasks stream; a "
    "CreateAndFollowTask stream per task, or CreateTask then FollowTask, on a server without "
    "it); timed from the call to the terminal update; 'until created' is the "
    "first update (the task as committed); a stream without the terminal update after "
    "--follow-timeout is abandoned, the task looked up with GetTask, and the sample left out of "
    "the figures and counted in follow_missed_end",
    "deep_queue": "N tasks for an agent no worker announces are created (CreateTasks of 1,000); "
    "ListTasks p50 (first page of 50, 50 calls) before and after; then the throughput figure's "
    "echo tasks again, timed until ListTasks(agent=echo, PENDING or RUNNING) is empty",
    "fleet": "two fresh control planes, one with two sessions and one with all N; fleet "
    "processes hold sessions that each have "
    "their own certificate and connection, heartbeat like the daemon (the server's interval "
    "while holding a run, its idle interval otherwise) and complete each assignment at once "
    "(after renewing a lapsed lease); CPU and RSS of the server over --idle-seconds, from one "
    "idle heartbeat interval and 2 s after the sessions connected (their steady rate); "
    "dispatch: --fleet-tasks echo tasks from 4 clients, "
    "with two sessions and with all N taking turns for --fleet-rounds rounds (the rate over the "
    "rounds' summed time; each round's ratio shown); the server's CPU (user+system) over each "
    "dispatch window "
    "per task (with all N it includes their heartbeats during the window), the fleet processes' "
    "own CPU per task (they share the cores with the server), and the stream messages the "
    "sessions read and wrote over the window (both ways) per 100 tasks",
    "cli": "the command a person types, `taskrun task create echo --input ... --follow` (the "
    "console script beside the bench's Python), as a new process against the control plane of "
    "the latency figure, from its start until it exited 0; beside it in each round, `python -c "
    "pass` and `python -c 'import taskrun.cli.main'` from the same interpreter; p50 over "
    "--cli-runs rounds, the sides taking turns",
    "reach": "against the latency figure's control plane (its HTTP API and MCP on loopback, "
    "TLS), an API token of the submit scope, one kept-alive connection each: GET "
    "/v1/tasks/{id} of a finished echo task (httpx) and MCP create_task of an echo task with "
    "wait (the mcp SDK's client, streamable HTTP), one call at a time after 20 unmeasured of "
    "each; p50 from sending until the answer was read, the sides taking turns in 5 rounds",
    "cpu": "user+system CPU seconds of each process during the throughput phase (/proc)",
}


# --- the report --------------------------------------------------------------------------------


def ratios(b: Baseline, t: Throughput, lat: SequentialLatency) -> dict[str, float]:
    s = lat.submit_to_completed
    return {
        "end_to_end_tasks_per_s / bare_stream_msgs_per_s": t.end_to_end_tasks_per_s
        / b.stream_msgs_per_s,
        "end_to_end_tasks_per_s / bare_unary_ops_per_s": t.end_to_end_tasks_per_s
        / b.unary_ops_per_s,
        "submit_to_completed_p50 / bare_unary_p50": s.p50_ms / b.unary.p50_ms,
        "submit_to_completed_p99 / bare_unary_p99": s.p99_ms / b.unary.p99_ms,
        "create_call_p50 / bare_unary_p50": lat.create_call.p50_ms / b.unary.p50_ms,
        **(
            {"submit_to_completed_p50 / bare_relay_p50": s.p50_ms / b.relay.p50_ms}
            if b.relay is not None
            else {}
        ),
        **(
            {"submit_to_completed_p50 / stored_relay_p50": s.p50_ms / b.stored_relay.p50_ms}
            if b.stored_relay is not None
            else {}
        ),
        **(
            {
                "submit_to_completed_p50 / stored_stream_relay_p50": s.p50_ms
                / b.stored_stream_relay.p50_ms
            }
            if b.stored_stream_relay is not None
            else {}
        ),
    }


def targets() -> dict[str, Any]:
    return {
        "end_to_end_tasks_per_s_min": TARGET_TASKS_PER_S,
        "submit_to_completed_p50_ms_max": TARGET_P50_MS,
        "submit_to_completed_p99_ms_max": TARGET_P99_MS,
        "idle_workers_cpu_percent_max": TARGET_IDLE_CPU_PERCENT,
        "idle_workers_rss_mb_max": TARGET_IDLE_RSS_MB,
        "dispatch_many_workers_vs_two_min": TARGET_FLEET_RATIO,
        "deep_queue_dispatch_vs_empty_min": TARGET_DEEP_RATIO,
        "deep_queue_list_vs_empty_max": TARGET_LIST_RATIO,
        "on": TARGET_MACHINE,
    }


def _ms(value: float) -> str:
    return f"{value:,.2f} ms"


def _rate(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}"


def _met(ok: bool) -> str:
    return "met" if ok else "missed"


Getter = Callable[["Report"], float | None]


@dataclass
class Row:
    """One line of the table: a figure of each side, how it compares, and its aim."""

    label: str
    value: Getter | None = None  # None: a section title
    fmt: Callable[[float], str] = str
    bare: Callable[[Report], str] = lambda _r: ""
    aim: str = ""
    met: Callable[[float], bool] | None = None
    text: Callable[[Report], str] | None = None  # shown instead of fmt(value)


def _get(r: Report, getter: Getter) -> float | None:
    try:
        return getter(r)
    except (AttributeError, KeyError, TypeError, ZeroDivisionError):
        return None  # the phase (or that figure) did not run on this side


def _stage(r: Report, name: str) -> float:
    return r.latency.stages_ms[name]


def _run_latency(r: Report) -> str:
    run = r.latency.run_to_completed
    if run is None:
        return ""
    return f"p99 {run.p99_ms:.2f} ms; the outcome only (no created update, no output), right after"


def _stage_span(r: Report, span: str, name: str) -> str:
    slowest = r.latency.tail_stages_ms.get(name)
    return span if slowest is None else f"{span}; slowest 1 %: {slowest:.2f} ms"


def _floor(title: str, name: str) -> list[Row]:
    """A floor measured in the same run (the Baseline's latency `name`): its title, p50, p99."""

    def at(quantile: str) -> Getter:
        return lambda r: float(getattr(getattr(r.baseline, name), quantile))

    return [
        Row(title),
        Row("  p50", at("p50_ms"), _ms, lambda _r: "baseline"),
        Row("  p99", at("p99_ms"), _ms, lambda _r: "baseline"),
    ]


def _reach_p50(call: str, name: str) -> Row:
    """An HTTP call's p50 (the Reach figure `name`), against the bare unary round trip."""

    def ms(r: Report) -> float:
        return float(getattr(r.reach, name))

    return Row(
        f"  {call}, p50", ms, _ms, lambda r: f"{ms(r) / r.baseline.unary.p50_ms:.1f} x bare p50"
    )


def _reach_cpu(call: str, name: str) -> Row:
    """The server's CPU per HTTP/MCP call of one kind (the Reach figure `name`)."""
    return Row(f"  CPU per call: server, {call}", lambda r: float(getattr(r.reach, name)), _us)


def rows() -> list[Row]:
    tasks_s: Callable[[float], str] = lambda v: _rate(v, "tasks/s")  # noqa: E731
    return [
        *_floor("bare grpc.aio mTLS unary round trip, one in flight", "unary"),
        *_floor(
            "bare relay: call -> worker process -> answer, one in flight (the floor below)",
            "relay",
        ),
        *_floor(
            "stored relay: the same with TaskRun's two SQLite commits (a call per task's floor)",
            "stored_relay",
        ),
        Row(
            "  CPU per call: server",
            lambda r: r.baseline.stored_relay_cpu_s["server"],
            _us,
            _stored_relay_cpu,
        ),
        *_floor(
            "bare stream relay: the relay with each request a message on one client stream",
            "stream_relay",
        ),
        *_floor(
            "stored stream relay: the same with the two commits (the floor of the latency below)",
            "stored_stream_relay",
        ),
        Row(
            "  CPU per request: server",
            lambda r: r.baseline.stored_stream_relay_cpu_s["server"],
            _us,
            _stored_stream_relay_cpu,
        ),
        Row("bare bidi stream, one way", None),
        Row("  rate", lambda r: r.baseline.stream_msgs_per_s, lambda v: _rate(v, "msgs/s")),
        Row("throughput: echo tasks, concurrent CreateTasks, two workers"),
        Row(
            "  end to end (first submit -> all COMPLETED)",
            lambda r: r.throughput.end_to_end_tasks_per_s,
            tasks_s,
            lambda r: (
                f"{r.throughput.end_to_end_tasks_per_s / r.baseline.unary_ops_per_s:.2f}"
                " x unary ops/s"
            ),
            f">= {TARGET_TASKS_PER_S:,.0f}/s",
            lambda v: v >= TARGET_TASKS_PER_S,
        ),
        Row("  submit only", lambda r: r.throughput.submit_tasks_per_s, tasks_s),
        Row(
            "  server CPU",
            lambda r: _server_cpu(r),
            lambda v: f"{v:.0%} of a core",
        ),
        # CPU time per task moves less with the machine's load than a rate does
        Row("  CPU per task: server", lambda r: _cpu_per_task(r, "server"), _us),
        Row("  CPU per task: workers", lambda r: _cpu_per_task(r, "worker"), _us),
        Row("  CPU per task: clients", lambda r: _cpu_per_task(r, "bench"), _us),
        Row("latency: one task at a time, submit -> COMPLETED"),
        Row(
            "  p50",
            lambda r: r.latency.submit_to_completed.p50_ms,
            _ms,
            lambda r: _vs_bare(r, r.latency.submit_to_completed.p50_ms, "p50"),
            f"<= {TARGET_P50_MS:g} ms",
            lambda v: v <= TARGET_P50_MS,
        ),
        Row(
            "  p99",
            lambda r: r.latency.submit_to_completed.p99_ms,
            _ms,
            lambda r: _vs_bare(r, r.latency.submit_to_completed.p99_ms, "p99"),
            f"<= {TARGET_P99_MS:g} ms",
            lambda v: v <= TARGET_P99_MS,
        ),
        Row("  mean", lambda r: r.latency.submit_to_completed.mean_ms, _ms),
        Row(
            "  of which until created (p50)",
            lambda r: r.latency.create_call.p50_ms,
            _ms,
            lambda r: f"{r.latency.create_call.p50_ms / r.baseline.unary.p50_ms:.1f} x bare p50",
        ),
        Row(
            "  through Client.run (p50)",
            lambda r: r.latency.run_to_completed.p50_ms if r.latency.run_to_completed else None,
            _ms,
            _run_latency,
        ),
        Row("  where it went (p50 of each stage, from the times stored with the task and run)"),
        *(
            Row(
                f"    {name}",
                functools.partial(_stage, name=name),
                _ms,
                functools.partial(_stage_span, span=span, name=name),
            )
            for name, span in STAGES
        ),
        # the round trip waits for this CPU: on two cores, the processes take turns
        Row(
            "  CPU per task: server",
            lambda r: r.latency.cpu_s["server"],
            _us,
            lambda r: _vs_relay_cpu(r, "server"),
        ),
        Row(
            "  CPU per task: workers",
            lambda r: r.latency.cpu_s["workers"],
            _us,
            lambda r: _vs_relay_cpu(r, "workers"),
        ),
        Row(
            "  CPU per task: client",
            lambda r: r.latency.cpu_s["client"],
            _us,
            lambda r: _vs_relay_cpu(r, "client"),
        ),
        Row(
            "  follow misses (left out above)",
            lambda r: float(r.latency.follow_missed_end),
            lambda v: f"{v:.0f}",
        ),
        Row("the command line: taskrun task create echo --follow, a new process each time"),
        Row(
            "  p50, start to exit",
            lambda r: r.cli.create_follow_ms,  # type: ignore[union-attr]
            _ms,
            lambda r: (
                f"{r.cli.create_follow_ms - r.cli.python_start_ms:,.0f} ms "  # type: ignore[union-attr]
                "more than a bare Python start"
            ),
        ),
        Row(
            "  importing the CLI alone",
            lambda r: r.cli.cli_import_ms,  # type: ignore[union-attr]
            _ms,
        ),
        Row(
            "  a Python process that imports nothing",
            lambda r: r.cli.python_start_ms,  # type: ignore[union-attr]
            _ms,
            lambda _r: "baseline",
        ),
        Row("the HTTP API and MCP: one call at a time, TLS, an API token (an agent's sub-task)"),
        _reach_p50("GET /v1/tasks/{id}", "get_task_ms"),
        _reach_p50("GET /v1/tasks?page_size=50 (50 finished tasks)", "list_page_ms"),
        Row(
            "  MCP create_task with wait (echo), p50",
            lambda r: r.reach.mcp_create_wait_ms,  # type: ignore[union-attr]
            _ms,
            lambda r: (
                f"{r.reach.mcp_create_wait_ms / r.latency.submit_to_completed.p50_ms:.1f} x "  # type: ignore[union-attr]
                "the sequential p50 (gRPC)"
            ),
        ),
        _reach_cpu("GET of one task", "get_task_cpu_s"),
        _reach_cpu("a page of 50", "list_page_cpu_s"),
        _reach_cpu("MCP create_task with wait", "mcp_create_wait_cpu_s"),
        Row("deep queue: tasks that no worker can take, waiting"),
        Row("  queued", lambda r: float(r.deep_queue.queued), lambda v: f"{v:,.0f}"),  # type: ignore[union-attr]
        Row(
            "  ListTasks p50, empty queue",
            lambda r: r.deep_queue.list_p50_ms_before,  # type: ignore[union-attr]
            _ms,
        ),
        Row(
            "  ListTasks p50, deep queue",
            lambda r: r.deep_queue.list_p50_ms,  # type: ignore[union-attr]
            _ms,
            lambda r: (
                f"{r.deep_queue.list_p50_ms / r.deep_queue.list_p50_ms_before:.2f}"  # type: ignore[union-attr]
                " x empty queue"
            ),
            f"<= {TARGET_LIST_RATIO:g} x empty",
            None,
        ),
        Row(
            "  ListTasks(PENDING) p50, deep queue",
            lambda r: r.deep_queue.list_pending_p50_ms,  # type: ignore[union-attr]
            _ms,
        ),
        Row(
            "  dispatch, deep queue",
            lambda r: r.deep_queue.dispatch_tasks_per_s,  # type: ignore[union-attr]
            tasks_s,
            lambda r: f"{_deep_ratio(r):.2f} x without",
            f">= {TARGET_DEEP_RATIO:g} x without",
            None,
        ),
        Row("idle workers: sessions with their own certificate and connection"),
        Row("  sessions", lambda r: float(r.fleet.workers), lambda v: f"{v:,.0f}"),  # type: ignore[union-attr]
        Row(
            "  all connected in",
            lambda r: r.fleet.connect_seconds,  # type: ignore[union-attr]
            lambda v: f"{v:.2f} s",
        ),
        Row(
            "  server CPU while idle",
            lambda r: r.fleet.idle_cpu_percent,  # type: ignore[union-attr]
            lambda v: f"{v:.1f} % of a core",
            aim=f"< {TARGET_IDLE_CPU_PERCENT:g} % (1,000)",
            met=lambda v: v < TARGET_IDLE_CPU_PERCENT,
        ),
        Row(
            "  server memory (RSS)",
            lambda r: r.fleet.idle_rss_mb,  # type: ignore[union-attr]
            lambda v: f"{v:,.0f} MB",
            aim=f"< {TARGET_IDLE_RSS_MB:g} MB (1,000)",
            met=lambda v: v < TARGET_IDLE_RSS_MB,
        ),
        Row(
            "  dispatch, two sessions",
            lambda r: r.fleet.dispatch_two_workers_tasks_per_s,  # type: ignore[union-attr]
            tasks_s,
        ),
        Row(
            "  dispatch, all sessions",
            lambda r: r.fleet.dispatch_tasks_per_s,  # type: ignore[union-attr]
            tasks_s,
            lambda r: _round_ratios(r.fleet),  # type: ignore[arg-type]
            f">= {TARGET_FLEET_RATIO:g} x two",
            None,
        ),
        Row(
            "  server CPU per task, two sessions",
            lambda r: r.fleet.dispatch_two_workers_cpu_ms_per_task,  # type: ignore[union-attr]
            lambda v: f"{v:.3f} ms",
        ),
        Row(
            "  server CPU per task, all sessions",
            lambda r: r.fleet.dispatch_cpu_ms_per_task,  # type: ignore[union-attr]
            lambda v: f"{v:.3f} ms",
            lambda r: f"{r.fleet.dispatch_cpu_ratio:.2f} x two sessions",  # type: ignore[union-attr]
        ),
        Row(
            "    less the idle sessions' cost",
            lambda r: r.fleet.dispatch_cpu_net_ms_per_task,  # type: ignore[union-attr]
            lambda v: f"{v:.3f} ms",
            lambda r: f"{r.fleet.dispatch_cpu_net_ratio:.2f} x two sessions",  # type: ignore[union-attr]
        ),
        Row(
            "  fleet processes' CPU per task, two sessions",
            lambda r: r.fleet.dispatch_two_workers_fleet_cpu_ms_per_task,  # type: ignore[union-attr]
            lambda v: f"{v:.3f} ms",
        ),
        Row(
            "  fleet processes' CPU per task, all sessions",
            lambda r: r.fleet.dispatch_fleet_cpu_ms_per_task,  # type: ignore[union-attr]
            lambda v: f"{v:.3f} ms",
        ),
        Row(
            "  stream messages per 100 tasks, two sessions",
            lambda r: r.fleet.dispatch_two_workers_messages_per_100,  # type: ignore[union-attr]
            lambda v: f"{v:.1f}",
        ),
        Row(
            "  stream messages per 100 tasks, all sessions",
            lambda r: r.fleet.dispatch_messages_per_100,  # type: ignore[union-attr]
            lambda v: f"{v:.1f}",
        ),
        Row(
            "  kill -9 of the server: a new one answers in",
            lambda r: r.fleet.restart_answered_seconds,  # type: ignore[union-attr]
            lambda v: f"{v:.2f} s",
        ),
        Row(
            "  all sessions back in",
            lambda r: r.fleet.restart_seconds,  # type: ignore[union-attr]
            lambda v: f"{v:.2f} s",
        ),
        Row(
            "  failed connection attempts meanwhile",
            lambda r: float(r.fleet.restart_failed_connects),  # type: ignore[union-attr]
            lambda v: f"{v:,.0f}",
        ),
        Row(
            "  CPU meanwhile: the fleet processes (they share the cores)",
            lambda r: r.fleet.restart_fleet_cpu_percent,  # type: ignore[union-attr]
            lambda v: f"{v:.0f} % of a core",
        ),
        Row(
            "  CPU meanwhile: the new server",
            lambda r: r.fleet.restart_server_cpu_percent,  # type: ignore[union-attr]
            lambda v: f"{v:.0f} % of a core",
        ),
        Row("failover: fault -> next attempt RUNNING elsewhere (default lease)"),
        Row(
            "  kill -9 of the worker, slowest",
            lambda r: max(r.failover.kill_9_to_running_s),  # type: ignore[union-attr]
            lambda v: f"{v:.2f} s",
            aim="<= 5 s",
            met=lambda v: v <= 5,
            text=lambda r: r.failover.summary(r.failover.kill_9_to_running_s),  # type: ignore[union-attr]
        ),
        Row(
            "  silent network cut, slowest",
            lambda r: max(r.failover.silent_cut_to_running_s),  # type: ignore[union-attr]
            lambda v: f"{v:.2f} s",
            aim="<= 15 s",
            met=lambda v: v <= 15,
            text=lambda r: r.failover.summary(r.failover.silent_cut_to_running_s),  # type: ignore[union-attr]
        ),
    ]


def _vs_bare(r: Report, ms: float, which: str) -> str:
    """A latency against the bare unary round trip and, when measured, the bare relay."""
    unary = getattr(r.baseline.unary, f"{which}_ms")
    out = f"{ms / unary:.1f} x bare {which}"
    if r.baseline.relay is not None:
        out += f", {ms / getattr(r.baseline.relay, f'{which}_ms'):.1f} x relay"
    if r.baseline.stored_relay is not None:
        out += f", {ms / getattr(r.baseline.stored_relay, f'{which}_ms'):.1f} x stored"
    if r.baseline.stored_stream_relay is not None:
        floor = getattr(r.baseline.stored_stream_relay, f"{which}_ms")
        out += f", {ms / floor:.1f} x stored stream"
    return out


def _stored_relay_cpu(r: Report) -> str:
    relay = r.baseline.relay_cpu_s.get("server")
    return f"the relay's: {_us(relay)}" if relay else ""


def _stored_stream_relay_cpu(r: Report) -> str:
    relay = r.baseline.stream_relay_cpu_s.get("server")
    return f"the stream relay's: {_us(relay)}" if relay else ""


def _vs_relay_cpu(r: Report, process: str) -> str:
    """A sequential task's CPU against the stream relay's (the same shape), else the relay's."""
    name, spent = "stream relay", r.baseline.stream_relay_cpu_s
    if not spent:
        name, spent = "relay", r.baseline.relay_cpu_s
    relay, ours = spent.get(process), r.latency.cpu_s.get(process)
    if not relay or ours is None:
        return ""
    return f"{ours / relay:.1f} x the {name}'s ({_us(relay)})"


def _server_cpu(r: Report) -> float | None:
    spent = next(
        (v for k, v in r.throughput.cpu_seconds.items() if k.split(" (")[0] == "server"), None
    )
    return None if spent is None else spent / r.throughput.end_to_end_seconds


def _cpu_per_task(r: Report, process: str) -> float | None:
    """Seconds of CPU per task spent by the processes whose name starts with `process`."""
    spent = [
        v for k, v in r.throughput.cpu_seconds.items() if k.startswith(process) and v is not None
    ]
    return sum(spent) / r.throughput.tasks if spent else None


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs"


def _deep_ratio(r: Report) -> float:
    assert r.deep_queue is not None
    return r.deep_queue.dispatch_tasks_per_s / r.throughput.end_to_end_tasks_per_s


# Aims stated as ratios within one side's run (they need two figures, not one).
RATIO_AIMS: dict[str, Callable[[Report], bool]] = {
    "  ListTasks p50, deep queue": lambda r: (
        r.deep_queue is not None
        and r.deep_queue.list_p50_ms <= TARGET_LIST_RATIO * r.deep_queue.list_p50_ms_before
    ),
    "  dispatch, deep queue": lambda r: _deep_ratio(r) >= TARGET_DEEP_RATIO,
    "  dispatch, all sessions": lambda r: (
        r.fleet is not None and r.fleet.dispatch_ratio >= TARGET_FLEET_RATIO
    ),
}


def _round_ratios(fleet: Fleet) -> str:
    rounds = ", ".join(f"{v:.2f}" for v in fleet.dispatch_round_ratios)
    return f"{fleet.dispatch_ratio:.2f} x two sessions" + (f" (rounds {rounds})" if rounds else "")


def render(this: Report, ref: Report | None = None) -> str:
    m = this.machine
    cores = f"{m['cores']} cores" + (
        f" ({m['usable_cores']} usable)" if m["usable_cores"] != m["cores"] else ""
    )
    load = m["load_1min_at_start"]
    head = [
        f"TaskRun benchmark: {cores}, Python {m['python']}, grpcio {m['grpcio']}"
        + (f", load {load:.2f} at start" if load is not None else ""),
        "gRPC experiments, every process: "
        + (m.get("grpc_experiments") or "gRPC's defaults (GRPC_EXPERIMENTS unset or empty)"),
        f"control plane: server + {len(WORKER_IDS)} workers (echo, capacity "
        f"{this.setup['capacity']} each), {this.setup['store']}, mTLS, all on 127.0.0.1",
        f"this: {this.setup['commit']}",
    ]
    if ref is not None:
        head.append(
            f"{ref.setup['side']}: {ref.setup['commit']} (measured in the same run, taking turns "
            "with this one)"
        )
    head.append("")
    header = ["figure", "this"]
    if ref is not None:
        header += [ref.setup["side"], "this / ref"]
    header += ["vs bare baseline", "aim"]
    table: list[list[str]] = [header]
    for row in rows():
        if row.value is None:
            table.append([row.label])
            continue
        mine = _get(this, row.value)
        theirs = _get(ref, row.value) if ref is not None else None
        if mine is None and theirs is None:
            continue

        def shown(r: Report, v: float | None, row: Row = row) -> str:
            if v is None:
                return "-"
            return row.text(r) if row.text is not None else row.fmt(v)

        cells = [row.label, shown(this, mine)]
        if ref is not None:
            ratio = f"{mine / theirs:.2f}" if mine is not None and theirs else ""
            cells += [shown(ref, theirs), ratio]
        try:
            bare = row.bare(this) if mine is not None else ""
        except (AttributeError, TypeError, ZeroDivisionError):
            bare = ""
        aim = row.aim
        if aim and mine is not None:
            ok = row.met(mine) if row.met is not None else RATIO_AIMS[row.label](this)
            aim = f"{aim}: {_met(ok)}"
        cells += [bare, aim]
        table.append(cells)
    # A row with only its first cell is a section title: printed whole, not sized as a column.
    columns = len(header)
    sized = [r for r in table if len(r) == columns]
    widths = [max(len(r[i]) for r in sized) for i in range(columns)]
    # Drop section titles with no figure under them (a phase that did not run).
    kept: list[list[str]] = []
    for i, r in enumerate(table):
        if len(r) == 1 and (i + 1 == len(table) or len(table[i + 1]) == 1):
            continue
        kept.append(r)
    lines = list(head)
    for i, r in enumerate(kept):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip())
        if i == 0:
            lines.append("-" * (sum(widths) + 2 * (columns - 1)))
    t = this.throughput
    lines += [
        "",
        f"throughput: {t.tasks} echo tasks, {t.clients} clients x CreateTasks({t.batch}); "
        f"latency: {this.latency.submit_to_completed.count} tasks after "
        f"{this.setup['warmup_tasks']} unmeasured, {LATENCY_CALL}",
        "aims (issue): >= 4,000 echo tasks/s end to end; sequential p50 <= 1.5 ms, p99 <= 4 ms; "
        "1,000 idle workers < 10 % of a core and < 200 MB, dispatch with them >= 0.8 x with two; "
        "10,000 queued tasks slow neither dispatch nor ListTasks",
    ]
    return "\n".join(lines)


def report(this: Report, ref: Report | None, as_json: bool) -> None:
    """The only output on stdout."""
    if as_json:
        doc: dict[str, Any] = asdict(this)
        if ref is not None:
            doc = {"this": doc, "ref": asdict(ref)}
        text = json.dumps(doc, indent=2)
    else:
        text = render(this, ref)
    sys.stdout.write(text + "\n")
