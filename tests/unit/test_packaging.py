"""The distribution is `taskrun-agents` (the name `taskrun` on the package index is taken)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# `pip install taskrun`, `pip install 'taskrun[claude]'`, `pip install "taskrun>=1"`, ...
TAKEN_NAME = re.compile(r"pip install\s+['\"]?taskrun(?![-\w])")


def test_the_distribution_is_named_taskrun_agents_and_installs_the_taskrun_command() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "taskrun-agents"
    assert project["scripts"] == {"taskrun": "taskrun.cli.main:main"}


def test_no_install_instruction_names_the_taken_distribution() -> None:
    files = [ROOT / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("deploy/**/*")]
    files += [*ROOT.glob("src/**/*.py"), *ROOT.glob("scripts/*")]
    offenders = [
        f"{path.relative_to(ROOT)}: {line.strip()}"
        for path in files
        if path.is_file()
        for line in path.read_text(errors="replace").splitlines()
        if TAKEN_NAME.search(line)
    ]
    assert offenders == []
