"""Tests of the example plugin: hicache-sdk's policy contract, plus the policy's own decisions on a tiny Flux."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from hicache_policy_example import ProbeCache, ProbeCacheConfig

import hicache_sdk as sdk
from hicache_sdk.decision import BlockView, Decision
from hicache_sdk.state import ContextState, UnitState
from hicache_sdk.testing import PolicyContract

torch.set_num_threads(1)  # a model this small runs fastest on one CPU thread


class TestProbeCacheContract(PolicyContract):
    contract_basis = "hermite"

    @pytest.fixture
    def policy(self) -> str:
        return "probe_cache"  # the registered name: found through the entry point, composed by name


@pytest.fixture(scope="module")
def pipe() -> FluxPipeline:
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
    ).eval()
    none = dict.fromkeys(("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), transformer=transformer, **none)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: FluxPipeline, steps: int = 30) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    embeds = {
        "prompt_embeds": torch.randn(1, 6, 16, generator=g),
        "pooled_prompt_embeds": torch.randn(1, 16, generator=g),
    }
    return pipe(**embeds, height=64, width=64, num_inference_steps=steps, output_type="latent", generator=g).images


def run(pipe: FluxPipeline, steps: int = 30, **params: Any) -> tuple[torch.Tensor, sdk.RunSummary]:
    with sdk.compose("probe_cache", basis="hermite", **params).apply(pipe) as handle:
        return generate(pipe, steps), handle.summary()


def test_discovered_through_its_entry_point() -> None:
    assert sdk.get_policy("probe_cache") is ProbeCache


@pytest.mark.parametrize(
    ("field", "value"), [("threshold", 0), ("threshold", -0.1), ("threshold", math.nan), ("max_forecasts", 0)]
)
def test_bad_config_rejected(field: str, value: float) -> None:
    params: dict[str, Any] = {field: value}
    with pytest.raises(sdk.InvalidParameterError, match=field):
        sdk.compose("probe_cache", **params)


def test_forecasts_with_a_large_threshold(pipe: FluxPipeline) -> None:
    reference = generate(pipe)
    out, summary = run(pipe, threshold=0.5)
    assert summary.steps == 30 and summary.forecast_steps > 5 and summary.flops_speedup > 1.2
    rows = {unit.key: unit for unit in summary.units}
    assert all(rows[key].forecast == 0 for key in rows if key.startswith("transformer_blocks.0."))  # the probe
    assert rows["transformer_blocks.1.attn"].forecast == summary.forecast_steps
    assert summary.fallbacks == 0 and not torch.equal(out, reference)
    assert (out - reference).abs().mean() < 0.01 * reference.abs().mean()


def test_no_forecast_with_a_tiny_threshold_equals_uncached(pipe: FluxPipeline) -> None:
    out, summary = run(pipe, threshold=1e-6)
    assert summary.forecast_steps == 0
    assert torch.equal(out, generate(pipe))


def test_forecasts_in_a_row_are_capped(pipe: FluxPipeline) -> None:
    _, summary = run(pipe, threshold=1e6, max_forecasts=2, warmup=2)
    # 2 warm-up steps, then (2 forecast, 1 computed) 9 times, then 1 forecast
    assert (summary.full_steps, summary.forecast_steps) == (11, 19)


def test_few_step_generations_compute_every_step(pipe: FluxPipeline) -> None:
    _, summary = run(pipe, steps=8, threshold=1e6, warmup=1)  # 8 < min_steps = 16: the guard
    assert summary.forecast_steps == 0 and any("min_steps" in note for note in summary.notes)
    _, summary = run(pipe, steps=8, threshold=1e6, warmup=1, guard=False)
    assert summary.forecast_steps > 0


def test_probe_decides_through_the_reduction_point() -> None:
    seen: list[torch.Tensor] = []

    def reduce(local: torch.Tensor) -> torch.Tensor:
        seen.append(local)
        return local

    policy = ProbeCache(ProbeCacheConfig(threshold=0.5), sdk.get_basis("taylor")())
    ctx = ContextState("cond", reduce=reduce)
    ctx.policy_state, ctx.full = policy.new_policy_state(), False
    x, r = torch.randn(1, 16, 8), torch.randn(1, 16, 8)
    later = UnitState("blocks.1", ("",), policy.max_order, None, block=1)
    probe = UnitState("blocks.0", ("",), policy.max_order, None, block=0)
    policy.on_block(ctx, BlockView(0, 2, x, x + r))  # nothing to compare with yet
    assert seen == [] and policy.decide(ctx, later) is Decision.COMPUTE
    policy.on_block(ctx, BlockView(0, 2, x, x + 1.1 * r))  # 10 % change
    assert len(seen) == 1 and policy.decide(ctx, later) is Decision.FORECAST
    assert policy.decide(ctx, probe) is Decision.COMPUTE
    policy.on_block(ctx, BlockView(0, 2, x, x + 2.0 * r))  # 10 % + 82 % >= 50 %: compute, start again
    assert len(seen) == 2 and policy.decide(ctx, later) is Decision.COMPUTE
    assert ctx.policy_state.accumulated == 0.0
    policy.on_block(ctx, BlockView(0, 2, x, x + 2.0 * r))  # no change at all: unreadable, fail open
    assert ctx.full and any("noise floor" in note for note in ctx.guard_notes)
