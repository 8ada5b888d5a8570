"""The example adapter distribution (docs/examples/hicache-adapter-example), really installed, and its tutorial.

It is built and installed with pip into a temporary target directory (no network, no build
isolation), put on ``sys.path``, and found through its entry point like any installed plugin; its
own test suite then runs against the installed copy. The tutorial's code blocks run in
``test_docs.py`` (every tutorial does); here they are checked to show the distribution verbatim.
Marked ``integration`` (deselect with ``-m "not integration"``); the module takes ~25 s here.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import cli_status, example_on_path, install_example
from test_docs import TUTORIALS, code_blocks

import hicache_sdk as sdk
from hicache_sdk.registry import AUTOLOAD_ENV, reset_registry
from hicache_sdk.testing.adapter_contract import check_adapter_contract
from hicache_sdk.testing.families import FAMILY_CASES

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "hicache-adapter-example"
TUTORIAL = ROOT / "docs" / "tutorials" / "write-an-adapter-plugin.md"
MODULE = "hicache_cogview4"
DISTRIBUTION = "hicache-adapter-example 0.1.0"
CASE = FAMILY_CASES["cogview4"]


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example installed with pip into an empty target directory."""
    return install_example(EXAMPLE, MODULE, tmp_path_factory.mktemp("adapter_example"))


@pytest.fixture
def on_path(target: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The target directory on sys.path and a registry that has not seen it yet; both undone after."""
    with example_on_path(target, MODULE, monkeypatch) as path:
        yield path


def test_not_visible_without_installing() -> None:
    assert "cogview4" not in sdk.list_adapters()
    assert sdk.registry.get_registry().select_adapter(CASE.build()).name == "generic"


def test_listed_under_its_distribution(on_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = sdk.registry.get_registry().get("adapter", "cogview4")
    assert reg.distribution == DISTRIBUTION
    assert reg.plugin == "hicache-adapter-example:cogview4"
    assert reg.obj is sys.modules[MODULE].CogView4Adapter
    assert Path(sys.modules[MODULE].__file__ or "").is_relative_to(on_path)
    assert cli_status(["plugins"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["adapter", "cogview4", "hicache-adapter-example:cogview4", *DISTRIBUTION.split()] in rows
    assert {"flux", "generic", "sd3"} <= {row[1] for row in rows if row and row[0] == "adapter"}


def test_chosen_automatically(on_path: Path) -> None:
    model = CASE.build()
    with torch.no_grad():
        reference = [model(**CASE.inputs(2, 1.0 - step / 6, 0))[0] for step in range(6)]
    with sdk.compose("taylorseer", interval=2, warmup=1).apply(model) as handle, torch.no_grad():
        assert handle.adapter.name == "cogview4"
        cached = [model(**CASE.inputs(2, 1.0 - step / 6, 0))[0] for step in range(6)]
        summary = handle.summary()
    assert summary.adapter == "cogview4" and (summary.full_steps, summary.forecast_steps) == (3, 3)
    assert {unit.key for unit in summary.units} == {
        f"transformer_blocks.{i}.{m}" for i in (0, 1) for m in ("attn1", "ff")
    }
    assert all((unit.computed, unit.forecast) == (3, 3) for unit in summary.units)
    for step in (0, 2, 4):  # computed steps: the stock outputs, bit for bit
        assert torch.equal(cached[step], reference[step])
    for step in (1, 3, 5):  # forecast steps: close, not equal
        assert not torch.equal(cached[step], reference[step])
        assert (cached[step] - reference[step]).abs().mean() < 0.1 * reference[step].abs().mean()


def test_passes_the_contract(on_path: Path) -> None:
    check_adapter_contract("cogview4", CASE, FAMILY_CASES["flux"])


def test_its_own_test_suite_passes(on_path: Path, tmp_path: Path) -> None:
    # what the plugin's author runs: pytest on the distribution's tests, against the installed copy
    env = {**os.environ, "PYTHONPATH": str(on_path)}
    env.pop(AUTOLOAD_ENV, None)
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(EXAMPLE / "tests")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_skipped_when_autoload_is_disabled(on_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    reset_registry()
    assert "cogview4" not in sdk.list_adapters() and {"flux", "generic"} <= set(sdk.list_adapters())
    assert MODULE not in sys.modules
    with pytest.raises(sdk.UnknownPluginError, match="unknown adapter 'cogview4'"):
        sdk.compose("taylorseer", adapter="cogview4")


def test_gone_after_cleanup() -> None:
    assert "cogview4" not in sdk.list_adapters()
    assert MODULE not in sys.modules


# -- the tutorial -------------------------------------------------------------------------------------
def test_tutorial_is_executed_by_the_docs_tests() -> None:
    assert TUTORIAL in TUTORIALS  # test_docs.test_tutorial_code_runs runs every unskipped python block


def test_tutorial_shows_the_example_distribution_verbatim() -> None:
    text = TUTORIAL.read_text()
    python = [(code, skipped) for _, code, skipped in code_blocks(text)]
    module = (EXAMPLE / "src" / MODULE / "__init__.py").read_text().rstrip()
    tests = (EXAMPLE / "tests" / "test_cogview4_adapter.py").read_text().rstrip()
    assert (module, False) in python  # the module itself, and it runs
    assert (tests, True) in python  # shown, run above instead
    assert [code for _, code, _ in code_blocks(text, "toml")] == [(EXAMPLE / "pyproject.toml").read_text().rstrip()]


@pytest.mark.parametrize("page", [TUTORIAL, EXAMPLE / "README.md"], ids=lambda p: str(p.relative_to(ROOT)))
def test_installed_into_the_sdks_environment(page: Path) -> None:
    """Every shell command runs with the interpreter of the project's ``.venv``; the install is editable."""
    commands = [
        words
        for _, code, _ in code_blocks(page.read_text(), "bash")
        for words in (shlex.split(line, comments=True) for line in code.splitlines())
        if words
    ]
    assert commands and all(words[0] == ".venv/bin/python" for words in commands), commands
    installs = [words for words in commands if words[1:4] == ["-m", "pip", "install"]]
    assert installs == [[".venv/bin/python", "-m", "pip", "install", "-e", str(EXAMPLE.relative_to(ROOT))]]
