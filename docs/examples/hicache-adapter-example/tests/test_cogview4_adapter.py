"""Tests of the example plugin: hicache-sdk's adapter contract on a tiny CogView4, and what the contract cannot know."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hicache_cogview4 import CogView4Adapter

import hicache_sdk as sdk
from hicache_sdk.testing.adapter_contract import AdapterContract
from hicache_sdk.testing.families import FAMILY_CASES
from hicache_sdk.testing.model_case import ModelCase

torch.set_num_threads(1)  # a model this small runs fastest on one CPU thread

#: A tiny random-weight CogView4Transformer2DModel and the arguments CogView4Pipeline passes it.
CASE = FAMILY_CASES["cogview4"]


class TestCogView4Contract(AdapterContract):
    @pytest.fixture
    def adapter(self) -> str:
        return "cogview4"  # the registered name: found through the entry point, chosen for the model

    @pytest.fixture
    def case(self) -> ModelCase:
        return CASE

    @pytest.fixture
    def other_case(self) -> ModelCase:
        return FAMILY_CASES["sd3"]  # a model of another family, which the adapter must refuse


def run(model: torch.nn.Module, policy: str, steps: int = 6, **params: Any) -> sdk.RunSummary:
    """A bare loop of ``steps`` steps of decreasing noise level at batch 2, and its summary."""
    with sdk.compose(policy, **params).apply(model) as handle, torch.no_grad():
        for step in range(steps):
            model(**CASE.inputs(2, 1.0 - step / steps, 0))
        return handle.summary()


def test_discovered_through_its_entry_point() -> None:
    assert sdk.get_adapter("cogview4") is CogView4Adapter
    assert "cogview4" in sdk.list_adapters()


def test_every_unit_is_forecast_on_every_forecast_step() -> None:
    # the feed-forward runs twice per block (image, then text tokens): one unit, asked for once per step
    summary = run(CASE.build(), "taylorseer", interval=2, warmup=1)
    assert summary.adapter == "cogview4" and (summary.full_steps, summary.forecast_steps) == (3, 3)
    assert sorted(unit.key for unit in summary.units) == [
        f"transformer_blocks.{i}.{module}" for i in (0, 1) for module in ("attn1", "ff")
    ]
    assert all((unit.computed, unit.forecast, unit.fallbacks) == (3, 3, 0) for unit in summary.units)


def test_token_paths_recompute_the_feed_forward_on_chosen_tokens() -> None:
    summary = run(CASE.build(), "clusca", interval=3, warmup=1, num_clusters=4)
    rows = {unit.key: unit for unit in summary.units}
    assert rows["transformer_blocks.1.ff"].partial == rows["transformer_blocks.1.ff"].forecast > 0
    assert rows["transformer_blocks.1.attn1"].partial == 0  # attention mixes tokens: no token path


def test_timestep_convention() -> None:
    adapter = CogView4Adapter(CASE.build())
    assert adapter.timestep_scale == 1000.0
    assert adapter.noise_level(1000.0) == 1.0 and adapter.noise_level(250.0) == 0.25


def test_a_modified_block_is_refused() -> None:
    model: Any = CASE.build()
    block = model.transformer_blocks[1]
    block.forward = lambda *args, **kwargs: type(block).forward(block, *args, **kwargs)  # a user's patch
    assert not CogView4Adapter.fits(model)
    with pytest.raises(sdk.AdapterMismatchError, match=r"transformer_blocks\.1 .* modified block"):
        CogView4Adapter(model)
