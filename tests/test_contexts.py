"""State per CFG context, bare loops without a context, and a fresh start at every generation."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import pytest
import torch
from diffusers import FluxTransformer2DModel
from helpers import flux_inputs, run_loop, timesteps, tiny_flux

import hicache_sdk as sdk

STEPS = 9
POLICIES: dict[str, dict[str, Any]] = {
    "taylorseer": {"basis": "hermite", "interval": 3, "warmup": 1, "max_order": 2},
    "clusca": {"basis": "newton", "interval": 3, "warmup": 1, "num_clusters": 4, "gamma": 0.1},
}


@pytest.fixture(scope="module")
def model() -> FluxTransformer2DModel:
    return tiny_flux()


@pytest.fixture(scope="module")
def inputs() -> dict[str, Any]:
    return flux_inputs(batch=2, side=4, text=6)


@pytest.fixture(scope="module")
def branches() -> dict[str, dict[str, Any]]:
    """Different text conditioning per CFG branch."""
    cond, uncond = flux_inputs(batch=2, side=4, text=6, seed=1), flux_inputs(batch=2, side=4, text=6, seed=2)
    keys = ("encoder_hidden_states", "pooled_projections")
    return {"cond": {k: cond[k] for k in keys}, "uncond": {k: uncond[k] for k in keys}}


def replay(
    model: FluxTransformer2DModel,
    inputs: dict[str, Any],
    contexts: Sequence[str | None],
    branches: dict[str, dict[str, Any]] | None = None,
    steps: int = STEPS,
) -> dict[str | None, torch.Tensor]:
    """Call the model on a fixed, seeded latent trajectory, once per context per step; outputs by context."""
    g = torch.Generator().manual_seed(7)
    latents = [torch.randn(inputs["hidden_states"].shape, generator=g) for _ in range(steps)]
    outputs: dict[str | None, list[torch.Tensor]] = {name: [] for name in contexts}
    with torch.no_grad():
        for latent, level in zip(latents, timesteps(steps), strict=True):
            for name in contexts:
                extra = (branches or {}).get(name or "", {})
                scope = model.cache_context(name) if name is not None else nullcontext()
                with scope:
                    out = model(**{**inputs, **extra, "hidden_states": latent}, timestep=torch.full((2,), level))
                outputs[name].append(out.sample)
    return {name: torch.stack(values) for name, values in outputs.items()}


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_cfg_contexts_are_isolated(
    policy: str, model: FluxTransformer2DModel, inputs: dict[str, Any], branches: dict[str, dict[str, Any]]
) -> None:
    acc = sdk.compose(policy, **POLICIES[policy])
    with acc.apply(model) as handle:
        both = replay(model, inputs, ["cond", "uncond"], branches)
    summary = handle.summary()
    alone = {}
    for name in ("cond", "uncond"):
        with acc.apply(model):
            alone[name] = replay(model, inputs, [name], branches)[name]
    assert torch.equal(both["cond"], alone["cond"])
    assert torch.equal(both["uncond"], alone["uncond"])
    assert not torch.equal(both["cond"], both["uncond"])
    assert summary.contexts == ("cond", "uncond")
    assert (summary.steps, summary.full_steps, summary.forecast_steps) == (STEPS, 3, 6)  # per context
    assert all((u.computed, u.forecast) == (2 * 3, 2 * 6) for u in summary.units)  # summed over contexts
    assert "contexts cond, uncond" in summary.table()


def test_a_bare_loop_without_context_works(model: FluxTransformer2DModel, inputs: dict[str, Any]) -> None:
    with sdk.compose("taylorseer", interval=3, warmup=1).apply(model) as handle:
        out = replay(model, inputs, [None])[None]
    summary = handle.summary()
    assert torch.isfinite(out).all()
    assert summary.contexts == ("default",)
    assert (summary.steps, summary.full_steps) == (STEPS, 3)


def test_context_state_sizes_add_up(model: FluxTransformer2DModel, inputs: dict[str, Any], branches: Any) -> None:
    acc = sdk.compose("taylorseer", interval=3, warmup=1)
    with acc.apply(model) as one:
        replay(model, inputs, ["cond"], branches)
    with acc.apply(model) as two:
        replay(model, inputs, ["cond", "uncond"], branches)
    assert two.summary().cache_bytes == 2 * one.summary().cache_bytes


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_the_same_loop_twice_gives_the_same_output(
    policy: str, model: FluxTransformer2DModel, inputs: dict[str, Any]
) -> None:
    with sdk.compose(policy, **POLICIES[policy]).apply(model) as handle:
        first = run_loop(model, inputs, steps=STEPS)
        after_first = handle.summary()
        second = run_loop(model, inputs, steps=STEPS)
    assert torch.equal(first, second)
    # each loop is one whole generation: counted from its first step, not continued or split
    for summary in (after_first, handle.summary()):
        assert (summary.steps, summary.full_steps, summary.forecast_steps) == (STEPS, 3, 6)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_changing_the_number_of_steps_between_runs(
    policy: str, model: FluxTransformer2DModel, inputs: dict[str, Any]
) -> None:
    acc = sdk.compose(policy, **POLICIES[policy])
    with acc.apply(model) as handle:
        run_loop(model, inputs, steps=STEPS)
        short = run_loop(model, inputs, steps=5)
        summary = handle.summary()
    with acc.apply(model):
        fresh = run_loop(model, inputs, steps=5)
    assert torch.equal(short, fresh)
    assert (summary.steps, summary.full_steps, summary.forecast_steps) == (5, 2, 3)  # full at 0, 3


def test_reset_starts_a_generation_when_the_noise_level_does_not_rise(
    model: FluxTransformer2DModel, inputs: dict[str, Any]
) -> None:
    """A second loop starting below the first one's last level continues it unless reset."""
    acc = sdk.compose("taylorseer", interval=3, warmup=1)
    with acc.apply(model):
        fresh = run_loop(model, inputs, steps=6, scale=0.1)
    with acc.apply(model) as handle:
        run_loop(model, inputs, steps=6)  # levels 1.0 .. 0.167
        continued = run_loop(model, inputs, steps=6, scale=0.1)  # levels 0.1 .. 0.017
        assert handle.summary().steps == 12
        run_loop(model, inputs, steps=6)
        handle.reset()
        restarted = run_loop(model, inputs, steps=6, scale=0.1)
        assert handle.summary().steps == 6
    assert not torch.equal(continued, fresh)
    assert torch.equal(restarted, fresh)


def test_the_pipelines_end_of_call_reset_ends_the_generation(
    model: FluxTransformer2DModel, inputs: dict[str, Any]
) -> None:
    """Pipelines call ``_reset_stateful_cache()`` (``maybe_free_model_hooks``) at the end of every call."""
    acc = sdk.compose("taylorseer", interval=3, warmup=1)
    with acc.apply(model):
        fresh = run_loop(model, inputs, steps=6, scale=0.1)
    with acc.apply(model) as handle:
        run_loop(model, inputs, steps=6)
        model._reset_stateful_cache()
        assert handle.summary().steps == 6  # still readable after the reset
        after = run_loop(model, inputs, steps=6, scale=0.1)
    assert torch.equal(after, fresh)
