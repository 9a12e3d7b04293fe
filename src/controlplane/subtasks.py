"""Task trees: sub-tasks that runs create through the MCP server, how deep they may nest, and
the budget their root shares with the whole tree.

The engine keeps a `Tree` for every root that still has an unfinished task in its tree (loaded
from the store at start, made when a root that allows sub-tasks is created) and asks this module
whether a new sub-task fits, what a finished one spent, and which tasks lie below a task.
Nothing here writes: the engine puts every consequence in the change set it is building.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from taskrun.core.access import parse_run_credential, secret_matches
from taskrun.core.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from taskrun.core.ids import RunId, TaskId
from taskrun.core.models import Run, Task, TaskSpec


@dataclass(slots=True)
class Tree:
    """A root's budget and what its tree used of it."""

    root: TaskId
    max_subtasks: int  # 0: no limit
    budget_usd: float  # 0: no limit
    created: int = 0  # sub-tasks created so far
    spent_usd: float = 0.0  # cost of the finished sub-tasks
    unfinished: int = 0  # tasks of the tree, root included, not terminal yet
    closing: bool = False  # failing its pending sub-tasks now (their ends change nothing)

    def spent(self) -> str:
        """Why the budget stops new sub-tasks, or "" while there is some left."""
        if self.budget_usd and self.spent_usd >= self.budget_usd:
            return (
                f"the sub-tasks of task {self.root} spent ${self.spent_usd:.4f} of their budget "
                f"of ${self.budget_usd:g} (its subtask_budget_usd)"
            )
        return ""


def build(root: Task, below: Iterable[Task]) -> Tree:
    """The tree of `root` as the store holds it (at start, or when first needed again)."""
    tree = Tree(root.id, root.policy.max_subtasks, root.policy.subtask_budget_usd)
    tree.unfinished = 0 if root.status.terminal else 1
    for task in below:
        tree.created += 1
        if task.status.terminal:
            tree.spent_usd += task.usage.cost_usd
        else:
            tree.unfinished += 1
    return tree


def joined(trees: dict[TaskId, Tree], task: Task) -> None:
    """A new task: a root that allows sub-tasks starts its tree; a sub-task counts in its."""
    tree = trees.get(task.tree_root)
    if tree is None and task.policy.allow_subtasks and task.root_task_id is None:
        tree = trees[task.id] = Tree(
            task.id, task.policy.max_subtasks, task.policy.subtask_budget_usd
        )
    if tree is not None:
        tree.unfinished += 1
        tree.created += 1 if task.root_task_id else 0


def left(trees: dict[TaskId, Tree], task: Task) -> tuple[Tree | None, str]:
    """`task` ended: count what a sub-task spent, forget a tree with nothing unfinished left.
    Returns the tree and why its pending sub-tasks must now fail ("": they may run; also while
    the engine is already failing them)."""
    tree = trees.get(task.tree_root)
    if tree is None:
        return None, ""
    tree.unfinished -= 1
    if task.root_task_id is not None:
        tree.spent_usd += task.usage.cost_usd
    if tree.unfinished <= 0:
        del trees[tree.root]
        return None, ""
    return tree, "" if tree.closing else tree.spent()


def credential_holder(
    token: str, runs: Mapping[RunId, Run], tasks: Mapping[TaskId, Task]
) -> tuple[Run, Task] | None:
    """The run a run credential belongs to, and its task, while that run is the task's current
    one and active; None for anything else (the credential died with its run)."""
    parsed = parse_run_credential(token)
    if parsed is None:
        return None
    run = runs.get(RunId(parsed.token_id))
    if run is None or not run.credential_hash or not run.status.active:
        return None
    if not secret_matches(parsed.secret, run.credential_hash):
        return None
    task = tasks.get(run.task_id)
    if task is None or task.current_run_id != run.id:
        return None
    return run, task


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a new sub-task goes: below `parent`, in the tree of `root`, at `depth`."""

    parent: TaskId
    root: TaskId
    depth: int


def place(
    specs: list[TaskSpec],
    parents: Mapping[TaskId, Task],
    trees: Mapping[TaskId, Tree],
    max_depth: int,
) -> list[Placement | None]:
    """Check every sub-task of a batch against its parent, the depth limit and its tree's budget
    (count and cost) before anything is created; raise the first refusal."""
    out: list[Placement | None] = []
    adding: dict[TaskId, int] = {}
    for spec in specs:
        if spec.parent_task_id is None:
            out.append(None)
            continue
        parent = parents.get(spec.parent_task_id)
        if parent is None:
            raise FailedPrecondition(
                f"task {spec.parent_task_id} has ended: its run can no longer create sub-tasks",
                field="parent_task_id",
            )
        if spec.policy.max_subtasks or spec.policy.subtask_budget_usd:
            name = "max_subtasks" if spec.policy.max_subtasks else "subtask_budget_usd"
            raise InvalidArgument(
                f"a sub-task shares its tree's budget, set on the root task {parent.tree_root}",
                field=f"policy.{name}",
            )
        root = parent.tree_root
        tree = trees.get(root)
        if tree is None or not parent.policy.allow_subtasks:
            raise FailedPrecondition(
                f"task {parent.id} does not allow sub-tasks", field="parent_task_id"
            )
        depth = parent.depth + 1
        if depth > max_depth:
            raise ResourceExhausted(
                f"sub-tasks nest at most {max_depth} levels below their root (the server's "
                f"max_subtask_depth); task {parent.id} is at level {parent.depth}",
                field="parent_task_id",
            )
        if reason := tree.spent():
            raise ResourceExhausted(reason, field="parent_task_id")
        count = tree.created + adding.get(root, 0)
        if tree.max_subtasks and count >= tree.max_subtasks:
            raise ResourceExhausted(
                f"the tree of task {root} may hold at most {tree.max_subtasks} sub-tasks (its "
                f"max_subtasks) and has {count}",
                field="parent_task_id",
            )
        adding[root] = adding.get(root, 0) + 1
        out.append(Placement(parent.id, root, depth))
    return out


def below(task_id: TaskId, parents: Mapping[TaskId, TaskId | None]) -> list[TaskId]:
    """The ids below `task_id` (children, theirs...) among `parents` (id -> parent id)."""
    children: dict[TaskId, list[TaskId]] = {}
    for child, parent in parents.items():
        if parent is not None:
            children.setdefault(parent, []).append(child)
    out: list[TaskId] = []
    todo = [task_id]
    while todo:
        for child in sorted(children.get(todo.pop(), ())):
            out.append(child)
            todo.append(child)
    return out
