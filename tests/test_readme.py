"""The README keeps exactly two set-up commands, and CI runs the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUP = re.compile(r"^python3 -m venv \.venv .*$", re.MULTILINE)


def _commands() -> list[str]:
    return SETUP.findall((ROOT / "README.md").read_text())


def test_readme_has_exactly_two_setup_commands() -> None:
    commands = _commands()
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert main_job.endswith("hicache bench")
    assert "pytest" in tests


def test_setup_commands_install_cpu_torch_before_the_project() -> None:
    for command in _commands():
        steps = command.split(" && ")
        torch_step = steps.index(".venv/bin/pip install torch==2.13.0")
        project_step = next(i for i, s in enumerate(steps) if s.startswith(".venv/bin/pip install -e"))
        assert torch_step < project_step, command


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    pattern = re.search(r"grep -m1 -E '(.+?)' README\.md", ci)
    assert pattern is not None, "CI must take its test command from the README"
    found = [c for c in _commands() if re.search(pattern.group(1), c)]
    assert found == [_commands()[1]]
    assert '"$status" -eq 5' in ci, "pytest's exit code 5 (no tests) must fail CI"
