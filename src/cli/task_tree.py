"""A task's tree for `task get` and the TUI: the sub-tasks its runs created (and theirs), each
with its status and cost, and what the whole tree spent."""

from __future__ import annotations

from collections.abc import Sequence

from taskrun.cli.output import status_name
from taskrun.core.ids import TaskId
from taskrun.core.models import Task


def tree_lines(task: Task, below: Sequence[Task]) -> list[tuple[str, Task]]:
    """(indented label, task) per node, depth first, children oldest first; the top is `task`."""
    children: dict[TaskId | None, list[Task]] = {}
    for sub in below:
        children.setdefault(sub.parent_task_id, []).append(sub)
    out: list[tuple[str, Task]] = []

    def walk(node: Task, prefix: str, last: bool, top: bool) -> None:
        branch = "" if top else ("└─ " if last else "├─ ")
        out.append((f"{prefix}{branch}{node.id}", node))
        kids = sorted(children.get(node.id, []), key=lambda t: t.id)
        inner = prefix if top else prefix + ("   " if last else "│  ")
        for i, kid in enumerate(kids):
            walk(kid, inner, i == len(kids) - 1, False)

    walk(task, "", True, True)
    return out


def tree_text(task: Task, below: Sequence[Task], *, heading: bool = True) -> str:
    """The tree as `task get` prints it under "Sub-tasks:" ("" when there are none)."""
    if not below:
        return ""
    lines = tree_lines(task, below)
    width = max(len(label) for label, _ in lines)
    rows = [
        f"  {label:<{width}}  {node.agent:<14} {status_name(node.status):<10} "
        f"${node.usage.cost_usd:.4f}"
        for label, node in lines
    ]
    spent = sum(t.usage.cost_usd for t in below)
    total = f"  sub-tasks: {len(below)}, their cost ${spent:.4f}"
    policy = task.policy
    if policy.max_subtasks or policy.subtask_budget_usd:
        limits = []
        if policy.max_subtasks:
            limits.append(f"at most {policy.max_subtasks}")
        if policy.subtask_budget_usd:
            limits.append(f"${policy.subtask_budget_usd:g}")
        total += f" (budget: {', '.join(limits)})"
    return ("Sub-tasks:\n" if heading else "") + "\n".join(rows) + "\n" + total + "\n"
