"""What one start of `taskrun` builds and imports: only the parsers of the commands its line
names, and no logging stack for a command that logs nothing (see `cli.main.build_parser` and
`taskrun.logging`). How long a start takes is measured by scripts/bench, not here."""

from __future__ import annotations

import argparse
import subprocess
import sys
from typing import Any

import pytest

from taskrun.cli import main as cli
from taskrun.cli import task_cmd


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _shape(parser: argparse.ArgumentParser) -> list[Any]:
    """Everything parsing depends on, of a parser and the parsers below it."""
    shape: list[Any] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            shape.append([(name, _shape(p)) for name, p in action.choices.items()])
            continue
        shape.append(
            (
                type(action).__name__,
                tuple(action.option_strings),
                action.dest,
                action.nargs,
                repr(action.default),
                action.choices if action.choices is None else list(action.choices),
                action.required,
                action.type if action.type is None else getattr(action.type, "__name__", ""),
            )
        )
    shape.append(sorted(parser._defaults))
    return shape


def test_the_command_table_names_what_each_module_registers() -> None:
    for names, register in cli.COMMANDS:
        parser = argparse.ArgumentParser()
        register(parser.add_subparsers())
        assert tuple(_commands(parser)) == names
    everything = cli.build_parser()
    assert tuple(_commands(everything)) == tuple(n for names, _ in cli.COMMANDS for n in names)


@pytest.mark.parametrize("command", [n for names, _ in cli.COMMANDS for n in names])
def test_a_line_naming_one_command_gets_the_same_parser_for_it(command: str) -> None:
    full = _commands(cli.build_parser())[command]
    built = cli.build_parser([command, "list"])
    assert _shape(_commands(built)[command]) == _shape(full)
    names = next(names for names, _ in cli.COMMANDS if command in names)
    assert set(_commands(built)) == set(names)  # and none of the others


def test_a_value_spelled_like_a_command_keeps_the_command_it_belongs_to() -> None:
    argv = ["task", "create", "usage", "--label", "team=store", "--input", "{}"]
    args = cli.build_parser(argv).parse_args(argv)
    assert (args.func, args.agent, args.label) == (
        task_cmd.cmd_task_create,
        "usage",
        ["team=store"],
    )


@pytest.mark.parametrize(
    "argv",
    [[], ["--help"], ["tsk", "list"], ["--server", "x:1"], ["-h", "task"], ["task", "--help"]],
)
def test_a_line_naming_no_command_gets_every_command(argv: list[str]) -> None:
    assert set(_commands(cli.build_parser(argv))) == set(_commands(cli.build_parser()))


def test_a_mistyped_command_is_answered_with_every_choice(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["tsk", "list"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'tsk'" in err
    assert all(f"'{n}'" in err for names, _ in cli.COMMANDS for n in names)


def test_a_client_command_does_not_import_the_logging_stack() -> None:
    """structlog (and with it rich's pretty-printer and tracebacks) is imported only when a
    daemon or `taskrun dev` configures logging."""
    probe = (
        "import sys; import taskrun.cli.main, taskrun.cli.client, taskrun.logging; "
        "print(sorted(m for m in ('structlog', 'rich') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
