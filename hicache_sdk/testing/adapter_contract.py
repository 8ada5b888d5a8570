"""The adapter contract: what every model adapter must satisfy, on a tiny model of its family.

Each ``check_adapter_*`` function takes an adapter (its registered name, or its class) and a
:class:`~hicache_sdk.testing.ModelCase` (a tiny random-weight model of the family and the
arguments of one denoising step), runs a few steps of decreasing noise level, and raises
:class:`AssertionError` with a message that starts with the rule's name; it returns ``None``
otherwise. They need neither pytest nor a GPU.

The rules:

1. selected: when no adapter is named, the adapter is chosen for the case's model (if the case's
   ``family`` is the adapter's name), and it refuses a model of another family with
   :class:`~hicache_sdk.AdapterMismatchError`;
2. exact at interval 1: a policy that computes every step gives outputs bit for bit equal to
   the model without cache, in float32 and bfloat16, at batch 2;
3. skips what it forecasts: on every step where a unit is forecast, the modules under that unit
   (a unit key that names a submodule of the model, e.g. ``transformer_blocks.0.attn``) do not
   run, counted by forward pre-hooks on their leaf modules; a computed unit runs them;
4. FLOPs: the summary's ``flops_saved_fraction`` equals ``1 - cached / uncached`` FLOPs counted
   independently by ``FlopCounterMode``;
5. remove() restores: after :meth:`~hicache_sdk.CacheHandle.remove` the model has no hook left,
   unchanged weights and the uncached outputs bit for bit;
6. contexts isolated: with ``cache_context("cond")`` and ``("uncond")`` calls alternating, each
   context's outputs equal a run of that context alone;
7. batches: at batch 2, a policy that computes sample 0 and forecasts the others (only for
   adapters with ``provides_batch_split``) gives sample 0 the uncached outputs and sample 1 the
   outputs of the run that forecasts every sample, to rounding; bfloat16 forecasts stay finite;
8. lighter units: for every ``units=`` the adapter declares in ``granularities`` (``"block"``,
   ``"range"``, ``"output"``, see :mod:`hicache_sdk.granularity`), computing every step gives the
   uncached outputs bit for bit and a forecasting policy forecasts; one it does not declare is
   refused with :class:`~hicache_sdk.AdapterMismatchError` when applied.

Use :func:`check_adapter_contract` for all of them, or mix :class:`AdapterContract` into a pytest
class that provides ``adapter``, ``case`` and ``other_case`` fixtures.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from diffusers.hooks.hooks import CacheContext, _set_cache_context

from ..accelerator import Accelerator, CacheHandle, compose
from ..adapter import Adapter
from ..decision import Decision, UnitDecision
from ..errors import AdapterMismatchError
from ..flops import flop_counter_mode
from ..granularity import GRANULARITIES
from ..policy import Policy
from ..registry import get_registry
from ..state import ContextState, UnitState
from .model_case import ModelCase, cast_floating

__all__ = [
    "AdapterContract",
    "AdapterLike",
    "check_adapter_batches",
    "check_adapter_contexts_isolated",
    "check_adapter_contract",
    "check_adapter_exact_at_interval_one",
    "check_adapter_flops",
    "check_adapter_lighter_units",
    "check_adapter_remove_restores",
    "check_adapter_selected",
    "check_adapter_skips_forecast_modules",
]

#: An adapter as the checks take it: its registered name or its class.
AdapterLike = str | type[Adapter]

_STEPS = 6
_CACHING: dict[str, Any] = {"interval": 2, "warmup": 1}  # taylorseer: steps 0, 2, 4 compute; 1, 3, 5 forecast
_ROW_RTOL = 1e-4  # a sample computed on a sub-batch and in the whole batch agree to this share of the scale
_FLOPS_RTOL = 1e-9


def _require(condition: bool, message: str) -> None:
    if not condition:  # not `assert`: the contract must also hold under `python -O`
        raise AssertionError(message)


def _adapter_class(adapter: AdapterLike) -> type[Adapter]:
    if isinstance(adapter, str):
        cls: type[Adapter] = get_registry().get("adapter", adapter).obj
        return cls
    if isinstance(adapter, type) and issubclass(adapter, Adapter):
        return adapter
    raise TypeError(f"adapter must be a registered adapter name or an Adapter subclass, got {adapter!r}")


def _accelerator(adapter: type[Adapter], policy: str = "taylorseer", **params: Any) -> Accelerator:
    registered = get_registry().entries("adapter").get(adapter.name)
    if registered is not None and registered.obj is adapter:
        return compose(policy, adapter=adapter.name, **params)
    return compose(policy, **params)  # an unregistered class: attached by _attach below


def _attach(adapter: type[Adapter], accelerator: Accelerator, model: torch.nn.Module) -> CacheHandle:
    """Attach ``accelerator`` with ``adapter`` (registered or not) to ``model``."""
    if accelerator.adapter is not None:
        return accelerator.apply(model)
    with _only_adapter(adapter):
        return accelerator.apply(model)


@contextmanager
def _only_adapter(adapter: type[Adapter]) -> Iterator[None]:
    """Make the registry choose ``adapter`` (an unregistered class) for the next apply."""
    registry = get_registry()
    original = registry.select_adapter
    registry.select_adapter = lambda model: adapter  # type: ignore[method-assign]
    try:
        yield
    finally:
        registry.select_adapter = original  # type: ignore[method-assign]


def _model(case: ModelCase, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    model = case.build()
    if dtype != torch.float32:
        logger = logging.getLogger("diffusers.models.modeling_utils")
        level = logger.level
        logger.setLevel(logging.ERROR)  # the warning on modules kept in float32 by from_pretrained
        try:
            model = model.to(dtype)
        finally:
            logger.setLevel(level)
    return model


@contextmanager
def _context(model: torch.nn.Module, name: str | None) -> Iterator[None]:
    """Run calls in cache context ``name`` (what a pipeline's ``transformer.cache_context`` does)."""
    if name is None:
        yield
        return
    _set_cache_context(model, CacheContext(name))
    try:
        yield
    finally:
        _set_cache_context(model, None)


def _generate(
    case: ModelCase,
    model: torch.nn.Module,
    *,
    batch: int = 2,
    dtype: torch.dtype = torch.float32,
    contexts: Sequence[str | None] = (None,),
    steps: int = _STEPS,
    handle: CacheHandle | None = None,
) -> dict[str | None, list[torch.Tensor]]:
    """Outputs of one generation per context (contexts alternate at each step; seeds differ by context)."""
    outputs: dict[str | None, list[torch.Tensor]] = {c: [] for c in contexts}
    if handle is not None:
        handle.reset(num_steps=steps)
    with torch.no_grad():
        for step in range(steps):
            sigma = 1.0 - step / steps
            for seed, context in enumerate(contexts):
                inputs = cast_floating(case.inputs(batch, sigma, seed), dtype)
                with _context(model, context):
                    result = model(**inputs)
                outputs[context].append(case.output(result).detach().clone())
    return outputs


def _same(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> int | None:
    """The first step whose outputs differ (bit for bit), or ``None``."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if not torch.equal(x, y)), None)


def check_adapter_selected(adapter: AdapterLike, case: ModelCase, other: ModelCase | None = None) -> None:
    """Chosen automatically for its family's model; a model of another family is refused by name."""
    cls = _adapter_class(adapter)
    model = _model(case)
    if case.family == cls.name:
        with compose("fora", interval=1).apply(model) as handle:
            _require(
                handle.adapter.name == cls.name,
                f"selected: {type(model).__name__} got adapter {handle.adapter.name!r}, expected {cls.name!r}",
            )
    _require(cls.fits(model), f"selected: adapter {cls.name!r} does not fit its own case's {type(model).__name__}")
    if other is not None:
        stranger = _model(other)
        _require(not cls.fits(stranger), f"selected: adapter {cls.name!r} claims to fit {type(stranger).__name__}")
        try:
            cls(stranger)
        except AdapterMismatchError:
            pass
        else:
            raise AssertionError(
                f"selected: adapter {cls.name!r} accepted a {type(stranger).__name__} without AdapterMismatchError"
            )


def check_adapter_exact_at_interval_one(adapter: AdapterLike, case: ModelCase) -> None:
    """Computing every step gives the uncached outputs bit for bit, in float32 and bfloat16, at batch 2."""
    cls = _adapter_class(adapter)
    for dtype in (torch.float32, torch.bfloat16):
        model = _model(case, dtype)
        reference = _generate(case, model, dtype=dtype)[None]
        with _attach(cls, _accelerator(cls, "fora", interval=1), model) as handle:
            cached = _generate(case, model, dtype=dtype, handle=handle)[None]
            summary = handle.summary()
        step = _same(reference, cached)
        _require(step is None, f"exact at interval 1: {cls.name} in {dtype} differs from no cache at step {step}")
        _require(summary.forecast_steps == 0, f"exact at interval 1: {cls.name} forecast at interval 1")


def _leaves(module: torch.nn.Module) -> list[torch.nn.Module]:
    children = [m for m in module.modules() if not list(m.children())]
    return children or [module]


def check_adapter_skips_forecast_modules(adapter: AdapterLike, case: ModelCase) -> None:
    """The modules under a forecast unit do not run at that step; a computed unit runs them."""
    cls = _adapter_class(adapter)
    model = _model(case)
    runs: dict[str, int] = {}
    removers = []
    events: dict[str, int] = {"forecast": 0, "computed": 0}
    violations: list[str] = []

    def counter(key: str) -> Any:
        def hook(module: torch.nn.Module, args: Any) -> None:
            runs[key] = runs.get(key, 0) + 1

        return hook

    def observe(context: str, step: int, key: str, how: str, outputs: Any) -> None:
        if key not in runs:
            return
        ran, runs[key] = runs[key], 0
        events[how] = events.get(how, 0) + 1
        if how == "forecast" and ran:
            violations.append(f"{key} ran {ran} module calls at forecast step {step}")
        if how == "computed" and not ran:
            violations.append(f"{key} was counted computed at step {step} but none of its modules ran")

    with _attach(cls, _accelerator(cls, **_CACHING), model) as handle:
        named = dict(model.named_modules())
        for state_key in _unit_keys(handle, case, model):
            if state_key in named:
                runs[state_key] = 0
                removers += [leaf.register_forward_pre_hook(counter(state_key)) for leaf in _leaves(named[state_key])]
        remove_observer = handle.add_observer(observe)
        _generate(case, model, handle=handle)
        remove_observer()
    for remover in removers:
        remover.remove()
    _require(bool(runs), f"skips: no unit key of {cls.name} names a submodule of {type(model).__name__}")
    _require(events["forecast"] > 0, f"skips: {cls.name} forecast no unit in {_STEPS} steps at {_CACHING}")
    _require(not violations, "skips: " + "; ".join(violations[:5]))


def _unit_keys(handle: CacheHandle, case: ModelCase, model: torch.nn.Module) -> list[str]:
    """The unit keys of ``handle``'s adapter on ``model`` (from one uncached-schedule step)."""
    with torch.no_grad():
        model(**case.inputs(1, 1.0, 0))
    keys = [key for ctx in handle.runtime.contexts.values() for key in ctx.units]
    handle.reset()
    return keys


def check_adapter_flops(adapter: AdapterLike, case: ModelCase) -> None:
    """``flops_saved_fraction`` equals the saving FlopCounterMode counts."""
    cls = _adapter_class(adapter)
    model = _model(case)
    with torch.no_grad(), flop_counter_mode() as counter:
        model(**case.inputs(2, 1.0, 0))
    uncached = float(counter.get_total_flops()) * _STEPS
    with _attach(cls, _accelerator(cls, **_CACHING), model) as handle:
        _generate(case, model, handle=handle, steps=1)  # FLOPs are measured on a first full step
        with flop_counter_mode() as counter:
            _generate(case, model, handle=handle)
        summary = handle.summary()
    cached = float(counter.get_total_flops())
    _require(summary.forecast_steps > 0, f"flops: {cls.name} forecast nothing")
    fraction = summary.flops_saved_fraction
    expected = 1.0 - cached / uncached
    _require(
        fraction is not None and abs(fraction - expected) <= _FLOPS_RTOL * max(1.0, abs(expected)),
        f"flops: {cls.name} summary says {fraction!r} saved, FlopCounterMode counted {expected!r}",
    )


def check_adapter_remove_restores(adapter: AdapterLike, case: ModelCase) -> None:
    """After remove() the model has no hook, the same weights and the uncached outputs bit for bit."""
    cls = _adapter_class(adapter)
    model = _model(case)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    reference = _generate(case, model)[None]
    handle = _attach(cls, _accelerator(cls, **_CACHING), model)
    _generate(case, model, handle=handle, steps=_STEPS - 2)  # removed in mid-generation
    handle.remove()
    left = [name or "<model>" for name, m in model.named_modules() if hasattr(m, "_diffusers_hook")]
    _require(not left, f"remove restores: hooks left on {left[:3]}")
    patched = [name or "<model>" for name, m in model.named_modules() if "forward" in vars(m)]
    _require(not patched, f"remove restores: instance forwards left on {patched[:3]}")
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, weights[k])]
    _require(not changed, f"remove restores: weights changed: {changed[:3]}")
    step = _same(reference, _generate(case, model)[None])
    _require(step is None, f"remove restores: {cls.name} outputs differ from the pristine model at step {step}")


def check_adapter_contexts_isolated(adapter: AdapterLike, case: ModelCase) -> None:
    """Alternating ``cond`` / ``uncond`` contexts give each the outputs of a run of that context alone."""
    cls = _adapter_class(adapter)
    model = _model(case)
    accelerator = _accelerator(cls, **_CACHING)
    with _attach(cls, accelerator, model) as handle:
        both = _generate(case, model, contexts=("cond", "uncond"), handle=handle)
    for seed, context in enumerate(("cond", "uncond")):
        alone_contexts: tuple[str | None, ...] = ("cond",) if seed == 0 else ("skip", "uncond")
        with _attach(cls, accelerator, model) as handle:
            alone = _generate(case, model, contexts=alone_contexts, handle=handle)[context]
        step = _same(both[context], alone)
        _require(step is None, f"contexts isolated: {cls.name} context {context!r} differs from alone at step {step}")


class _FirstSampleComputes(Policy):
    """Test policy: at forecast steps of the interval schedule, sample 0 computes and the others forecast."""

    name = "first_sample_computes"
    needs_batch_split = True

    def decide(self, ctx: ContextState, unit: UnitState) -> UnitDecision:
        batch = unit.layout[0][0][0]
        mask = torch.zeros(batch, dtype=torch.bool, device=unit.layout[0][2])
        mask[0] = True
        return mask


def _forecast_steps_policy(base: type[Policy]) -> type[Policy]:
    """``base`` whose forecast decisions become "sample 0 computes, the others are forecast"."""

    class FirstSampleComputes(base):  # type: ignore[valid-type, misc]
        needs_batch_split = True

        def decide(self, ctx: ContextState, unit: UnitState) -> UnitDecision:
            decision = super().decide(ctx, unit)
            if decision is Decision.FORECAST:
                return _FirstSampleComputes.decide(self, ctx, unit)
            return decision

    return FirstSampleComputes


def check_adapter_batches(adapter: AdapterLike, case: ModelCase) -> None:
    """Sub-batch units agree with whole-batch ones; bfloat16 forecasts stay finite and bfloat16."""
    cls = _adapter_class(adapter)
    model = _model(case)
    reference = _generate(case, model)[None]
    accelerator = _accelerator(cls, **_CACHING)
    with _attach(cls, accelerator, model) as handle:
        forecast = _generate(case, model, handle=handle)[None]
    if cls.provides_batch_split:
        mixed_policy = _forecast_steps_policy(accelerator.policy_cls)
        mixed = Accelerator(
            policy_cls=mixed_policy, config=accelerator.config, basis=accelerator.basis, adapter=accelerator.adapter
        )
        with _attach(cls, mixed, model) as handle:
            split = _generate(case, model, handle=handle)[None]
            partial = sum(u.partial for u in handle.summary().units)
        _require(partial > 0, f"batches: {cls.name} ran no unit on a sub-batch")
        for step, (got, computed, forecast_all) in enumerate(zip(split, reference, forecast, strict=True)):
            for row, want in ((0, computed), (1, forecast_all)):
                scale = float(want[row].abs().max()) or 1.0
                error = float((got[row] - want[row]).abs().max())
                _require(
                    error <= _ROW_RTOL * scale,
                    f"batches: {cls.name} sample {row} at step {step} is {error:.3g} away from the "
                    f"{'uncached' if row == 0 else 'all-forecast'} output (scale {scale:.3g})",
                )
    model16 = _model(case, torch.bfloat16)
    with _attach(cls, accelerator, model16) as handle:
        outputs = _generate(case, model16, dtype=torch.bfloat16, handle=handle)[None]
        forecast_steps = handle.summary().forecast_steps
    _require(forecast_steps > 0, f"batches: {cls.name} forecast nothing in bfloat16")
    _require(
        all(o.dtype == torch.bfloat16 and bool(torch.isfinite(o).all()) for o in outputs),
        f"batches: {cls.name} bfloat16 outputs are not finite bfloat16",
    )


def check_adapter_lighter_units(adapter: AdapterLike, case: ModelCase) -> None:
    """Every granularity the adapter declares is exact at interval 1 and forecasts; the others are refused."""
    cls = _adapter_class(adapter)
    for units in GRANULARITIES[1:]:
        model = _model(case)
        if units not in cls.granularities:
            try:
                _attach(cls, _accelerator(cls, "fora", interval=1, units=units), model).remove()
            except AdapterMismatchError:
                continue
            _require(False, f"lighter units: {cls.name} accepted units={units!r}, which it does not declare")
        reference = _generate(case, model)[None]
        try:
            with _attach(cls, _accelerator(cls, "fora", interval=1, units=units), model) as handle:
                cached = _generate(case, model, handle=handle)[None]
        except AdapterMismatchError as error:
            _require(False, f"lighter units: {cls.name} declares units={units!r}, which its model refused: {error}")
        step = _same(reference, cached)
        _require(step is None, f"lighter units: {cls.name} with units={units!r} differs from no cache at step {step}")
        with _attach(cls, _accelerator(cls, "fora", interval=2, units=units), model) as handle:
            forecast = _generate(case, model, handle=handle)
            summary = handle.summary()
        _require(summary.forecast_steps > 0, f"lighter units: {cls.name} with units={units!r} forecast nothing")
        _require(
            all(bool(torch.isfinite(t).all()) for t in forecast[None]),
            f"lighter units: {cls.name} with units={units!r} forecast non-finite outputs",
        )


def check_adapter_contract(adapter: AdapterLike, case: ModelCase, other: ModelCase | None = None) -> None:
    """Every rule of the adapter contract (see the module docstring); ``other`` is a model of another family."""
    check_adapter_selected(adapter, case, other)
    check_adapter_exact_at_interval_one(adapter, case)
    check_adapter_skips_forecast_modules(adapter, case)
    check_adapter_flops(adapter, case)
    check_adapter_remove_restores(adapter, case)
    check_adapter_contexts_isolated(adapter, case)
    check_adapter_batches(adapter, case)
    check_adapter_lighter_units(adapter, case)


class AdapterContract:
    """Pytest mixin: provide ``adapter`` (a name or class), ``case`` and ``other_case`` fixtures."""

    rules: ClassVar[tuple[str, ...]] = (
        "selected",
        "exact_at_interval_one",
        "skips_forecast_modules",
        "flops",
        "remove_restores",
        "contexts_isolated",
        "batches",
        "lighter_units",
    )

    def test_selected(self, adapter: AdapterLike, case: ModelCase, other_case: ModelCase | None) -> None:
        check_adapter_selected(adapter, case, other_case)

    def test_exact_at_interval_one(self, adapter: AdapterLike, case: ModelCase) -> None:
        check_adapter_exact_at_interval_one(adapter, case)

    def test_skips_forecast_modules(self, adapter: AdapterLike, case: ModelCase) -> None:
        check_adapter_skips_forecast_modules(adapter, case)

    def test_flops(self, adapter: AdapterLike, case: ModelCase) -> None:
        check_adapter_flops(adapter, case)

    def test_remove_restores(self, adapter: AdapterLike, case: ModelCase) -> None:
        check_adapter_remove_restores(adapter, case)

    def test_contexts_isolated(self, adapter: AdapterLike, case: ModelCase) -> None:
        check_adapter_contexts_isolated(adapter, case)

    def test_batches(self, adapter: AdapterLike, case: ModelCase) -> None:
        check_adapter_batches(adapter, case)

    def test_lighter_units(self, adapter: AdapterLike, case: ModelCase) -> None:
        check_adapter_lighter_units(adapter, case)
