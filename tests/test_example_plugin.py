"""The example third-party distribution (docs/examples/hicache-plugin-example), really installed.

It is built and installed with pip into a temporary target directory (no network, no build
isolation), put on ``sys.path``, and found through its entry point like any installed plugin.
Marked ``integration`` (deselect with ``-m "not integration"``); the module takes ~15 s here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import example_on_path, install_example
from torch import nn

import hicache_sdk as sdk
from hicache_sdk.registry import AUTOLOAD_ENV, reset_registry
from hicache_sdk.testing import check_basis_contract

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "hicache-plugin-example"
MODULE = "hicache_plugin_example"


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example installed with pip into an empty target directory."""
    return install_example(EXAMPLE, MODULE, tmp_path_factory.mktemp("example"))


@pytest.fixture
def on_path(target: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The target directory on sys.path and a registry that has not seen it yet; both undone after."""
    with example_on_path(target, MODULE, monkeypatch) as path:
        yield path


def test_not_visible_without_installing() -> None:
    assert "damped_taylor" not in sdk.list_bases()


def test_discovered_with_no_code_change(on_path: Path) -> None:
    assert "damped_taylor" in sdk.list_bases()
    reg = sdk.registry.get_registry().get("basis", "damped_taylor")
    assert reg.distribution == "hicache-plugin-example 0.1.0"
    assert reg.plugin == "hicache-plugin-example:damped_taylor"
    assert reg.obj.__module__ == MODULE
    assert Path(sys.modules[MODULE].__file__ or "").is_relative_to(on_path)
    assert set(sdk.list_bases()) >= {"taylor", "hermite", "scaled_taylor", "newton"}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + torch.tanh(self.linear(hidden_states))


class Toy(nn.Module):
    """The smallest model the generic adapter serves: a list of blocks and a timestep argument."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block() for _ in range(2)])

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return hidden_states


def run_steps(model: Toy, basis: str, **params: Any) -> tuple[list[torch.Tensor], sdk.RunSummary]:
    accelerator = sdk.compose("taylorseer", basis=basis, interval=3, warmup=1, max_order=2, **params)
    x = torch.linspace(-1, 1, 32).reshape(1, 4, 8)
    with accelerator.apply(model) as handle:
        outputs = [model(x + 0.1 * s, timestep=torch.tensor([1000.0 - 100 * s])) for s in range(8)]
        return outputs, handle.summary()


def test_composes_like_a_builtin(on_path: Path) -> None:
    torch.manual_seed(0)
    model = Toy()
    damped, summary = run_steps(model, "damped_taylor", horizon=2.0)
    taylor, _ = run_steps(model, "taylor")
    assert summary.basis == "damped_taylor(horizon=2.0)"
    assert (summary.full_steps, summary.forecast_steps) == (3, 5)  # steps 0, 3, 6 full
    assert all(unit.forecast == 5 and unit.fallbacks == 0 for unit in summary.units)
    assert all(bool(torch.isfinite(out).all()) for out in damped)
    for step in (0, 3, 6):  # full steps compute the model: same output whatever the basis
        assert torch.equal(damped[step], taylor[step])
    for step in (4, 5, 7):  # forecasts with a slope: the basis decides
        assert not torch.allclose(damped[step], taylor[step])


def test_passes_the_contract(on_path: Path) -> None:
    cls: Any = sdk.get_basis("damped_taylor")
    for horizon in (0.5, 8.0):
        check_basis_contract(cls(horizon=horizon), max_examples=15)


def test_its_own_test_suite_passes(on_path: Path, tmp_path: Path) -> None:
    # what the plugin's author runs: pytest on the distribution's tests, BasisContract mixin included
    env = {**os.environ, "PYTHONPATH": str(on_path)}
    env.pop(AUTOLOAD_ENV, None)
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(EXAMPLE / "tests")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_skipped_when_autoload_is_disabled(on_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    reset_registry()
    assert sdk.list_bases() == ["hermite", "newton", "scaled_taylor", "taylor"]
    assert MODULE not in sys.modules
    with pytest.raises(sdk.UnknownPluginError, match="unknown basis 'damped_taylor'"):
        sdk.compose("taylorseer", basis="damped_taylor")


def test_gone_after_cleanup() -> None:
    assert "damped_taylor" not in sdk.list_bases()
    assert MODULE not in sys.modules
