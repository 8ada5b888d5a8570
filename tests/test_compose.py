"""compose(): keyword routing and errors; apply(): the handle, detaching exactly, the summary."""

from __future__ import annotations

import inspect
import math
import types
from collections.abc import Callable
from typing import Any

import attrs
import pytest
import torch
from diffusers import FluxTransformer2DModel
from helpers import flux_inputs, run_loop, tiny_flux, tiny_pixart
from hicache_sdk.plugins.bases import HermiteBasis

import hicache_sdk as sdk
from hicache_sdk import hookimpl
from hicache_sdk.accelerator import Accelerator, CacheHandle
from hicache_sdk.adapter import Adapter, BlockBinding
from hicache_sdk.basis import Basis
from hicache_sdk.errors import (
    AdapterMismatchError,
    AlreadyAttachedError,
    InvalidParameterError,
    UnknownPluginError,
)
from hicache_sdk.runtime import Runtime
from hicache_sdk.summary import RunSummary, UnitSummary


@pytest.fixture(scope="module")
def model() -> FluxTransformer2DModel:
    return tiny_flux()


@pytest.fixture(scope="module")
def inputs() -> dict[str, Any]:
    return flux_inputs(batch=1, side=4)


def leftovers(model: FluxTransformer2DModel) -> list[str]:
    """Instance attributes an attachment may leave behind, on the model or any submodule."""
    found = []
    for name, module in model.named_modules():
        for attr in ("_diffusers_hook", "_hicache_handle", "forward"):
            if attr in vars(module):
                found.append(f"{name or '<model>'}.{attr}")
    return found


# -- routing ---------------------------------------------------------------------------------------
def test_keywords_go_to_the_policy_or_the_basis() -> None:
    acc = sdk.compose("taylorseer", basis="hermite", interval=7, warmup=3, max_order=2, sigma=0.4)
    assert isinstance(acc, Accelerator)
    assert (acc.config.interval, acc.config.warmup, acc.config.max_order) == (7, 3, 2)
    assert acc.basis == HermiteBasis(sigma=0.4)
    assert acc.tag == "taylorseer[hermite(sigma=0.4)](interval=7, warmup=3, schedule='reference', max_order=2)"


def test_defaults_are_the_policy_and_basis_defaults() -> None:
    acc = sdk.compose("clusca", basis="hermite")
    assert acc.config == sdk.get_policy("clusca").Config()
    assert acc.basis == HermiteBasis()
    assert (acc.adapter, acc.cache_dtype, acc.check_finite) == (None, None, True)
    assert sdk.compose("taylorseer").basis.name == "taylor"


def test_a_ready_basis_instance_is_used_as_is() -> None:
    basis = HermiteBasis(sigma=0.3)
    assert sdk.compose("fora", basis=basis).basis is basis
    with pytest.raises(
        InvalidParameterError,
        match=r"\['sigma'\] are parameters of basis 'hermite', which was given as an instance \(hermite\(sigma=0.3\)\)",
    ):
        sdk.compose("fora", basis=basis, sigma=0.5)


def test_accelerator_is_frozen() -> None:
    acc = sdk.compose("fora")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        acc.adapter = "flux"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: sdk.compose("taylorseer", intervall=7), r"no one takes \['intervall'\].*Did you mean 'interval'\?"),
        (lambda: sdk.compose("taylorseer", basis="hermite", sigm=0.3), r"Did you mean 'sigma'\?"),
        (lambda: sdk.compose("fora", max_order=2), r"no one takes \['max_order'\]: policy 'fora' takes \["),
        (
            lambda: sdk.compose("taylorseer", basis=3),  # type: ignore[arg-type]
            r"basis must be a registered name or a Basis instance, got 3",
        ),
        (lambda: sdk.compose("taylorseer", basis="hermite", sigma=1.5), r"sigma must be in \(0, 1\], got 1.5"),
        (lambda: sdk.compose("taylorseer", cache_dtype="fp9"), r"cache_dtype: unknown storage format 'fp9'"),
        (lambda: sdk.compose("taylorseer", cache_dtype="bf61"), r"Did you mean 'bf16'\?"),
        (lambda: sdk.compose("taylorseer", cache_dtype=torch.int8), r"cache_dtype: storage dtype must be one of"),
    ],
)
def test_bad_keywords_are_clear_errors(call: Callable[[], Any], match: str) -> None:
    with pytest.raises(InvalidParameterError, match=match):
        call()


@pytest.mark.parametrize(
    ("kwargs", "kind", "match"),
    [
        ({"policy": "taylorser"}, "policy", r"unknown policy 'taylorser'.*Did you mean 'taylorseer'\?"),
        ({"policy": "fora", "basis": "hermit"}, "basis", r"unknown basis 'hermit'.*Did you mean 'hermite'\?"),
        ({"policy": "fora", "adapter": "flx"}, "adapter", r"unknown adapter 'flx'.*Did you mean 'flux'\?"),
    ],
)
def test_unknown_names_fail_in_compose_with_did_you_mean(kwargs: dict[str, Any], kind: str, match: str) -> None:
    with pytest.raises(UnknownPluginError, match=match) as info:
        sdk.compose(**kwargs)
    assert info.value.kind == kind


@attrs.frozen(kw_only=True)
class IntervalBasis(Basis):
    """A basis with a parameter named like a policy field."""

    name = "interval_basis"
    interval: int = 1

    def _weights(self, offset: float, order: int, spacing: float) -> tuple[float, ...]:
        return (1.0,) + (0.0,) * order


def test_a_keyword_both_sides_take_is_an_error(fresh_registry: Any) -> None:
    @hookimpl
    def hicache_register_bases(register: Callable[[Any], None]) -> None:
        register(IntervalBasis)

    sdk.register_plugin(types.SimpleNamespace(hicache_register_bases=hicache_register_bases), "interval-plugin")
    with pytest.raises(InvalidParameterError, match=r"\['interval'\] are parameters of both"):
        sdk.compose("taylorseer", basis="interval_basis", interval=3)
    acc = sdk.compose("taylorseer", basis=IntervalBasis(interval=2), interval=3)
    assert (acc.config.interval, acc.basis.interval) == (3, 2)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("value", "dtype"), [("bf16", torch.bfloat16), ("float16", torch.float16), (torch.float32, torch.float32)]
)
def test_cache_dtype_names(value: Any, dtype: torch.dtype) -> None:
    assert sdk.compose("taylorseer", cache_dtype=value).cache_dtype == dtype


def test_bf16_storage_halves_the_cache_and_stays_close(model: FluxTransformer2DModel, inputs: dict[str, Any]) -> None:
    reference = run_loop(model, inputs, steps=8)  # no cache
    results = {}
    for dtype in (None, "bf16"):
        with sdk.compose("taylorseer", interval=3, max_order=2, cache_dtype=dtype).apply(model) as handle:
            results[dtype] = (run_loop(model, inputs, steps=8), handle.summary().cache_bytes)
    (full, full_bytes), (half, half_bytes) = results[None], results["bf16"]
    assert half.dtype == torch.float32  # forecasts come back in the model's dtype
    assert half_bytes * 2 == full_bytes
    # The bf16 ladders round each stored term to 8 significant bits; the forecasts still sum in float32.
    # Budget: one bf16 spacing (2^-8) at the output's scale, 0.0063 here. Observed: bf16 storage moves
    # the output by 0.0010 from the fp32-storage run (6x inside the budget), caching itself moves it by
    # 0.037 from the uncached run (6x outside it).
    scale = float(full.abs().max())
    budget = 2.0**-8 * scale
    bf16_effect = float((half - full).abs().max())
    assert 2.0**-16 * scale < bf16_effect <= budget  # really stored in bf16 (not fp32), and only rounded
    # still a cached run: at least 4 budgets from the uncached output (observed 0.036, 1.45x this bound);
    # an uncached run is 0 away from it and 0.037 away from the fp32-storage run, outside the budget above
    assert float((half - reference).abs().max()) >= 4 * budget


# -- apply, the handle, detaching ------------------------------------------------------------------
def test_apply_returns_a_handle_and_remove_restores_the_model_exactly(
    model: FluxTransformer2DModel, inputs: dict[str, Any]
) -> None:
    signature = inspect.signature(model.forward)
    block_signature = inspect.signature(model.transformer_blocks[0].forward)
    reference = run_loop(model, inputs, steps=6)
    handle = sdk.compose("clusca", basis="hermite", interval=3, num_clusters=4).apply(model)
    assert isinstance(handle, CacheHandle) and handle.attached
    assert inspect.signature(model.forward) == signature  # the wrapper keeps the real signature
    assert inspect.signature(model.transformer_blocks[0].forward) == block_signature
    cached = run_loop(model, inputs, steps=6)
    assert not torch.equal(cached, reference)
    handle.remove()
    assert not handle.attached
    assert leftovers(model) == []
    assert inspect.signature(model.forward) == signature
    assert inspect.signature(model.transformer_blocks[0].forward) == block_signature
    assert torch.equal(run_loop(model, inputs, steps=6), reference)
    handle.remove()  # idempotent
    assert handle.summary().steps == 6  # the last generation stays readable


def test_with_block_detaches_also_on_error(model: FluxTransformer2DModel, inputs: dict[str, Any]) -> None:
    with pytest.raises(ZeroDivisionError), sdk.compose("taylorseer").apply(model) as handle:
        run_loop(model, inputs, steps=2)
        _ = 1 / 0
    assert not handle.attached
    assert leftovers(model) == []


def test_applying_twice_is_a_clear_error(model: FluxTransformer2DModel) -> None:
    acc = sdk.compose("taylorseer")
    with acc.apply(model):
        with pytest.raises(AlreadyAttachedError, match=r"already attached.*call .remove\(\)"):
            acc.apply(model)
        with pytest.raises(AlreadyAttachedError):
            sdk.compose("fora").apply(model)
    with acc.apply(model) as again:  # after removal it attaches again
        assert again.attached


def test_one_accelerator_serves_several_models(inputs: dict[str, Any]) -> None:
    first, second = tiny_flux(seed=1), tiny_flux(seed=2)
    acc = sdk.compose("taylorseer", interval=3)
    with acc.apply(first) as one, acc.apply(second) as two:
        run_loop(first, inputs, steps=4)
        run_loop(second, inputs, steps=5)
    assert (one.summary().steps, two.summary().steps) == (4, 5)


def test_apply_takes_a_pipeline_or_a_transformer() -> None:
    model = tiny_flux()
    pipeline_like = types.SimpleNamespace(transformer=model)
    with sdk.compose("fora").apply(pipeline_like) as handle:
        assert handle.model is model
    with pytest.raises(AdapterMismatchError, match="expected a diffusers pipeline with a `transformer`"):
        sdk.compose("fora").apply(object())


def test_a_forced_adapter_must_fit() -> None:
    with pytest.raises(AdapterMismatchError, match=r"the flux adapter needs a FluxTransformer2DModel.*PixArt"):
        sdk.compose("fora", adapter="flux").apply(tiny_pixart())


class BrokenAdapter(Adapter):
    """Binds the first block, then fails: apply must leave the model untouched."""

    name = "broken"
    priority = 1000

    @classmethod
    def fits(cls, model: FluxTransformer2DModel) -> bool:
        return hasattr(model, "transformer_blocks")

    def bindings(self, runtime: Runtime) -> list[BlockBinding]:
        model: Any = self.model
        block = model.transformer_blocks[0]
        return [BlockBinding("ok", block, lambda b, original, *a, **k: original(*a, **k)), "not a binding"]  # type: ignore[list-item]


def test_a_failing_attachment_leaves_the_model_clean(fresh_registry: Any, inputs: dict[str, Any]) -> None:
    @hookimpl
    def hicache_register_adapters(register: Callable[[Any], None]) -> None:
        register(BrokenAdapter)

    sdk.register_plugin(types.SimpleNamespace(hicache_register_adapters=hicache_register_adapters), "broken-plugin")
    model = tiny_flux()
    reference = run_loop(model, inputs, steps=2)
    with pytest.raises(AttributeError):
        sdk.compose("fora").apply(model)
    assert leftovers(model) == []
    assert torch.equal(run_loop(model, inputs, steps=2), reference)


# -- the summary -----------------------------------------------------------------------------------
def test_summary_is_typed_and_prints_as_a_table(model: FluxTransformer2DModel, inputs: dict[str, Any]) -> None:
    with sdk.compose("taylorseer", basis="hermite", interval=3, warmup=1).apply(model) as handle:
        run_loop(model, inputs, steps=7)
        summary = handle.summary()
    assert isinstance(summary, RunSummary)
    assert all(isinstance(u, UnitSummary) for u in summary.units)
    assert (summary.steps, summary.full_steps, summary.forecast_steps) == (7, 3, 4)
    assert summary.contexts == ("default",)
    assert summary.policy.startswith("taylorseer[hermite(sigma=0.5)](interval=3, warmup=1")
    assert (summary.basis, summary.adapter, summary.fallbacks) == ("hermite(sigma=0.5)", "flux", 0)
    assert all((u.computed, u.forecast, u.partial, u.fallbacks) == (3, 4, 0, 0) for u in summary.units)
    assert isinstance(summary.cache_bytes, int) and summary.cache_bytes > 0
    assert 0.0 < summary.flops_saved_fraction < 1.0
    assert summary.flops_speedup == pytest.approx(1.0 / (1.0 - summary.flops_saved_fraction))
    text = str(summary)
    assert text == summary.table()
    for line in (
        "steps    7 (3 full, 4 forecast)",
        "adapter  flux",
        "fallbacks 0",
        "contexts default",
        "guarded  0 steps, rejected 0 drafts",
    ):
        assert line in text
    assert f"FLOPs    {summary.flops_saved_fraction:.1%} saved" in text
    rows = [line.split() for line in text.splitlines() if line.startswith("transformer_blocks.0.")]
    assert rows == [
        [key, "3", "4", "0", "0", "0"]  # computed, forecast, partial, fallbacks, verified
        for key in ("transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context")
    ]


def test_summary_before_any_step_is_empty(model: FluxTransformer2DModel) -> None:
    with sdk.compose("fora").apply(model) as handle:
        summary = handle.summary()
    assert (summary.steps, summary.units, summary.cache_bytes, summary.fallbacks) == (0, (), 0, 0)
    assert math.isnan(summary.flops_saved_fraction)
    assert "steps    0" in summary.table()
