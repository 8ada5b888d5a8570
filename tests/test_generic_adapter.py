"""The generic adapter: whole-block residual units on non-Flux diffusers transformers, chosen automatically."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import (
    flux_inputs,
    pixart_inputs,
    run_loop,
    sd3_inputs,
    tiny_flux,
    tiny_pixart,
    tiny_sd3,
    tiny_wan,
    wan_inputs,
)

import hicache_sdk as sdk
from hicache_sdk.errors import AdapterMismatchError
from hicache_sdk.testing.families import FAMILY_CASES

# name: (factory, inputs, timestep scale, block list attribute)
MODELS: dict[str, tuple[Callable[[], torch.nn.Module], Callable[..., dict[str, Any]], float, str]] = {
    "sd3": (tiny_sd3, sd3_inputs, 1000.0, "transformer_blocks"),
    "pixart": (tiny_pixart, pixart_inputs, 1000.0, "transformer_blocks"),
    "wan": (tiny_wan, wan_inputs, 1000.0, "blocks"),
}
STEPS = 8


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request: pytest.FixtureRequest) -> dict[str, Any]:
    make, make_inputs, scale, blocks = MODELS[request.param]
    model, inputs = make(), make_inputs(batch=2)
    return {
        "name": request.param,
        "model": model,
        "inputs": inputs,
        "scale": scale,
        "blocks": blocks,
        "reference": run_loop(model, inputs, steps=STEPS, scale=scale),
    }


def loop(case: dict[str, Any], steps: int = STEPS) -> torch.Tensor:
    return run_loop(case["model"], case["inputs"], steps=steps, scale=case["scale"])


@pytest.mark.parametrize("basis", ["taylor", "hermite", "newton"])
@pytest.mark.parametrize("policy", ["fora", "taylorseer"])
def test_interval_one_equals_no_cache_exactly(case: dict[str, Any], policy: str, basis: str) -> None:
    with sdk.compose(policy, basis=basis, interval=1, adapter="generic").apply(case["model"]) as handle:
        out = loop(case)
    assert torch.equal(out, case["reference"])
    summary = handle.summary()
    assert summary.adapter == "generic"
    assert (summary.full_steps, summary.forecast_steps) == (STEPS, 0)


def test_forced_on_a_family_with_its_own_adapter(case: dict[str, Any]) -> None:
    with sdk.compose("taylorseer", interval=3, warmup=1, max_order=2, adapter="generic").apply(case["model"]) as handle:
        out = loop(case)
    summary = handle.summary()
    assert torch.isfinite(out).all()
    assert not torch.equal(out, case["reference"])
    assert summary.adapter == "generic"
    assert any("whole-block residual units" in note for note in summary.notes)
    blocks = len(getattr(case["model"], case["blocks"]))
    assert [u.key for u in summary.units] == [f"{case['blocks']}.{i}" for i in range(blocks)]
    assert all((u.computed, u.forecast) == (3, 5) for u in summary.units)  # full at 0, 3, 6
    assert 0.0 < summary.flops_saved_fraction < 1.0


def test_forecast_steps_skip_whole_blocks_and_add_the_residual(case: dict[str, Any]) -> None:
    """FORA on the generic adapter: a forecast block runs nothing and returns input + the anchor's residual."""
    model = case["model"]
    block = getattr(model, case["blocks"])[0]
    signature = inspect.signature(type(block).forward)
    calls: list[tuple[dict[str, Any], tuple[torch.Tensor, ...]]] = []
    inner = [0]

    def on_output(module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        bound = signature.bind(module, *args, **kwargs).arguments
        calls.append((bound, (output,) if isinstance(output, torch.Tensor) else tuple(output)))
        inner.append(0)

    def count(module: torch.nn.Module, args: Any) -> None:
        inner[-1] += 1

    handles = [
        block.register_forward_hook(on_output, with_kwargs=True),
        *(m.register_forward_pre_hook(count) for m in block.modules() if m is not block),
    ]
    try:
        with sdk.compose("fora", interval=3, adapter="generic").apply(model):
            loop(case, steps=3)  # full, forecast, forecast
    finally:
        for h in handles:
            h.remove()
    assert inner[0] > 0 and inner[1:] == [0, 0, 0]  # submodules ran during the full step only
    names = ("encoder_hidden_states", "hidden_states") if case["name"] == "sd3" else ("hidden_states",)
    (anchor_in, anchor_out), *forecasts = calls
    for later_in, later_out in forecasts:
        for i, name in enumerate(names):
            expected = later_in[name] + (anchor_out[i] - anchor_in[name])
            assert torch.equal(later_out[i], expected), name


def test_sd3_context_pre_only_block_returns_none_on_forecasts() -> None:
    """SD3's last block returns (None, hidden_states); a forecast must too (regression)."""
    model, inputs = tiny_sd3(), sd3_inputs(batch=1)
    outputs: list[Any] = []
    last = model.transformer_blocks[-1]
    handle_hook = last.register_forward_hook(lambda m, a, out: outputs.append(out))
    try:
        with sdk.compose("taylorseer", interval=3, warmup=1, adapter="generic").apply(model) as handle:
            out = run_loop(model, inputs, steps=4, scale=1000.0)
    finally:
        handle_hook.remove()
    assert handle.summary().forecast_steps == 2
    assert torch.isfinite(out).all()
    assert all(o[0] is None and isinstance(o[1], torch.Tensor) for o in outputs)
    assert len(outputs) == 4


def test_generic_adapter_can_be_forced_on_flux() -> None:
    model, inputs = tiny_flux(), flux_inputs(batch=2)
    reference = run_loop(model, inputs, steps=4)
    with sdk.compose("taylorseer", interval=1, adapter="generic").apply(model) as handle:
        exact = run_loop(model, inputs, steps=4)
    assert torch.equal(exact, reference)
    summary = handle.summary()
    assert summary.adapter == "generic"
    assert not any("chosen automatically" in note for note in summary.notes)  # it was asked for
    assert len(summary.units) == 4  # 2 double-stream + 2 single-stream blocks, one residual unit each
    with sdk.compose("taylorseer", interval=3, adapter="generic").apply(model):
        assert torch.isfinite(run_loop(model, inputs, steps=5)).all()


def test_token_policies_need_a_token_adapter() -> None:
    with pytest.raises(AdapterMismatchError, match=r"policy 'clusca' recomputes units on chosen tokens.*'generic'"):
        sdk.compose("clusca", adapter="generic").apply(tiny_pixart())
    with pytest.raises(AdapterMismatchError, match="no token-wise units"):
        sdk.compose("clusca", adapter="generic").apply(tiny_flux())


class NoBlocks(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.transformer_blocks = torch.nn.ModuleList()  # empty lists do not count

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden_states)


class PairBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.proj(x), self.proj(y)


class PairModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([PairBlock()])

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        x, y = self.blocks[0](hidden_states, hidden_states)
        return x + y


def test_a_model_without_block_lists_is_a_clear_error() -> None:
    model = NoBlocks()
    x = torch.randn(1, 3, 4)
    expected = model(x)
    with pytest.raises(AdapterMismatchError, match=r"no registered adapter fits NoBlocks.*block lists"):
        sdk.compose("taylorseer").apply(model)
    with pytest.raises(AdapterMismatchError, match=r"NoBlocks has no non-empty block list"):
        sdk.compose("taylorseer", adapter="generic").apply(model)
    # the model that was refused is left as it was: nothing attached, and it can still be applied to
    assert not hasattr(model, "_hicache_handle")
    assert "forward" not in vars(model)
    assert torch.equal(model(x), expected)
    with pytest.raises(AdapterMismatchError, match=r"no registered adapter fits NoBlocks"):
        sdk.compose("fora").apply(model)  # refused for the same reason, not AlreadyAttachedError


def test_chosen_automatically_when_no_family_adapter_fits_and_the_summary_says_so() -> None:
    case = FAMILY_CASES["cogview4"]  # no built-in adapter for CogView4
    model = case.build()
    with sdk.compose("taylorseer", interval=3, warmup=1).apply(model) as handle:
        for step in range(4):
            model(**case.inputs(1, 1.0 - step / 4, 0))
    summary = handle.summary()
    assert summary.adapter == "generic"
    assert any("chosen automatically: no specific adapter fits" in note for note in summary.notes)
    assert "chosen automatically" in summary.table()
    assert summary.forecast_steps > 0


def test_an_unknown_block_output_layout_is_a_clear_error() -> None:
    model = PairModel()
    with sdk.compose("taylorseer").apply(model):
        with pytest.raises(AdapterMismatchError, match=r"2 outputs of PairBlock.*OUTPUT_LAYOUTS"):
            model(torch.randn(1, 3, 4), torch.ones(1))
    out = model(torch.randn(1, 3, 4), torch.ones(1))  # detached cleanly
    assert out.shape == (1, 3, 4)
