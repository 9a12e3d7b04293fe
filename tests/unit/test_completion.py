"""`taskrun completion bash|zsh` prints a script the shell accepts, covering every command."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from taskrun.cli import main as cli

COMMANDS = [name for names, _ in cli.COMMANDS for name in names]


def script(shell: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(["completion", shell]) == 0
    return capsys.readouterr().out


def test_bash_completion_is_valid_bash_naming_every_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = script("bash", capsys)
    assert "-F _shtab_taskrun taskrun" in text  # bound to the command
    for command in COMMANDS:  # each with its own completions, not only its name
        assert f"_shtab_taskrun_{command.replace('-', '_')}_" in text
    checked = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
    assert checked.returncode == 0, checked.stderr


def test_zsh_completion_is_a_compdef_for_taskrun(capsys: pytest.CaptureFixture[str]) -> None:
    text = script("zsh", capsys)
    assert text.startswith("#compdef taskrun")
    for command in COMMANDS:
        assert command in text
    if shutil.which("zsh"):
        checked = subprocess.run(["zsh", "-n"], input=text, text=True, capture_output=True)
        assert checked.returncode == 0, checked.stderr


def test_an_unknown_shell_is_a_usage_error_naming_the_choices(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["completion", "fish"])
    assert info.value.code == 2
    assert "choose from 'bash', 'zsh'" in capsys.readouterr().err
