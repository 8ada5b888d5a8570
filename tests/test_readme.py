"""The README keeps exactly two set-up commands, CI runs the README's test command, and its Python
example runs as written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SETUP = re.compile(r"^python3 -m venv \.venv .*$", re.MULTILINE)
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


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


def test_readme_python_example_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from hicache_sdk.models import load_digit_classifier

    blocks = PYTHON_BLOCK.findall((ROOT / "README.md").read_text())
    assert len(blocks) == 1, "the README has one Python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(blocks[0], "README.md:python", "exec"), namespace)  # exactly as written, no names given
    printed = capsys.readouterr().out

    handle, model, images = namespace["handle"], namespace["model"], namespace["images"]
    summary = handle.summary()
    assert summary.policy.startswith("clusca[hermite(sigma=0.5)](interval=7")
    assert (summary.steps, summary.full_steps, summary.forecast_steps) == (50, 9, 41)
    assert summary.flops_speedup > 4
    assert "steps    50 (9 full, 41 forecast)" in printed  # the summary was printed inside the block
    assert not handle.attached and "forward" not in vars(model.transformer)  # the model is restored
    assert images.shape == (2, 1, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(load_digit_classifier().classify(images), torch.tensor([3, 7]))  # it drew the digits asked
