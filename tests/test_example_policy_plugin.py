"""The example policy distribution (docs/examples/hicache-policy-example), really installed, and its tutorial.

It is built and installed with pip into a temporary target directory (no network, no build
isolation), put on ``sys.path``, and found through its entry point like any installed plugin; its
own test suite then runs against the installed copy. The tutorial's code blocks run in
``test_docs.py`` (every tutorial does); here they are checked to show the distribution verbatim.
Marked ``integration`` (deselect with ``-m "not integration"``); the module takes ~30 s here.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import example_on_path, flux_inputs, install_example, run_loop, tiny_flux
from test_docs import TUTORIALS, code_blocks

import hicache_sdk as sdk
from hicache_sdk.registry import AUTOLOAD_ENV, reset_registry
from hicache_sdk.testing import check_policy_contract

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "hicache-policy-example"
TUTORIAL = ROOT / "docs" / "tutorials" / "write-a-policy-plugin.md"
MODULE = "hicache_policy_example"
BUILTIN_POLICIES = {"fora", "taylorseer", "clusca"}


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example installed with pip into an empty target directory."""
    return install_example(EXAMPLE, MODULE, tmp_path_factory.mktemp("policy_example"))


@pytest.fixture
def on_path(target: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The target directory on sys.path and a registry that has not seen it yet; both undone after."""
    with example_on_path(target, MODULE, monkeypatch) as path:
        yield path


def test_not_visible_without_installing() -> None:
    assert "probe_cache" not in sdk.list_policies()


def test_discovered_with_no_code_change(on_path: Path) -> None:
    assert "probe_cache" in sdk.list_policies()
    reg = sdk.registry.get_registry().get("policy", "probe_cache")
    assert reg.distribution == "hicache-policy-example 0.1.0"
    assert reg.plugin == "hicache-policy-example:probe_cache"
    assert reg.obj.__module__ == MODULE
    assert Path(sys.modules[MODULE].__file__ or "").is_relative_to(on_path)
    assert set(sdk.list_policies()) >= BUILTIN_POLICIES


def _loop(model: torch.nn.Module, **params: Any) -> tuple[torch.Tensor, sdk.RunSummary]:
    """A 20-step bare loop with two CFG contexts fed the same inputs, through the flux adapter."""
    accelerator = sdk.compose("probe_cache", basis="hermite", warmup=2, **params)
    with accelerator.apply(model) as handle:
        outputs = run_loop(model, flux_inputs(side=4), steps=20, contexts=("cond", "uncond"))
        return outputs, handle.summary()


def test_composes_like_a_builtin(on_path: Path) -> None:
    model = tiny_flux()
    reference = run_loop(model, flux_inputs(side=4), steps=20, contexts=("cond", "uncond"))
    cached, summary = _loop(model, threshold=0.5)
    assert summary.policy.startswith("probe_cache[hermite(sigma=0.5)](warmup=2, max_order=1, ")
    assert summary.adapter == "flux" and summary.contexts == ("cond", "uncond")
    assert summary.forecast_steps > 5 and summary.fallbacks == 0
    rows = {unit.key: unit for unit in summary.units}
    assert rows["transformer_blocks.0.attn"].forecast == 0  # the probe computes at every step, in both contexts
    assert rows["transformer_blocks.1.attn"].forecast == 2 * summary.forecast_steps
    assert torch.equal(cached[:, 0], cached[:, 1])  # identical branches, each with its own state, decide alike
    assert not torch.equal(cached, reference)
    assert (cached - reference).abs().mean() < 0.02 * reference.abs().mean()
    exact, summary = _loop(model, threshold=1e-6)  # too small for any change: nothing forecast
    assert summary.forecast_steps == 0 and torch.equal(exact, reference)


def test_passes_the_contract(on_path: Path) -> None:
    # the example's own suite checks the defaults; here a cap of one forecast in a row
    check_policy_contract("probe_cache", basis="hermite", params={"max_forecasts": 1})


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
    assert "probe_cache" not in sdk.list_policies() and set(sdk.list_policies()) >= BUILTIN_POLICIES
    assert MODULE not in sys.modules
    with pytest.raises(sdk.UnknownPluginError, match="unknown policy 'probe_cache'"):
        sdk.compose("probe_cache")


def test_gone_after_cleanup() -> None:
    assert "probe_cache" not in sdk.list_policies()
    assert MODULE not in sys.modules


# -- the tutorial -------------------------------------------------------------------------------------
def test_tutorial_is_executed_by_the_docs_tests() -> None:
    assert TUTORIAL in TUTORIALS  # test_docs.test_tutorial_code_runs runs every unskipped python block


def test_tutorial_shows_the_example_distribution_verbatim() -> None:
    text = TUTORIAL.read_text()
    python = code_blocks(text)
    module = (EXAMPLE / "src" / MODULE / "__init__.py").read_text().rstrip()
    tests = (EXAMPLE / "tests" / "test_probe_cache.py").read_text().rstrip()
    assert python[0] == (python[0][0], module, False)  # the first block is the module itself, and runs
    assert (tests, True) in [(code, skipped) for _, code, skipped in python]  # shown, run above instead
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
