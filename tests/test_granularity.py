"""Unit granularities (``compose(..., units=...)``): block residuals, block ranges and the model output.

Tiny random-weight models check exactness, call counts and refusals; the embedded trained model checks
that the coarser units forecast (and what they hold).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import CallCounter, flux_inputs, flux_modules, run_loop, tiny_flux

import hicache_sdk as sdk
from hicache_sdk.errors import AdapterMismatchError, InvalidParameterError
from hicache_sdk.granularity import Granularity, parse_units
from hicache_sdk.models import DigitsModel, load_digits_model, sample
from hicache_sdk.testing.families import FAMILY_CASES

UNITS = ("modules", "block", "range", "range[1:3]", "range[:]", "output")
STEPS = 8


@pytest.fixture(scope="module")
def digits() -> DigitsModel:
    return load_digits_model()


def _cached(model: torch.nn.Module, inputs: dict[str, Any], steps: int = STEPS, **params: Any) -> tuple[Any, Any]:
    with sdk.compose("taylorseer", **params).apply(model) as handle:
        out = run_loop(model, inputs, steps=steps)
        return out, handle.summary()


# -- parsing -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("modules", Granularity("modules")),
        ("Block", Granularity("block")),
        ("range", Granularity("range")),
        ("range[1:-1]", Granularity("range", 1, -1)),
        ("range[:4]", Granularity("range", 0, 4)),
        ("range[:]", Granularity("range", 0, None)),
        ("range[ 2 : ]", Granularity("range", 2, None)),
        ("output", Granularity("output")),
    ],
)
def test_units_names_parse(text: str, expected: Granularity) -> None:
    assert parse_units(text) == expected


@pytest.mark.parametrize("bad", ["blocks", "range[1]", "range[a:b]", "", 3, None])
def test_unknown_units_are_refused_naming_the_choices(bad: Any) -> None:
    with pytest.raises(InvalidParameterError, match=r"units must be one of \['modules', 'block', 'range', 'output'\]"):
        sdk.compose("taylorseer", units=bad)


def test_a_range_without_blocks_is_refused_at_apply() -> None:
    model = tiny_flux()
    with pytest.raises(InvalidParameterError, match=r"units='range\[3:3\]' selects no block of the 4"):
        sdk.compose("taylorseer", units="range[3:3]").apply(model)
    assert not hasattr(model, "_diffusers_hook")  # nothing left attached


# -- exactness and work ----------------------------------------------------------------------------
@pytest.mark.parametrize("units", UNITS)
def test_every_granularity_is_exact_when_nothing_is_forecast(units: str) -> None:
    model, inputs = tiny_flux(), flux_inputs(batch=2)
    reference = run_loop(model, inputs, steps=4)
    out, summary = _cached(model, inputs, steps=4, interval=1, units=units)
    assert torch.equal(out, reference)
    assert summary.granularity == units and summary.forecast_steps == 0


@pytest.mark.parametrize("units", UNITS)
def test_granularities_forecast_and_restore_the_model(units: str) -> None:
    model, inputs = tiny_flux(), flux_inputs(batch=2)
    reference = run_loop(model, inputs, steps=STEPS)
    out, summary = _cached(model, inputs, interval=3, warmup=1, max_order=1, units=units)
    assert summary.forecast_steps > 0 and summary.flops_speedup > 1.0
    assert not torch.equal(out, reference)  # forecasts were served
    assert torch.isfinite(out).all()
    assert torch.equal(run_loop(model, inputs, steps=STEPS), reference)  # removed: the model is as before


def test_unit_keys_follow_the_granularity() -> None:
    model, inputs = tiny_flux(), flux_inputs()
    keys = {units: [u.key for u in _cached(model, inputs, interval=3, units=units)[1].units] for units in UNITS}
    assert keys["block"] == [
        "transformer_blocks.0",
        "transformer_blocks.1",
        "single_transformer_blocks.0",
        "single_transformer_blocks.1",
    ]
    assert keys["range"] == [
        "transformer_blocks.0..transformer_blocks.1",
        "single_transformer_blocks.0..single_transformer_blocks.1",
    ]
    assert keys["range[1:3]"] == ["transformer_blocks.1..single_transformer_blocks.0"]
    assert keys["output"] == ["output"]
    assert all(k.rsplit(".", 1)[-1] in ("attn", "ff", "ff_context", "proj_out") for k in keys["modules"])


@pytest.mark.parametrize(
    ("units", "skipped"),
    [
        (
            "block",
            {
                "transformer_blocks.0",
                "transformer_blocks.1",
                "single_transformer_blocks.0",
                "single_transformer_blocks.1",
            },
        ),
        ("range[1:3]", {"transformer_blocks.1", "single_transformer_blocks.0"}),
        (
            "output",
            {
                "transformer_blocks.0",
                "transformer_blocks.1",
                "single_transformer_blocks.0",
                "single_transformer_blocks.1",
            },
        ),
    ],
)
def test_forecast_steps_run_nothing_of_the_coarse_units(units: str, skipped: set[str]) -> None:
    model, inputs = tiny_flux(), flux_inputs()
    counter = CallCounter(flux_modules(model))
    per_step: list[dict[str, int]] = []
    forecast_steps: set[int] = set()

    def on_step(step: int) -> None:
        if step:
            per_step.append(dict(counter.calls))
        counter.reset()

    with sdk.compose("taylorseer", interval=3, warmup=1, units=units).apply(model) as handle, counter.counting():
        handle.add_observer(
            lambda ctx, step, key, how, outputs: forecast_steps.add(step) if how == "forecast" else None
        )
        run_loop(model, inputs, steps=STEPS, on_step=on_step)
        per_step.append(dict(counter.calls))
    assert forecast_steps and len(per_step) == STEPS
    for step, calls in enumerate(per_step):
        for name, count in calls.items():
            block = name.rsplit(".", 1)[0]
            expected = 0 if step in forecast_steps and block in skipped else 1
            assert count == expected, (units, step, name, count)


def test_range_equals_block_residuals_for_an_interval_policy(digits: DigitsModel) -> None:
    """Every block is forecast together: the sum of the blocks' linear forecasts is the range's forecast."""
    outs = {}
    for units in ("block", "range"):
        with sdk.compose("taylorseer", interval=4, warmup=2, max_order=2, units=units).apply(digits.transformer):
            outs[units] = sample(digits, [3, 8], [0, 0], steps=24)
    torch.testing.assert_close(outs["range"], outs["block"], rtol=1e-4, atol=1e-5)


def test_coarser_units_hold_less_on_the_trained_model(digits: DigitsModel) -> None:
    held = {}
    for units in ("modules", "block", "range", "output"):
        with sdk.compose("taylorseer", interval=7, warmup=3, max_order=2, units=units).apply(digits.transformer) as h:
            sample(digits, [1, 2], [0, 0], steps=20)
            held[units] = h.summary().peak_cache_bytes
    assert held["modules"] > held["block"] > held["range"] > held["output"] > 0


@pytest.mark.parametrize("return_dict", [True, False])
def test_output_unit_keeps_the_forward_return_type(return_dict: bool) -> None:
    model, inputs = tiny_flux(), flux_inputs()
    with sdk.compose("fora", interval=2, units="output").apply(model) as handle:
        results = [model(**inputs, timestep=torch.tensor([1.0 - s / 4]), return_dict=return_dict) for s in range(4)]
        assert handle.summary().forecast_steps == 2
    for result in results:
        if return_dict:
            assert type(result).__name__ == "Transformer2DModelOutput" and result.sample.shape == (1, 16, 16)
        else:
            assert isinstance(result, tuple) and len(result) == 1 and result[0].shape == (1, 16, 16)
    first = results[0].sample if return_dict else results[0][0]
    second = results[1].sample if return_dict else results[1][0]
    assert torch.equal(second, first)  # FORA reuses the output itself


# -- models whose blocks are changed between calls ---------------------------------------------------
def test_range_refuses_a_model_that_changes_tokens_between_blocks() -> None:
    model, inputs = tiny_flux(), flux_inputs()
    residuals = [torch.full((1, 16, 16), 0.1)]
    with sdk.compose("taylorseer", interval=3, units="range").apply(model):
        with pytest.raises(AdapterMismatchError, match=r"changed before transformer_blocks\.1.*units='block'"):
            model(**inputs, timestep=torch.tensor([1.0]), controlnet_block_samples=residuals)
    with sdk.compose("taylorseer", interval=3, units="block").apply(model) as handle:  # blocks serve it
        for s in range(4):
            model(**inputs, timestep=torch.tensor([1.0 - s / 4]), controlnet_block_samples=residuals)
        assert handle.summary().forecast_steps > 0


# -- policies that cannot serve coarse units --------------------------------------------------------
@pytest.mark.parametrize(
    ("policy", "units", "error", "match"),
    [
        ("first_block", "range", InvalidParameterError, r"'first_block' watches blocks.*units='range'"),
        ("first_block", "output", InvalidParameterError, r"'first_block' watches blocks.*units='output'"),
        ("clusca", "output", AdapterMismatchError, r"'clusca' recomputes units on chosen tokens; units='output'"),
        ("first_block", "range[1:]", InvalidParameterError, r"'first_block' watches blocks"),
        ("clusca", "block", AdapterMismatchError, r"'clusca' recomputes units on chosen tokens; units='block'"),
        ("pab", "range", InvalidParameterError, r"'pab' broadcasts units by kind"),
        ("speca", "output", InvalidParameterError, r"'speca' verifies a draft on one late block"),
    ],
)
def test_policies_refuse_units_they_cannot_serve(policy: str, units: str, error: type, match: str) -> None:
    model = tiny_flux()
    with pytest.raises(error, match=match):
        sdk.compose(policy, units=units).apply(model)
    assert not hasattr(model, "_diffusers_hook")


def test_per_sample_decisions_need_adapter_units() -> None:
    with pytest.raises(AdapterMismatchError, match=r"per_sample=True; units='block' cannot run on a sub-batch"):
        sdk.compose("first_block", per_sample=True, units="block").apply(tiny_flux())


@pytest.mark.parametrize("policy", ["first_block", "pab", "speca", "easycache", "fora"])
def test_dynamic_policies_run_on_block_units(policy: str) -> None:
    model, inputs = tiny_flux(), flux_inputs(batch=2)
    with sdk.compose(policy, units="block").apply(model) as handle:
        out = run_loop(model, inputs, steps=STEPS)
        assert torch.isfinite(out).all()
        assert handle.summary().steps == STEPS


# -- every family -------------------------------------------------------------------------------------
#: (family, units) the family's adapter refuses when applied, and the error the first step gives without it
REFUSED = {
    ("hidream", "range"): r"adapter 'hidream' serves .* not 'range': each block takes its own text embeddings",
    ("zimage", "output"): r"adapter 'zimage' serves .* not 'output': its forward returns a list of tensors",
}
FIRST_STEP = {
    ("hidream", "range"): r"'encoder_hidden_states' changed before double_stream_blocks\.1",
    ("zimage", "output"): r"caches the model's one output tensor; this forward returned a tuple of list",
}


@pytest.mark.parametrize(("family", "units"), sorted(REFUSED))
def test_families_refuse_the_granularities_they_cannot_serve(family: str, units: str) -> None:
    """What every family serves exactly is the adapter contract's "lighter units" rule; here what two refuse."""
    case = FAMILY_CASES[family]
    model = case.build()
    with pytest.raises(AdapterMismatchError, match=REFUSED[family, units]):  # declared: refused when applied
        sdk.compose("taylorseer", interval=1, units=units).apply(model)
    with sdk.compose("taylorseer", interval=1, units=units, adapter="generic").apply(model):
        with pytest.raises(AdapterMismatchError, match=FIRST_STEP[family, units]):
            model(**case.inputs(2, 1.0, 0))  # the generic adapter does not know: the first step finds out


def test_policy_settings_are_checked_against_the_model_for_every_granularity() -> None:
    for units in ("modules", "block"):
        with pytest.raises(InvalidParameterError, match=r"verify_block"):
            sdk.compose("speca", verify_block=99, units=units).apply(tiny_flux())


@pytest.mark.parametrize("bad", ["range[-:3]", "range[-:-]", "range[1:-]"])
def test_a_lone_minus_is_not_a_range_bound(bad: str) -> None:
    with pytest.raises(InvalidParameterError, match=r"units must be one of"):
        parse_units(bad)
