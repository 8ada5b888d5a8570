"""Behaviour of the built-in dynamic policies: first_block, easycache, speca, pab and the guard.

Random-weight models change little from step to step, so these tests use settings that make the
policies act (generous thresholds, short warm-ups); they check what computes and what is forecast,
not accuracy (accuracy is measured on the trained model by the bench and the frontier).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import flux_inputs, flux_pipeline, pipeline_call, pixart_inputs, run_loop, tiny_flux, tiny_pixart

import hicache_sdk as sdk
from hicache_sdk.decision import BlockView, Decision, StepInfo
from hicache_sdk.policy import DynamicPolicy
from hicache_sdk.state import ContextState
from hicache_sdk.testing import check_summary_and_flops

DYNAMIC = sorted(name for name in sdk.list_policies() if issubclass(sdk.get_policy(name), DynamicPolicy))
#: settings that make each policy forecast on random weights (its knob wide open, a short warm-up)
ACTING: dict[str, dict[str, Any]] = {
    "first_block": {"warmup": 1, "threshold": 10.0},
    "easycache": {"warmup": 2, "tail": 0, "threshold": 10.0},
    "speca": {"warmup": 1, "threshold": 1e6},
    "pab": {"window_low": 0.0, "window_high": 1.0},
}


def test_every_dynamic_builtin_has_acting_settings() -> None:
    assert set(DYNAMIC) >= {"first_block", "easycache", "speca", "pab"}
    assert set(ACTING) == set(DYNAMIC)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_flux(num_layers=2, num_single_layers=2)


def _run(model: torch.nn.Module, steps: int, policy: str | None = None, **params: Any) -> tuple[torch.Tensor, Any]:
    inputs = flux_inputs(batch=2)
    if policy is None:
        return run_loop(model, inputs, steps=steps), None
    params.setdefault("min_steps", 1)  # these short runs test the policy, not the few-step guard
    with sdk.compose(policy, **params).apply(model) as handle:
        handle.reset(num_steps=steps)
        out = run_loop(model, inputs, steps=steps)
    return out, handle.summary()


def _units(summary: Any) -> dict[str, Any]:
    return {u.key: u for u in summary.units}


# -- the guard -------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [4, 8])
@pytest.mark.parametrize("policy", DYNAMIC)
def test_few_step_pipeline_runs_are_bit_identical_to_no_cache(policy: str, steps: int) -> None:
    pipe = flux_pipeline(tiny_flux())
    reference = pipeline_call(pipe, steps=steps)
    with sdk.compose(policy, **ACTING[policy]).apply(pipe) as handle:
        cached = pipeline_call(pipe, steps=steps)
    summary = handle.summary()
    assert torch.equal(cached, reference)
    assert summary.forecast_steps == 0 and summary.guarded_steps == steps
    assert any("min_steps" in note for note in summary.notes), summary.notes


@pytest.mark.parametrize("policy", DYNAMIC)
def test_without_the_guard_the_same_few_step_run_is_cached(policy: str) -> None:
    """The control of the test above: the guard, not the settings, keeps few-step runs exact."""
    pipe = flux_pipeline(tiny_flux())
    reference = pipeline_call(pipe, steps=8)
    with sdk.compose(policy, guard=False, **ACTING[policy]).apply(pipe) as handle:
        cached = pipeline_call(pipe, steps=8)
    assert handle.summary().forecast_steps > 0
    assert not torch.equal(cached, reference)


def test_a_signal_at_the_noise_floor_fails_open_and_says_so(model: torch.nn.Module) -> None:
    """Identical calls give a probe change of exactly 0: no information, so the step computes."""
    inputs = {**flux_inputs(), "timestep": torch.tensor([0.5])}
    with sdk.compose("first_block", warmup=1, threshold=0.5).apply(model) as handle:
        with torch.no_grad():
            guarded = [model(**inputs).sample for _ in range(5)]
    summary = handle.summary()
    assert summary.forecast_steps == 0 and summary.guarded_steps == 4
    assert any("noise floor" in note for note in summary.notes), summary.notes
    with sdk.compose("first_block", warmup=1, threshold=0.5, guard=False).apply(model) as handle:
        with torch.no_grad():
            [model(**inputs).sample for _ in range(5)]
    assert handle.summary().forecast_steps == 4
    assert all(torch.equal(g, guarded[0]) for g in guarded)


# -- first_block -------------------------------------------------------------------------------
def test_first_block_always_computes_its_probe_and_trailing_blocks(model: torch.nn.Module) -> None:
    _, summary = _run(model, 10, "first_block", warmup=1, threshold=10.0, bn_blocks=1)
    units = _units(summary)
    assert summary.forecast_steps == 9
    for key, unit in units.items():
        probe_or_tail = key.startswith("transformer_blocks.0.") or key.startswith("single_transformer_blocks.1.")
        assert (unit.forecast == 0) == probe_or_tail, key


def test_first_block_with_a_tiny_threshold_is_exact(model: torch.nn.Module) -> None:
    reference, _ = _run(model, 10)
    out, summary = _run(model, 10, "first_block", warmup=1, threshold=1e-9)
    assert summary.forecast_steps == 0
    assert torch.equal(out, reference)


def test_first_block_caps_consecutive_forecasts(model: torch.nn.Module) -> None:
    seen: list[tuple[int, str]] = []
    with sdk.compose("first_block", warmup=1, threshold=10.0, max_consecutive=2).apply(model) as handle:
        handle.add_observer(lambda ctx, step, key, how, out: seen.append((step, how)))
        run_loop(model, flux_inputs(), steps=12)
    middle = {}
    for step, how in seen:
        middle.setdefault(step, set()).add(how)
    forecast = [("forecast" in middle[s]) for s in sorted(middle)]
    # warm-up step 0 sets the reference, then (forecast, forecast, compute): never three in a row
    assert forecast == [False] + [True, True, False] * 3 + [True, True]


def test_first_block_per_sample_decides_each_sample_as_if_alone(model: torch.nn.Module) -> None:
    """Two samples whose probes move differently: in one batch each is decided as when run alone."""
    params = {"warmup": 1, "threshold": 0.3, "per_sample": True}
    inputs = flux_inputs(batch=2, seed=3)  # at this threshold its samples forecast 6 and 4 steps alone
    alone = []
    for b in range(2):
        batched = ("hidden_states", "encoder_hidden_states", "pooled_projections")
        single = {k: (v[b : b + 1] if k in batched else v) for k, v in inputs.items()}
        with sdk.compose("first_block", **params).apply(model) as handle:
            alone.append(run_loop(model, single, steps=12))
        alone_counts = handle.summary().units[-1]
        alone.append(alone_counts.forecast)
    assert alone[1] != alone[3], "the two samples must decide differently for this test to mean anything"
    with sdk.compose("first_block", **params).apply(model) as handle:
        together = run_loop(model, inputs, steps=12)
    unit = handle.summary().units[-1]
    assert unit.sample_forecast == (alone[1], alone[3])
    assert unit.partial > 0
    torch.testing.assert_close(together[:, :, 0:1], alone[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(together[:, :, 1:2], alone[2], rtol=1e-4, atol=1e-5)


def test_first_block_per_sample_counts_only_the_flops_it_saved() -> None:
    check_summary_and_flops("first_block", params={"warmup": 1, "threshold": 0.25, "per_sample": True})


def test_per_sample_needs_an_adapter_that_splits_batches() -> None:
    with pytest.raises(sdk.AdapterMismatchError, match="per_sample"):
        sdk.compose("first_block", per_sample=True, adapter="generic").apply(tiny_pixart())


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": -0.1}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"threshold": float("inf")}, "threshold"),
        ({"fn_blocks": 0}, "fn_blocks"),
        ({"max_consecutive": -2}, "max_consecutive"),
        ({"per_sample": 1}, "per_sample"),
        ({"guard": "yes"}, "guard"),
    ],
)
def test_first_block_refuses_bad_settings_naming_the_field(params: dict[str, Any], field: str) -> None:
    with pytest.raises(sdk.InvalidParameterError, match=field):
        sdk.compose("first_block", **params)


def test_first_block_refuses_probes_the_model_does_not_have(model: torch.nn.Module) -> None:
    with pytest.raises(sdk.InvalidParameterError, match=r"fn_blocks \+ bn_blocks must be < the number of blocks \(4"):
        sdk.compose("first_block", fn_blocks=3, bn_blocks=1).apply(model)
    with pytest.raises(sdk.InvalidParameterError, match="got fn_blocks=4"):
        sdk.compose("first_block", fn_blocks=4).apply(model)


# -- easycache ---------------------------------------------------------------------------------
def test_easycache_forecasts_while_the_estimated_change_is_small(model: torch.nn.Module) -> None:
    reference, _ = _run(model, 12)
    exact, summary = _run(model, 12, "easycache", warmup=2, tail=1, threshold=1e-9)
    assert summary.forecast_steps == 0 and torch.equal(exact, reference)
    _, summary = _run(model, 12, "easycache", warmup=2, tail=1, threshold=10.0)
    # steps 0-1 warm up (and give k), the last step computes: everything else is forecast
    assert summary.full_steps == 3 and summary.forecast_steps == 9


def test_easycache_tail_needs_the_number_of_steps(model: torch.nn.Module) -> None:
    with sdk.compose("easycache", warmup=2, threshold=10.0).apply(model):
        with pytest.raises(sdk.InvalidParameterError, match="tail=1"):
            run_loop(model, flux_inputs(), steps=12)


# -- speca ---------------------------------------------------------------------------------------
def test_speca_recomputes_a_rejected_draft_and_charges_it(model: torch.nn.Module) -> None:
    reference, _ = _run(model, 10)
    # min_threshold 0 and a tiny base: every verified draft fails
    out, summary = _run(model, 10, "speca", warmup=1, threshold=1e-12, min_threshold=0.0, min_drafts=1)
    assert summary.rejected_steps == 9 and summary.forecast_steps == 0
    assert torch.equal(out, reference)  # every step ended up computed in full
    assert summary.flops_saved_fraction < 0  # the drafts' work is overhead
    check_summary_and_flops("speca", params={"warmup": 1, "threshold": 1e-12, "min_threshold": 0.0})


def test_speca_verifies_on_its_verify_block_only(model: torch.nn.Module) -> None:
    _, summary = _run(model, 10, "speca", warmup=1, threshold=1e6, min_drafts=1)
    units = _units(summary)
    assert summary.rejected_steps == 0 and summary.forecast_steps == 8  # max_drafts=8 then a full step
    assert {k for k, u in units.items() if u.verified} == {"single_transformer_blocks.1.proj_out"}


def test_speca_reject_next_keeps_the_draft_and_computes_the_next_step(model: torch.nn.Module) -> None:
    _, summary = _run(model, 10, "speca", warmup=1, threshold=1e-12, min_threshold=0.0, min_drafts=1, reject="next")
    assert summary.rejected_steps == 0
    assert summary.forecast_steps == 5 and summary.full_steps == 5  # full, draft (fails), full, ...


def test_speca_refuses_a_verify_block_the_model_does_not_have(model: torch.nn.Module) -> None:
    with pytest.raises(sdk.InvalidParameterError, match=r"verify_block must be in \[-4, 3\]"):
        sdk.compose("speca", verify_block=4).apply(model)
    with pytest.raises(sdk.InvalidParameterError, match="reject must be one of"):
        sdk.compose("speca", reject="later")
    with pytest.raises(sdk.InvalidParameterError, match=r"min_drafts must be <= max_drafts.*got min_drafts=9"):
        sdk.compose("speca", min_drafts=9, max_drafts=8)


# -- pab -----------------------------------------------------------------------------------------
def test_pab_broadcasts_attention_by_its_interval_and_never_the_mlps(model: torch.nn.Module) -> None:
    _, summary = _run(model, 12, "pab", attention_interval=3, window_low=0.0, window_high=1.0)
    for key, unit in _units(summary).items():
        if key.endswith(".attn"):
            assert (unit.computed, unit.forecast) == (4, 8), key  # steps 0, 3, 6, 9 compute
        else:
            assert unit.forecast == 0, key


def test_pab_computes_everything_outside_its_window(model: torch.nn.Module) -> None:
    seen: dict[int, set[str]] = {}
    with sdk.compose("pab", window_low=0.25, window_high=0.65).apply(model) as handle:
        handle.add_observer(lambda ctx, step, key, how, out: seen.setdefault(step, set()).add(how))
        run_loop(model, flux_inputs(), steps=10)  # noise levels 1.0, 0.9, ..., 0.1
    forecast_steps = sorted(step for step, how in seen.items() if "forecast" in how)
    assert forecast_steps == [5, 7]  # inside [0.25, 0.65]: steps 4..7, the window starts at step 4


def test_pab_refuses_an_empty_window() -> None:
    with pytest.raises(sdk.InvalidParameterError, match="window_low must be < window_high"):
        sdk.compose("pab", window_low=0.8, window_high=0.2)


def test_easycache_on_a_model_whose_output_is_not_shaped_like_its_input_computes_and_says_why() -> None:
    """PixArt with a learned variance returns twice the input's channels: no transformation rate."""
    model = tiny_pixart(out_channels=8)
    inputs = pixart_inputs()
    with sdk.compose("easycache", warmup=1, tail=0, threshold=10.0).apply(model) as handle:
        with torch.no_grad():
            for level in (900.0, 800.0, 700.0, 600.0):
                model(**inputs, timestep=torch.tensor([level]))
    summary = handle.summary()
    assert summary.forecast_steps == 0 and summary.guarded_steps == 3
    assert any("shaped like its input" in note for note in summary.notes), summary.notes


def test_first_block_measures_the_change_since_the_last_computed_step() -> None:
    """Probe residuals 1, 1.06, 1.12 at threshold 0.08: 6% then 12% from step 0, though 5.7% step to step."""
    policy = sdk.get_policy("first_block")(sdk.get_policy("first_block").Config(warmup=1), sdk.get_basis("taylor")())
    ctx = ContextState("default", num_blocks=4)
    ctx.policy_state = policy.new_policy_state()
    decisions = []
    for step, scale in enumerate((1.0, 1.06, 1.12)):
        ctx.step = step
        ctx.full = False
        ctx.full = policy.plan_step(ctx, StepInfo("default", step, None, None, None, 1)) or ctx.full
        tokens = torch.zeros(1, 4, 2)
        policy.on_block(ctx, BlockView(0, 4, tokens, tokens + scale))
        decisions.append("full" if ctx.full else ctx.policy_state.decision)
    assert decisions == ["full", Decision.FORECAST, Decision.COMPUTE]
