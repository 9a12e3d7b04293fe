"""`taskrun workflow apply|list|get|run|runs|show|cancel`, `taskrun inbox`, `taskrun approve`,
`taskrun reject`.

`register(subparsers)` adds them to the `taskrun` parser (src/cli/main.py); they reuse main's
connection flags and client. Reading needs the `read` scope, everything else `submit`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from taskrun.cli import output
from taskrun.cli.client import Client
from taskrun.cli.running import main_module as _cli
from taskrun.core.models import utcnow
from taskrun.core.workflow import InboxItem, Workflow, WorkflowRun

FOLLOW_POLL = 0.5  # seconds between looks at a followed run


def register(subparsers: Any) -> None:
    cli = _cli()
    group = cli._group(
        subparsers, "workflow", "stored definitions of steps (task, approval, wait, condition)"
    )
    p = cli._leaf(
        group,
        "apply",
        cmd_workflow_apply,
        help="store a definition (YAML or JSON) as the workflow's next version",
        description="Validate a workflow definition and store it as the next version of the "
        "workflow it names (an unchanged definition keeps its version). Runs keep the version "
        "they started with. Errors name the path of the bad field, e.g. steps.draft.agent.",
    )
    p.add_argument("file", metavar="FILE", help="the definition (- = stdin)")
    cli._add_output(p)
    p = cli._leaf(group, "list", cmd_workflow_list, help="stored workflows (newest versions)")
    cli._add_output(p)
    p = cli._leaf(group, "get", cmd_workflow_get, help="a workflow's definition")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--version", type=int, default=0, help="a version (default: the newest)")
    cli._add_output(p)
    p = cli._leaf(group, "run", cmd_workflow_run, help="start a run of a workflow")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--input", default="{}", metavar="JSON", help="the input, a JSON object")
    p.add_argument("--version", type=int, default=0, help="a version (default: the newest)")
    p.add_argument("--idempotency-key", default="", help="a second run with it returns the first")
    p.add_argument("--follow", action="store_true", help="print step changes until it ends")
    cli._add_output(p)
    p = cli._leaf(group, "runs", cmd_workflow_runs, help="workflow runs, newest first")
    p.add_argument("--workflow", default="", help="only runs of this workflow")
    p.add_argument("--limit", type=int, default=50, help="how many (default 50, at most 1000)")
    cli._add_output(p)
    p = cli._leaf(group, "show", cmd_workflow_show, help="a workflow run with its steps")
    p.add_argument("run_id", metavar="RUN_ID")
    cli._add_output(p)
    p = cli._leaf(group, "cancel", cmd_workflow_cancel, help="cancel a run and its running steps")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--reason", default="", help="recorded on the run and its steps")
    cli._add_output(p)

    p = cli._leaf(subparsers, "inbox", cmd_inbox, help="what waits for a person (approvals)")
    cli._add_output(p)
    p = cli._leaf(subparsers, "approve", cmd_approve, help="approve an inbox item")
    p.add_argument("item_id", metavar="ID")
    p.add_argument("--choice", default="", help="one of the item's choices (when it has some)")
    p.add_argument("--comment", default="", help="recorded with the decision")
    cli._add_output(p)
    p = cli._leaf(subparsers, "reject", cmd_reject, help="reject an inbox item")
    p.add_argument("item_id", metavar="ID")
    p.add_argument("--comment", default="", help="recorded with the decision")
    cli._add_output(p)


# --- documents ---------------------------------------------------------------------------------


def _time(value: datetime | None) -> str | None:
    return output.format_time(value) if value else None


def workflow_doc(w: Workflow) -> dict[str, Any]:
    return {
        "name": w.name,
        "version": w.version,
        "description": w.description,
        "created_at": output.format_time(w.created_at),
        "definition": w.definition,
    }


def run_doc(r: WorkflowRun) -> dict[str, Any]:
    return {
        "id": r.id,
        "workflow": r.workflow,
        "version": r.version,
        "status": r.status.name.lower(),
        "input": r.input,
        "idempotency_key": r.idempotency_key,
        "error": r.error,
        "created_at": output.format_time(r.created_at),
        "finished_at": _time(r.finished_at),
        "steps": [
            {
                "name": s.name,
                "kind": s.kind,
                "status": s.status.name.lower(),
                "task_id": s.task_id,
                "result": s.result,
                "branch": s.branch,
                "error": s.error,
                "inbox_item_id": s.inbox_item_id,
                "started_at": _time(s.started_at),
                "finished_at": _time(s.finished_at),
                "due_at": _time(s.due_at),
            }
            for s in r.steps.values()
        ],
    }


def item_doc(i: InboxItem) -> dict[str, Any]:
    return {
        "id": i.id,
        "workflow_run_id": i.run_id,
        "workflow": i.workflow,
        "step": i.step,
        "question": i.question,
        "choices": list(i.choices),
        "created_at": output.format_time(i.created_at),
        "due_at": _time(i.due_at),
    }


def run_detail(r: WorkflowRun) -> str:
    head = [
        ("run", r.id),
        ("workflow", f"{r.workflow} v{r.version}"),
        ("status", r.status.name.lower()),
        ("input", json.dumps(r.input)),
    ]
    if r.error:
        head.append(("error", r.error))
    rows = []
    for s in r.steps.values():
        what = s.task_id or s.inbox_item_id or ""
        detail = s.error or (f"branch={s.branch}" if s.branch else "")
        if not detail and s.result is not None:
            detail = json.dumps(s.result)
        rows.append([s.name, s.kind, s.status.name.lower(), what, output.printable(detail)[:80]])
    return (
        output.render_fields(head)
        + "\n"
        + output.render_table(["STEP", "KIND", "STATUS", "TASK/ITEM", "DETAIL"], rows)
    )


# --- commands ----------------------------------------------------------------------------------


def cmd_workflow_apply(args: argparse.Namespace) -> int:
    cli = _cli()
    try:
        text = cli.sys.stdin.read() if args.file == "-" else Path(args.file).read_text("utf-8")
    except OSError as exc:
        raise cli.CliError(f"cannot read {args.file}: {exc.strerror}") from None
    workflow, created = cli._one_call(args, lambda c: c.put_workflow(text))
    if args.output == "json":
        cli._write(output.dumps({"created": created, **workflow_doc(workflow)}))
    else:
        verb = "stored as" if created else "unchanged at"
        cli._write(f"workflow {workflow.name} {verb} version {workflow.version}\n")
    return int(cli.EXIT_OK)


def cmd_workflow_list(args: argparse.Namespace) -> int:
    cli = _cli()
    found: list[Workflow] = cli._one_call(args, lambda c: c.list_workflows())
    if args.output == "json":
        cli._write(output.dumps([workflow_doc(w) for w in found]))
    elif not found:
        cli._write("no workflows\n")
    else:
        rows = [
            [
                w.name,
                str(w.version),
                str(len(w.steps)),
                output.format_time(w.created_at),
                w.description,
            ]
            for w in found
        ]
        cli._write(output.render_table(["NAME", "VERSION", "STEPS", "STORED", "DESCRIPTION"], rows))
    return int(cli.EXIT_OK)


def cmd_workflow_get(args: argparse.Namespace) -> int:
    cli = _cli()
    workflow: Workflow = cli._one_call(args, lambda c: c.get_workflow(args.name, args.version))
    if args.output == "json":
        cli._write(output.dumps(workflow_doc(workflow)))
    else:
        import yaml

        cli._write(f"# version {workflow.version}, stored {workflow.created_at:%Y-%m-%d %H:%M}\n")
        cli._write(yaml.safe_dump(workflow.definition, sort_keys=False))
    return int(cli.EXIT_OK)


def _parse_input(cli: Any, text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise cli.CliError(f"--input: is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise cli.CliError("--input: must be a JSON object")
    return data


def cmd_workflow_run(args: argparse.Namespace) -> int:
    cli = _cli()
    data = _parse_input(cli, args.input)

    async def run(client: Client) -> tuple[WorkflowRun, bool]:
        started, created = await client.start_workflow_run(
            args.name, data, version=args.version, idempotency_key=args.idempotency_key
        )
        if not args.follow:
            return started, created
        if args.output != "json":
            cli._write(f"workflow run {started.id} started\n")
        seen: dict[str, str] = {}
        current = started
        while True:
            for step in current.steps.values():
                state = step.status.name.lower()
                if seen.get(step.name) != state and args.output != "json":
                    extra = (
                        f" ({step.inbox_item_id})"
                        if step.inbox_item_id and state == "waiting"
                        else ""
                    )
                    extra = f" ({step.error})" if step.error else extra
                    when = step.finished_at or step.started_at or utcnow()
                    cli._write(f"{output.format_time(when)}  {step.name}: {state}{extra}\n")
                seen[step.name] = state
            if current.status.finished:
                return current, created
            await asyncio.sleep(FOLLOW_POLL)
            current = await client.get_workflow_run(started.id)

    found, created = cli._one_call(args, run)
    if args.output == "json":
        cli._write(output.dumps({"created": created, **run_doc(found)}))
    elif args.follow:
        cli._write(f"workflow run {found.id} {found.status.name.lower()}")
        cli._write(f": {found.error}\n" if found.error else "\n")
    else:
        note = "" if created else " (the idempotency key named an existing run)"
        cli._write(f"workflow run {found.id} started{note}\n")
    if found.status.finished and found.status.name != "COMPLETED":
        return int(cli.EXIT_FAILED)
    return int(cli.EXIT_OK)


def cmd_workflow_runs(args: argparse.Namespace) -> int:
    cli = _cli()
    runs: list[WorkflowRun] = cli._one_call(
        args, lambda c: c.list_workflow_runs(args.workflow, args.limit)
    )
    if args.output == "json":
        cli._write(output.dumps([run_doc(r) for r in runs]))
    elif not runs:
        cli._write("no workflow runs\n")
    else:
        rows = [
            [
                r.id,
                f"{r.workflow} v{r.version}",
                r.status.name.lower(),
                output.format_time(r.created_at),
                output.printable(r.error)[:60],
            ]
            for r in runs
        ]
        cli._write(output.render_table(["RUN", "WORKFLOW", "STATUS", "STARTED", "ERROR"], rows))
    return int(cli.EXIT_OK)


def cmd_workflow_show(args: argparse.Namespace) -> int:
    cli = _cli()
    run: WorkflowRun = cli._one_call(args, lambda c: c.get_workflow_run(args.run_id))
    cli._write(output.dumps(run_doc(run)) if args.output == "json" else run_detail(run))
    return int(cli.EXIT_OK)


def cmd_workflow_cancel(args: argparse.Namespace) -> int:
    cli = _cli()
    run: WorkflowRun = cli._one_call(
        args, lambda c: c.cancel_workflow_run(args.run_id, args.reason)
    )
    if args.output == "json":
        cli._write(output.dumps(run_doc(run)))
    else:
        cli._write(f"workflow run {run.id} cancelled\n")
    return int(cli.EXIT_OK)


def cmd_inbox(args: argparse.Namespace) -> int:
    cli = _cli()
    items: list[InboxItem] = cli._one_call(args, lambda c: c.list_inbox())
    if args.output == "json":
        cli._write(output.dumps([item_doc(i) for i in items]))
    elif not items:
        cli._write("the inbox is empty\n")
    else:
        rows = [
            [
                i.id,
                f"{i.workflow}/{i.step}",
                output.printable(i.question)[:70],
                ",".join(i.choices) or "-",
                _time(i.due_at) or "-",
            ]
            for i in items
        ]
        cli._write(output.render_table(["ID", "WAITING IN", "QUESTION", "CHOICES", "DUE"], rows))
    return int(cli.EXIT_OK)


def _answer(args: argparse.Namespace, approve: bool) -> int:
    cli = _cli()
    choice = getattr(args, "choice", "")
    run: WorkflowRun = cli._one_call(
        args,
        lambda c: c.answer_inbox_item(
            args.item_id, approve=approve, choice=choice, comment=args.comment
        ),
    )
    if args.output == "json":
        cli._write(output.dumps(run_doc(run)))
    else:
        verb = "approved" if approve else "rejected"
        cli._write(
            f"{args.item_id} {verb}{f' ({choice})' if choice else ''}; run {run.id} is "
            f"{run.status.name.lower()}\n"
        )
    return int(cli.EXIT_OK)


def cmd_approve(args: argparse.Namespace) -> int:
    return _answer(args, True)


def cmd_reject(args: argparse.Namespace) -> int:
    return _answer(args, False)
