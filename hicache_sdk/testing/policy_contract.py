"""The policy contract: what every cache policy must satisfy, as plain checking functions.

Every ``check_*`` function runs the policy, attached with :func:`~hicache_sdk.compose`, on a tiny
random-weight ``FluxTransformer2DModel`` (built here, seeded, on CPU) over a few steps of
decreasing noise level, and raises :class:`AssertionError` with a message that starts with the
rule's name and names the policy and its settings; it returns ``None`` otherwise. They do not
depend on pytest.

A policy is given by its registered name or by its class (unregistered classes are composed
directly). The checks run it with :func:`caching_params` (settings derived from the names of its
config fields so that it caches within a few steps) updated by the caller's ``params``.

The rules:

1. caches: with those settings the policy forecasts some unit at some step (so the rules
   below are not vacuous);
2. exact without caching: a setting that computes every step (``warmup`` covering every step,
   ``interval=1``) gives outputs bit for bit equal to the uncached model, and a summary with no
   forecast step;
3. summary and FLOPs: ``full_steps + forecast_steps == steps``, every unit served once per
   step, and ``flops_saved_fraction == 1 - cached / uncached`` FLOPs counted independently by
   ``FlopCounterMode`` (the policy's own matrix work included), also when a policy that can
   reject drafts has every other one rejected;
4. remove() restores: after :meth:`~hicache_sdk.CacheHandle.remove` (also in mid-generation) the
   model has no hook or attribute left, unchanged weights, the pristine outputs bit for bit, and
   a fresh apply gives the first cached outputs again;
5. contexts isolated: with ``cache_context("cond")`` and ``("uncond")`` calls alternating, each
   context's outputs equal a run of that context alone;
6. deterministic: two generations on one handle and one on a fresh handle give the same outputs
   bit for bit and equal summaries;
7. batch > 1: in batches of 2 distinct and 3 identical samples each sample's output equals it
   generated alone (to rounding), per-sample counts add up, identical samples get identical
   decisions;
8. non-finite fallback: with a basis whose weights overflow float32, or with forecasts replaced
   by NaN, outputs stay finite and every non-finite forecast is counted as a fallback;
9. bad config refused: the config builds from its defaults and is frozen; a wrong-typed value
   for any field (and a NaN for a real field) raises naming the field; an unknown setting is
   refused by the config and by :func:`~hicache_sdk.compose`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, ClassVar

import attrs
import torch

from ..accelerator import Accelerator, CacheHandle, compose
from ..basis import Basis
from ..errors import InvalidParameterError
from ..flops import flop_counter_mode
from ..policy import Policy
from ..registry import get_registry
from ..summary import RunSummary

__all__ = [
    "DEFAULT_STEPS",
    "PolicyContract",
    "PolicyLike",
    "caching_params",
    "check_bad_config_refused",
    "check_batches",
    "check_caches",
    "check_contexts_isolated",
    "check_deterministic",
    "check_exact_without_caching",
    "check_non_finite_fallback",
    "check_policy_contract",
    "check_remove_restores",
    "check_summary_and_flops",
    "no_cache_params",
]

#: A policy as the checks take it: its registered name or its class.
PolicyLike = str | type[Policy]
#: Denoising steps of each generation the checks run.
DEFAULT_STEPS = 6

_SIDE = 4  # image tokens: _SIDE x _SIDE
_TEXT = 6  # text tokens
_CHANNELS = 16  # latent channels, text and pooled embedding widths
_LARGE_THRESHOLDS = (1e6, 1e3, 10.0, 1.0)  # random weights change little: decide to forecast
_FLOPS_RTOL = 1e-9
_ROW_RTOL = 1e-4  # a sample in a batch and alone agree to this share of the output's scale


def _require(condition: bool, message: str) -> None:
    # not `assert`: the contract must also hold under `python -O`
    if not condition:
        raise AssertionError(message)


# -- the policy under test ---------------------------------------------------------------------
def _policy_class(policy: PolicyLike) -> type[Policy]:
    if isinstance(policy, str):
        cls: type[Policy] = get_registry().get("policy", policy).obj
        return cls
    if isinstance(policy, type) and issubclass(policy, Policy):
        return policy
    raise TypeError(f"policy must be a registered policy name or a Policy subclass, got {policy!r}")


def _fields(cls: type[Policy]) -> dict[str, Any]:
    config: Any = getattr(cls, "Config", None)
    if not attrs.has(config):
        return {}
    return {a.alias: a for a in attrs.fields(config) if a.init}


def _accepts(cls: type[Policy], params: Mapping[str, Any]) -> bool:
    try:
        cls.Config(**params)
    except Exception:
        return False
    return True


def caching_params(policy: PolicyLike) -> dict[str, Any]:
    """Settings under which ``policy`` caches within a few steps of a tiny random-weight model.

    Derived from the names of the policy's config fields, each set to the first value the config
    accepts: ``warmup`` 1 (then 2, 3), ``interval`` 2 (then 3), ``min_steps`` 1 (so the few-step
    guard stays off), and every field whose name contains ``threshold`` a large value (random
    weights change little, so a generous threshold forecasts). Other fields keep their defaults.

    Args:
        policy: a registered policy name or a :class:`~hicache_sdk.Policy` subclass.

    Returns:
        The settings, by config field name (empty for a config without these fields).
    """
    cls = _policy_class(policy)
    fields = _fields(cls)
    wanted: list[tuple[str, Sequence[Any]]] = [
        ("warmup", (1, 2, 3)),
        ("interval", (2, 3)),
        ("min_steps", (1, 2)),
    ]
    wanted += [(name, _LARGE_THRESHOLDS) for name in fields if "threshold" in name]
    params: dict[str, Any] = {}
    for name, candidates in wanted:
        if name not in fields:
            continue
        for value in candidates:
            if _accepts(cls, {**params, name: value}):
                params[name] = value
                break
    return params


def no_cache_params(policy: PolicyLike, steps: int = DEFAULT_STEPS) -> list[dict[str, Any]]:
    """Settings under which ``policy`` computes every one of ``steps`` steps, to be set over :func:`caching_params`.

    ``{"warmup": steps}`` when the config has a ``warmup`` field and ``{"interval": 1}`` when it has
    an ``interval`` field (each only if the config accepts it).

    Args:
        policy: a registered policy name or a :class:`~hicache_sdk.Policy` subclass.
        steps: steps of the generation.
    """
    cls = _policy_class(policy)
    fields = _fields(cls)
    base = caching_params(cls)
    found = []
    for setting in ({"warmup": steps}, {"interval": 1}):
        (name,) = setting
        if name in fields and _accepts(cls, {**base, **setting}):
            found.append(setting)
    return found


@attrs.frozen
class _Subject:
    """A policy with its settings and basis: builds accelerators and labels messages."""

    cls: type[Policy]
    name: str | None
    params: Mapping[str, Any]
    basis: Basis
    steps: int

    @classmethod
    def of(cls, policy: PolicyLike, params: Mapping[str, Any] | None, basis: str | Basis, steps: int) -> _Subject:
        if not isinstance(steps, int) or steps < 4:
            raise ValueError(f"steps must be an integer >= 4, got {steps!r}")
        policy_cls = _policy_class(policy)
        basis_obj = basis if isinstance(basis, Basis) else get_registry().get("basis", basis).obj()
        merged = {**caching_params(policy_cls), **(params or {})}
        name = policy if isinstance(policy, str) else None
        return cls(policy_cls, name, merged, basis_obj, steps)

    @property
    def label(self) -> str:
        who = repr(self.name) if self.name is not None else self.cls.__qualname__
        settings = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"policy {who} ({settings}) with basis {self.basis.tag}"

    def accelerator(
        self, overrides: Mapping[str, Any] | None = None, *, basis: Basis | None = None, check_finite: bool = True
    ) -> Accelerator:
        params = {**self.params, **(overrides or {})}
        basis = basis if basis is not None else self.basis
        if self.name is not None:
            return compose(self.name, basis=basis, check_finite=check_finite, **params)
        return Accelerator(
            policy_cls=self.cls, config=self.cls.Config(**params), basis=basis, check_finite=check_finite
        )


# -- a tiny model and its inputs ------------------------------------------------------------------
def _tiny_flux(seed: int) -> torch.nn.Module:
    """A FluxTransformer2DModel of 2 double and 2 single blocks, 2 heads of 8 channels, random weights."""
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FluxTransformer2DModel(
            patch_size=1,
            in_channels=_CHANNELS,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=_CHANNELS,
            pooled_projection_dim=_CHANNELS,
            guidance_embeds=False,
            axes_dims_rope=(2, 2, 4),
        )
    return model.eval()


def _text(batch: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "encoder_hidden_states": torch.randn(batch, _TEXT, _CHANNELS, generator=g),
        "pooled_projections": torch.randn(batch, _CHANNELS, generator=g),
    }


def _repeat(tensors: Mapping[str, torch.Tensor], times: int) -> dict[str, torch.Tensor]:
    return {k: v.repeat(times, *([1] * (v.dim() - 1))) for k, v in tensors.items()}


_TRAJECTORIES: dict[tuple[int, int, int], list[torch.Tensor]] = {}


class _Bench:
    """A seeded tiny model, per-context text inputs and a fixed latent trajectory to replay.

    The trajectory is an uncached Euler loop (advanced by the ``"cond"`` branch); every run replays
    it, so runs with different contexts or caches see the same model inputs at every step.
    """

    def __init__(self, steps: int, *, batch: int = 1, identical: bool = False, seed: int = 0) -> None:
        self.steps = steps
        self.batch = batch
        self.model: Any = _tiny_flux(seed)
        samples = 1 if identical else batch
        ids = torch.zeros(_SIDE, _SIDE, 3)
        ids[..., 1] = torch.arange(_SIDE)[:, None]
        ids[..., 2] = torch.arange(_SIDE)[None, :]
        self.shared = {"img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(_TEXT, 3)}
        self.branches = {"cond": _text(samples, seed + 1), "uncond": _text(samples, seed + 2)}
        self.levels = [1.0 - s / steps for s in range(steps)]
        key = (steps, samples, seed)
        if key not in _TRAJECTORIES:  # the model is rebuilt identically: its uncached trajectory is reused
            g = torch.Generator().manual_seed(seed + 100)
            latents = [torch.randn(samples, _SIDE * _SIDE, _CHANNELS, generator=g)]
            with torch.no_grad():
                for step, level in enumerate(self.levels[:-1]):
                    out = self._call(latents[-1], level, "cond", None)
                    latents.append(latents[-1] + (self.levels[step + 1] - level) * out)
            _TRAJECTORIES[key] = latents
        self.latents = [x.clone() for x in _TRAJECTORIES[key]]
        if identical:
            self.latents = [x.repeat(batch, 1, 1) for x in self.latents]
            self.branches = {k: _repeat(v, batch) for k, v in self.branches.items()}

    def _call(self, latent: torch.Tensor, level: float, branch: str, context: str | None) -> torch.Tensor:
        scope: Any = self.model.cache_context(context) if context is not None else nullcontext()
        with scope:
            out = self.model(
                hidden_states=latent,
                timestep=torch.full((latent.shape[0],), level),
                **self.branches[branch],
                **self.shared,
                return_dict=False,
            )[0]
        return out

    def replay(self, contexts: Sequence[str | None] = (None,), *, steps: int | None = None) -> dict[str | None, Any]:
        """Outputs by context, stacked over steps ``(steps, batch, tokens, channels)``.

        ``None`` calls the model without a cache context (with the ``"cond"`` text).
        """
        outputs: dict[str | None, list[torch.Tensor]] = {name: [] for name in contexts}
        with torch.no_grad():
            for step in range(self.steps if steps is None else steps):
                for name in contexts:
                    out = self._call(self.latents[step], self.levels[step], name or "cond", name)
                    outputs[name].append(out)
        return {name: torch.stack(values) for name, values in outputs.items()}

    def sample(self, index: int) -> _Bench:
        """The same model and trajectory restricted to sample ``index`` (a batch of 1)."""
        one = object.__new__(_Bench)
        one.steps, one.batch, one.model, one.shared, one.levels = self.steps, 1, self.model, self.shared, self.levels
        one.branches = {k: {n: t[index : index + 1] for n, t in v.items()} for k, v in self.branches.items()}
        one.latents = [x[index : index + 1] for x in self.latents]
        return one


@contextmanager
def _attached(
    rule: str, subject: _Subject, model: torch.nn.Module, accelerator: Accelerator | None = None
) -> Iterator[CacheHandle]:
    """Apply the accelerator to ``model`` (any error reported under ``rule``); always removed after."""
    try:
        handle = (accelerator or subject.accelerator()).apply(model)
    except Exception as exc:
        raise AssertionError(f"{rule}: {subject.label}: apply() raised {exc!r}") from exc
    try:
        yield handle
    finally:
        handle.remove()


def _generate(
    rule: str,
    subject: _Subject,
    what: str,
    bench: _Bench,
    handle: CacheHandle,
    contexts: Sequence[str | None] = (None,),
    *,
    steps: int | None = None,
) -> dict[str | None, Any]:
    """A generation (its first ``steps`` only, if given); an exception becomes an AssertionError naming the rule."""
    try:
        handle.reset(num_steps=bench.steps)
        return bench.replay(contexts, steps=steps)
    except Exception as exc:
        raise AssertionError(f"{rule}: {subject.label}: {what} raised {exc!r}") from exc


def _where_differs(a: torch.Tensor, b: torch.Tensor) -> str:
    """Where two equally shaped step-stacked outputs first differ, and by how much."""
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} and {tuple(b.shape)}"
    differs = (a != b).flatten(1).any(1).nonzero().flatten().tolist()
    if not differs:
        return "no difference"
    return f"first at step {differs[0]} of {a.shape[0]}, max |difference| {float((a - b).abs().max()):.3g}"


def _check_counts(rule: str, subject: _Subject, summary: RunSummary, contexts: Sequence[str], steps: int) -> None:
    """The summary's step and unit counts add up, for ``contexts`` of ``steps`` steps each."""
    where = f"{rule}: {subject.label}"
    _require(summary.contexts == tuple(contexts), f"{where}: summary contexts {summary.contexts}, expected {contexts}")
    _require(summary.steps == steps, f"{where}: summary.steps {summary.steps}, expected {steps}")
    _require(
        summary.full_steps + summary.forecast_steps == steps,
        f"{where}: full_steps {summary.full_steps} + forecast_steps {summary.forecast_steps} != steps {steps}",
    )
    _require(bool(summary.units), f"{where}: the summary lists no unit")
    served = steps * len(contexts)
    for u in summary.units:
        _require(
            u.computed + u.forecast + u.fallbacks == served,
            f"{where}: unit {u.key} computed {u.computed} + forecast {u.forecast} + fallbacks {u.fallbacks} != "
            f"{served} (steps x contexts): every unit is served once per step",
        )
        _require(0 <= u.partial <= u.forecast, f"{where}: unit {u.key} partial {u.partial} > forecast {u.forecast}")
    _require(
        summary.fallbacks == sum(u.fallbacks for u in summary.units),
        f"{where}: summary.fallbacks {summary.fallbacks} is not the sum over units",
    )
    _require(summary.cache_bytes >= 0, f"{where}: negative cache_bytes {summary.cache_bytes}")
    summary.table()


def _same_summary(a: RunSummary, b: RunSummary) -> bool:
    x, y = a.flops_saved_fraction, b.flops_saved_fraction
    fractions = (math.isnan(x) and math.isnan(y)) or x == y
    return fractions and attrs.evolve(a, flops_saved_fraction=0.0) == attrs.evolve(b, flops_saved_fraction=0.0)


# -- 1. caches ----------------------------------------------------------------------------------
def check_caches(
    policy: PolicyLike,
    *,
    params: Mapping[str, Any] | None = None,
    basis: str | Basis = "taylor",
    steps: int = DEFAULT_STEPS,
) -> None:
    """With :func:`caching_params` updated by ``params``, some unit is forecast at some step.

    Args:
        policy: a registered policy name or a :class:`~hicache_sdk.Policy` subclass.
        params: settings over :func:`caching_params` (pass some if the derived ones never forecast).
        basis: basis name or instance to compose with.
        steps: denoising steps per generation (>= 4).
    """
    rule = "caches"
    subject = _Subject.of(policy, params, basis, steps)
    bench = _Bench(steps)
    with _attached(rule, subject, bench.model) as handle:
        _generate(rule, subject, "a cached generation", bench, handle)
        summary = handle.summary()
    forecast = sum(u.forecast for u in summary.units)
    _require(
        summary.forecast_steps > 0 and forecast > 0,
        f"{rule}: {subject.label}: no unit was forecast in {steps} steps ({summary.full_steps} full steps); "
        "the other rules would be vacuous: pass params= under which the policy caches on a random-weight model",
    )


# -- 2. exact without caching -------------------------------------------------------------------
def check_exact_without_caching(
    policy: PolicyLike,
    *,
    params: Mapping[str, Any] | None = None,
    basis: str | Basis = "taylor",
    steps: int = DEFAULT_STEPS,
    settings: Iterable[Mapping[str, Any]] | None = None,
) -> None:
    """Settings that compute every step give the uncached outputs bit for bit and no forecast step.

    Args:
        policy: a registered policy name or a :class:`~hicache_sdk.Policy` subclass.
        params: settings over :func:`caching_params`.
        basis: basis name or instance to compose with.
        steps: denoising steps per generation (>= 4).
        settings: the no-cache settings, each set over the others; default :func:`no_cache_params`.

    Raises:
        ValueError: no no-cache setting was given and none can be derived from the config.
    """
    rule = "exact without caching"
    subject = _Subject.of(policy, params, basis, steps)
    chosen = [dict(s) for s in settings] if settings is not None else no_cache_params(subject.cls, steps)
    if not chosen:
        raise ValueError(
            f"{subject.label}: its config has no warmup or interval field to compute every step; pass settings="
        )
    bench = _Bench(steps)
    reference = bench.replay()[None]
    for setting in chosen:
        where = f"{rule}: {subject.label} with {setting}"
        with _attached(rule, subject, bench.model, subject.accelerator(setting)) as handle:
            out = _generate(rule, subject, f"a generation with {setting}", bench, handle)[None]
            summary = handle.summary()
        _require(
            torch.equal(out, reference),
            f"{where}: outputs differ from the uncached model's, {_where_differs(out, reference)}",
        )
        _check_counts(rule, subject, summary, ("default",), steps)
        _require(
            summary.forecast_steps == 0 and summary.full_steps == steps,
            f"{where}: {summary.forecast_steps} forecast steps, expected every step full",
        )
        for u in summary.units:
            _require(
                u.forecast == 0 and u.fallbacks == 0 and u.computed == steps,
                f"{where}: unit {u.key} computed {u.computed}, forecast {u.forecast}, fallbacks {u.fallbacks}",
            )


# -- 3. summary and FLOPs -------------------------------------------------------------------------
def check_summary_and_flops(
    policy: PolicyLike,
    *,
    params: Mapping[str, Any] | None = None,
    basis: str | Basis = "taylor",
    steps: int = DEFAULT_STEPS,
) -> None:
    """The summary's counts add up and its FLOPs saving matches an independent ``FlopCounterMode`` count.

    The cached generation runs under torch's FlopCounterMode (:func:`~hicache_sdk.flops.flop_counter_mode`),
    so every matrix product counts, the policy's own work included; ``flops_saved_fraction`` must
    equal ``1 - cached / uncached`` to a relative 1e-9. A policy that overrides ``end_step`` (and so
    can reject a draft) runs a second time with every other draft it accepts rejected: the
    rejected forward counts as overhead.

    Args:
        policy: a registered policy name or a :class:`~hicache_sdk.Policy` subclass.
        params: settings over :func:`caching_params`.
        basis: basis name or instance to compose with.
        steps: denoising steps per generation (>= 4).
    """
    rule = "summary and FLOPs"
    subject = _Subject.of(policy, params, basis, steps)
    bench = _Bench(steps)
    with flop_counter_mode() as counter:
        bench.replay(steps=1)
    uncached = float(counter.get_total_flops()) * steps  # every uncached step costs the same
    runs = [""]
    if subject.cls.end_step is not Policy.end_step:  # a policy that can reject drafts
        runs.append(" with every other draft rejected")
    for variant in runs:
        with _attached(rule, subject, bench.model) as handle:
            if variant:
                _reject_every_other_draft(handle.runtime.policy)
            with flop_counter_mode() as counter:
                out = _generate(rule, subject, f"a cached generation{variant}", bench, handle)[None]
            summary = handle.summary()
        cached = float(counter.get_total_flops())
        where = f"{rule}: {subject.label}{variant}"
        expected_shape = (steps, *bench.latents[0].shape)
        _require(
            out.shape == expected_shape, f"{where}: outputs of shape {tuple(out.shape)}, expected {expected_shape}"
        )
        _require(bool(torch.isfinite(out).all()), f"{where}: outputs are not finite")
        _check_counts(rule, subject, summary, ("default",), steps)
        expected = 1.0 - cached / uncached
        fraction = summary.flops_saved_fraction
        _require(
            math.isfinite(fraction) and math.isclose(fraction, expected, rel_tol=_FLOPS_RTOL, abs_tol=1e-12),
            f"{where}: flops_saved_fraction {fraction!r}, but FlopCounterMode counted {cached:.6g} FLOPs against "
            f"{uncached:.6g} uncached, a saving of {expected!r} (matrix work in on_block needs "
            "block_work_flops = True)",
        )
        if fraction < 1.0:
            _require(
                math.isclose(summary.flops_speedup, 1.0 / (1.0 - fraction), rel_tol=1e-12),
                f"{where}: flops_speedup {summary.flops_speedup!r} is not 1 / (1 - flops_saved_fraction)",
            )


def _reject_every_other_draft(policy: Policy) -> None:
    """Wrap a policy instance's ``end_step`` so that every other step it accepts with a forecast is rejected."""
    original = policy.end_step
    accepted = [0]

    def end_step(ctx: Any, output: torch.Tensor | None) -> bool:
        verdict = original(ctx, output)
        if verdict is False or ctx.full:
            return verdict
        accepted[0] += 1
        return accepted[0] % 2 == 0

    policy.end_step = end_step  # type: ignore[method-assign]


# -- 4. remove() restores ---------------------------------------------------------------------------
def _traces(model: torch.nn.Module) -> dict[str, tuple[Any, ...]]:
    """Per module: instance attributes and the numbers of torch hooks of each kind."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks")
    return {
        name: (tuple(sorted(vars(m))), *(len(getattr(m, k, ())) for k in kinds)) for name, m in model.named_modules()
    }


def _check_restored(
    rule: str, subject: _Subject, bench: _Bench, pristine: torch.Tensor, traces: Any, weights: Any, when: str
) -> None:
    where = f"{rule}: {subject.label}: {when}"
    model = bench.model
    left = [name or "<model>" for name, m in model.named_modules() if hasattr(m, "_diffusers_hook")]
    _require(not left, f"{where}: diffusers hook registries left on {left}")
    after = _traces(model)
    changed = [name or "<model>" for name in traces if after.get(name) != traces[name]]
    _require(not changed, f"{where}: attributes or torch hooks of {changed} differ from the pristine model's")
    now = model.state_dict()
    edited = [k for k, v in weights.items() if not torch.equal(now[k], v)]
    _require(not edited, f"{where}: parameters or buffers {edited[:3]} changed")
    out = bench.replay()[None]
    _require(
        torch.equal(out, pristine),
        f"{where}: outputs differ from the pristine model's, {_where_differs(out, pristine)}",
    )


def check_remove_restores(
    policy: PolicyLike,
    *,
    params: Mapping[str, Any] | None = None,
    basis: str | Basis = "taylor",
    steps: int = DEFAULT_STEPS,
) -> None:
    """After ``handle.remove()`` the model is pristine again, and a fresh apply works as the first.

    Removal after a whole generation and in the middle of one must both leave no diffusers hook
    registry, no extra attribute or torch hook on any module, unchanged weights, and the pristine
    outputs bit for bit; ``remove()`` is idempotent.

    Args:
        policy: a registered policy name or a :class:`~hicache_sdk.Policy` subclass.
        params: settings over :func:`caching_params`.
        basis: basis name or instance to compose with.
        steps: denoising steps per generation (>= 4).
    """
    rule = "remove() restores"
    subject = _Subject.of(policy, params, basis, steps)
    bench = _Bench(steps)
    model = bench.model
    pristine = bench.replay()[None]
    traces = _traces(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    accelerator = subject.accelerator()
    with _attached(rule, subject, model, accelerator) as handle:
        first = _generate(rule, subject, "a cached generation", bench, handle)[None]
    handle.remove()  # idempotent
    _require(not handle.attached, f"{rule}: {subject.label}: handle.attached is still True after remove()")
    _check_restored(rule, subject, bench, pristine, traces, weights, "after remove()")
    with _attached(rule, subject, model, accelerator) as handle:
        _generate(rule, subject, "half a generation", bench, handle, steps=steps // 2)
    _check_restored(rule, subject, bench, pristine, traces, weights, "after remove() in mid-generation")
    with _attached(rule, subject, model, accelerator) as handle:
        again = _generate(rule, subject, "a generation after re-applying", bench, handle)[None]
    _require(
        torch.equal(again, first),
        f"{rule}: {subject.label}: re-applied after remove(), the outputs differ from the first application's, "
        f"{_where_differs(again, first)}",
    )


# -- 5. contexts isolated -------------------------------------------------------------------------
def check_contexts_isolated(
    policy: PolicyLike,
    *,
    params: Mapping[str, Any] | None = None,
    basis: str | Basis = "taylor",
    steps: int = DEFAULT_STEPS,
) -> None:
    """With ``"cond"`` and ``"uncond"`` calls alternating (as CFG pipelines do), each context's outputs
    equal those of a run of that context alone, and the summary counts both contexts.

    Args:
        policy: a registered policy name or a :class:`~hicache_sdk.Policy` subclass.
        params: settings over :func:`caching_params`.
        basis: basis name or instance to compose with.
        steps: denoising steps per generation (>= 4).
    """
    rule = "contexts isolated"
    subject = _Subject.of(policy, params, basis, steps)
    bench = _Bench(steps)
    accelerator = subject.accelerator()
    with _attached(rule, subject, bench.model, accelerator) as handle:
        both = _generate(rule, subject, "a CFG generation", bench, handle, ("cond", "uncond"))
        summary = handle.summary()
    _check_counts(rule, subject, summary, ("cond", "uncond"), steps)
    for name in ("cond", "uncond"):
        with _attached(rule, subject, bench.model, accelerator) as handle:
            alone = _generate(rule, subject, f"a {name!r}-only generation", bench, handle, (name,))
        _require(
            torch.equal(both[name], alone[name]),
            f"{rule}: {subject.label}: {name!r} outputs with both contexts alternating differ from a {name!r}-only "
            f"run, {_where_differs(both[name], alone[name])}: state leaks between contexts (keep it in "
            "ctx.policy_state or the unit's ladders, not on the policy)",
        )


# -- 6. deterministic ------------------------------------------------------------------------------
def check_deterministic(
    policy: PolicyLike,
    *,
    params: Mapping[str, Any] | None = None,
    basis: str | Basis = "taylor",
    steps: int = DEFAULT_STEPS,
) -> None:
    """Two generations on one handle and one on a fresh handle: equal outputs bit for bit, equal summaries.

    Args:
        policy: a registered policy name or a :class:`~hicache_sdk.Policy` subclass.
        params: settings over :func:`caching_params`.
        basis: basis name or instance to compose with.
        steps: denoising steps per generation (>= 4).
    """
    rule = "deterministic"
    subject = _Subject.of(policy, params, basis, steps)
    bench = _Bench(steps)
    accelerator = subject.accelerator()
    runs: list[tuple[str, torch.Tensor, RunSummary]] = []
    with _attached(rule, subject, bench.model, accelerator) as handle:
        for what in ("a first generation", "a second generation on the same handle"):
            out = _generate(rule, subject, what, bench, handle)[None]
            runs.append((what, out, handle.summary()))
    with _attached(rule, subject, bench.model, accelerator) as handle:
        what = "a generation on a fresh handle"
        out = _generate(rule, subject, what, bench, handle)[None]
        runs.append((what, out, handle.summary()))
    first, out0, summary0 = runs[0]
    for what, out, summary in runs[1:]:
        _require(
            torch.equal(out, out0),
            f"{rule}: {subject.label}: {what} gave other outputs than {first}, {_where_differs(out, out0)} "
            "(state kept on the policy across generations, or unseeded randomness?)",
        )
        _require(
            _same_summary(summary, summary0),
            f"{rule}: {subject.label}: {what} gave another summary than {first}:\n{summary}\n---\n{summary0}",
        )


# -- 7. batch > 1 ------------------------------------------------------------------------------------
def _sample_counts(handle: CacheHandle) -> dict[str, tuple[list[int], list[int], int]]:
    return {
        key: (list(u.counts.sample_computed), list(u.counts.sample_forecast), u.counts.computed + u.counts.forecast)
        for ctx in handle.runtime.contexts.values()
        for key, u in ctx.units.items()
    }


def check_batches(
    policy: PolicyLike,
    *,
    params: Mapping[str, Any] | None = None,
    basis: str | Basis = "taylor",
    steps: int = DEFAULT_STEPS,
) -> None:
    """Batches of 2 distinct samples and of 3 identical ones behave as each sample generated alone.

    Outputs are finite, the summary's counts add up, each unit's per-sample counts cover every
    step, identical samples get identical per-sample decisions, and each sample's output equals
    that sample generated alone (batch 1) to a relative ``1e-4`` of the output's scale (a batched
    matmul rounds differently). Decisions taken for a whole batch could differ from one sample's
    near a threshold; the generous thresholds of :func:`caching_params` keep clear of that.

    Args:
        policy: a registered policy name or a :class:`~hicache_sdk.Policy` subclass.
        params: settings over :func:`caching_params`.
        basis: basis name or instance to compose with.
        steps: denoising steps per generation (>= 4).
    """
    rule = "batch > 1"
    subject = _Subject.of(policy, params, basis, steps)
    accelerator = subject.accelerator()
    for batch, identical in ((2, False), (3, True)):
        bench = _Bench(steps, batch=batch, identical=identical)
        what = f"a batch of {batch} {'identical' if identical else 'distinct'} samples"
        where = f"{rule}: {subject.label}: {what}"
        with _attached(rule, subject, bench.model, accelerator) as handle:
            out = _generate(rule, subject, what, bench, handle)[None]
            summary = handle.summary()
            counts = _sample_counts(handle)
        _require(bool(torch.isfinite(out).all()), f"{where}: outputs are not finite")
        _check_counts(rule, subject, summary, ("default",), steps)
        for key, (computed, forecast, served) in counts.items():
            _require(
                len(computed) == batch and all(c + f == served for c, f in zip(computed, forecast, strict=True)),
                f"{where}: unit {key} per-sample counts computed {computed}, forecast {forecast} do not cover "
                f"{served} steps for each of {batch} samples",
            )
            if identical:
                _require(
                    len(set(computed)) == 1,
                    f"{where}: unit {key} computed identical samples on different numbers of steps {computed}",
                )
        alone: dict[int, torch.Tensor] = {}
        for b in range(1 if identical else batch):
            one = bench.sample(b)
            with _attached(rule, subject, one.model, accelerator) as handle:
                alone[b] = _generate(rule, subject, f"sample {b} alone", one, handle)[None]
        _require(
            out.shape[:2] == (steps, batch) and out.shape[2:] == alone[0].shape[2:],
            f"{where}: outputs of shape {tuple(out.shape)}, expected {(steps, batch, *alone[0].shape[2:])}",
        )
        scale = float(alone[0].abs().max())
        for b in range(batch):
            own = alone[0 if identical else b][:, 0]
            gap = float((out[:, b] - own).abs().max())
            _require(
                gap <= _ROW_RTOL * scale,
                f"{where}: sample {b} differs from the same sample generated alone by {gap:.3g} (output scale "
                f"{scale:.3g}): samples of a batch must not mix",
            )


# -- 8. non-finite fallback ----------------------------------------------------------------------------
@attrs.frozen(kw_only=True)
class _OverflowingBasis(Basis):
    """Weights finite as Python floats, beyond float32: every forecast through them is not finite."""

    name = "contract_overflow"

    def _weights(self, offset: float, order: int, spacing: float) -> tuple[float, ...]:
        return (1e300,) + (1e300,) * order


class _ForecastWatch:
    """Wraps a policy instance's ``forecast``: counts non-finite results, optionally poisons every other one."""

    def __init__(self, policy: Policy, poison: bool) -> None:
        self.calls = 0
        self.non_finite = 0
        original = policy.forecast

        def forecast(ctx: Any, unit: Any, token_paths: Any) -> tuple[torch.Tensor, ...]:
            outputs = tuple(original(ctx, unit, token_paths))
            self.calls += 1
            if poison and self.calls % 2 == 1:
                outputs = tuple(torch.full_like(o, math.nan) for o in outputs)
            if not all(bool(torch.isfinite(o).all()) for o in outputs):
                self.non_finite += 1
            return outputs

        policy.forecast = forecast  # type: ignore[method-assign]


def check_non_finite_fallback(
    policy: PolicyLike,
    *,
    params: Mapping[str, Any] | None = None,
    basis: str | Basis = "taylor",
    steps: int = DEFAULT_STEPS,
) -> None:
    """Non-finite forecasts fall back to computing: outputs stay finite, each one is counted as a fallback.

    Runs twice: composed with a basis whose weights overflow float32 (a policy that forecasts
    through its basis must fall back), and with every other forecast of the policy replaced by NaN.
    Without rejected steps, the summary's fallbacks equal the non-finite forecasts exactly.

    Args:
        policy: a registered policy name or a :class:`~hicache_sdk.Policy` subclass.
        params: settings over :func:`caching_params`.
        basis: basis name or instance for the NaN run.
        steps: denoising steps per generation (>= 4).
    """
    rule = "non-finite fallback"
    subject = _Subject.of(policy, params, basis, steps)
    for what, overflow in (("a basis overflowing float32", True), ("NaN forecasts", False)):
        bench = _Bench(steps)
        accelerator = subject.accelerator(basis=_OverflowingBasis() if overflow else None)
        where = f"{rule}: {subject.label}: with {what}"
        with _attached(rule, subject, bench.model, accelerator) as handle:
            watch = _ForecastWatch(handle.runtime.policy, poison=not overflow)
            out = _generate(rule, subject, f"a generation with {what}", bench, handle)[None]
            summary = handle.summary()
            rejected = sum(ctx.rejected_steps for ctx in handle.runtime.contexts.values())
        _require(bool(torch.isfinite(out).all()), f"{where}: outputs are not finite")
        _check_counts(rule, subject, summary, ("default",), steps)
        if not overflow:
            _require(watch.calls > 0, f"{where}: the policy forecast nothing (its forecast() was never called)")
        if watch.non_finite:
            _require(summary.fallbacks > 0, f"{where}: {watch.non_finite} non-finite forecasts, no fallback counted")
        if rejected == 0:
            _require(
                summary.fallbacks == watch.non_finite,
                f"{where}: {watch.non_finite} non-finite forecasts but {summary.fallbacks} fallbacks counted",
            )


# -- 9. bad config refused -----------------------------------------------------------------------------
def _type_name(attribute: Any) -> str:
    declared = attribute.type
    text = declared if isinstance(declared, str) else getattr(declared, "__name__", repr(declared))
    return str(text).replace("typing.", "")


def _wrong_values(attribute: Any) -> list[Any]:
    """Values of the wrong type for a field (and a NaN for a real field), from its annotation or default."""
    declared = _type_name(attribute)
    default = attribute.default
    if declared == "bool" or isinstance(default, bool):
        return ["yes", None]
    if declared == "int" or (declared in ("", "None") and isinstance(default, int)):
        return ["1", 1.5, None]
    if declared == "float" or (declared in ("", "None") and isinstance(default, float)):
        return ["0.5", math.nan, None]
    if declared == "str" or declared.startswith("Literal") or isinstance(default, str):
        return [1, None]
    return [object()]


def check_bad_config_refused(policy: PolicyLike) -> None:
    """The config builds from its defaults, is frozen, and refuses wrong-typed values and unknown settings.

    Each field must refuse a value of another type (a string for a number, a number for a
    string, ``None``; a NaN for a real) with :class:`~hicache_sdk.InvalidParameterError` or
    :class:`TypeError` naming the field. An unknown setting raises :class:`TypeError` from the
    config and :class:`~hicache_sdk.InvalidParameterError` from :func:`~hicache_sdk.compose` (for a
    registered policy). The policy refuses a config of another class.

    Args:
        policy: a registered policy name or a :class:`~hicache_sdk.Policy` subclass.
    """
    rule = "bad config refused"
    cls = _policy_class(policy)
    who = repr(policy) if isinstance(policy, str) else cls.__qualname__
    where = f"{rule}: policy {who}"
    config_cls: Any = getattr(cls, "Config", None)
    _require(attrs.has(config_cls), f"{where}: {cls.__qualname__}.Config must be an attrs class, got {config_cls!r}")
    try:
        config = config_cls()
    except Exception as exc:
        raise AssertionError(
            f"{where}: {config_cls.__qualname__}() raised {exc!r}: every field needs a default"
        ) from exc
    fields = _fields(cls)
    for alias in fields:
        try:
            setattr(config, alias, getattr(config, alias))
        except (AttributeError, attrs.exceptions.FrozenInstanceError):
            continue
        raise AssertionError(
            f"{where}: {config_cls.__qualname__} let its field {alias!r} be set: configs must be frozen"
        )
    for alias, attribute in fields.items():
        for value in _wrong_values(attribute):
            call = f"{config_cls.__qualname__}({alias}={value!r})"
            try:
                config_cls(**{alias: value})
            except (InvalidParameterError, TypeError) as exc:
                _require(
                    alias in str(exc) or attribute.name in str(exc),
                    f"{where}: {call} raised {exc!r}, which does not name the field {alias!r}",
                )
                continue
            except Exception as exc:
                raise AssertionError(f"{where}: {call} raised {exc!r}, expected InvalidParameterError") from exc
            raise AssertionError(f"{where}: {call} was accepted: every field must validate its value")
    bogus = "not_a_setting"
    try:
        config_cls(**{bogus: 1})
    except TypeError:
        pass
    else:
        raise AssertionError(f"{where}: {config_cls.__qualname__}({bogus}=1) was accepted")
    if isinstance(policy, str):
        try:
            compose(policy, not_a_setting=1)
        except InvalidParameterError as exc:
            _require(bogus in str(exc), f"{where}: compose({policy!r}, {bogus}=1) raised {exc!r} not naming it")
        except Exception as exc:
            raise AssertionError(f"{where}: compose({policy!r}, {bogus}=1) raised {exc!r}") from exc
        else:
            raise AssertionError(f"{where}: compose({policy!r}, {bogus}=1) was accepted")
    basis = get_registry().get("basis", "taylor").obj()
    try:
        cls(object(), basis)
    except InvalidParameterError:
        pass
    except Exception as exc:
        raise AssertionError(f"{where}: {cls.__qualname__}(object(), basis) raised {exc!r}") from exc
    else:
        raise AssertionError(f"{where}: {cls.__qualname__}(object(), basis) accepted a config of another class")


# -- all of it ---------------------------------------------------------------------------------------
def check_policy_contract(
    policy: PolicyLike,
    *,
    params: Mapping[str, Any] | None = None,
    basis: str | Basis = "taylor",
    steps: int = DEFAULT_STEPS,
    exact_settings: Iterable[Mapping[str, Any]] | None = None,
) -> None:
    """Run every check of the policy contract on ``policy``; raise :class:`AssertionError` on the first break.

    Args:
        policy: a registered policy name or a :class:`~hicache_sdk.Policy` subclass (registered or not).
        params: settings over :func:`caching_params` (e.g. ``{"per_sample": True}``, or a threshold
            under which the policy forecasts on a random-weight model).
        basis: basis name or instance to compose with.
        steps: denoising steps per generation (>= 4).
        exact_settings: settings that compute every step; default :func:`no_cache_params`.

    Example:
        >>> check_policy_contract("first_block", params={"per_sample": True})  # doctest: +SKIP
    """
    common: dict[str, Any] = {"params": params, "basis": basis, "steps": steps}
    check_bad_config_refused(policy)
    check_caches(policy, **common)
    check_exact_without_caching(policy, settings=exact_settings, **common)
    check_summary_and_flops(policy, **common)
    check_remove_restores(policy, **common)
    check_contexts_isolated(policy, **common)
    check_deterministic(policy, **common)
    check_batches(policy, **common)
    check_non_finite_fallback(policy, **common)


class PolicyContract:
    """pytest mixin running the policy contract, one test per rule.

    Subclass it in a class whose name starts with ``Test`` and define a ``policy`` fixture returning
    the policy to check (its registered name or its class). Set ``contract_params`` to settings over
    :func:`caching_params`, ``contract_basis`` and ``contract_steps`` to change the basis and the
    number of steps. The mixin itself does not import pytest.
    """

    contract_params: ClassVar[Mapping[str, Any] | None] = None
    contract_basis: ClassVar[str | Basis] = "taylor"
    contract_steps: ClassVar[int] = DEFAULT_STEPS

    def _common(self) -> dict[str, Any]:
        return {"params": self.contract_params, "basis": self.contract_basis, "steps": self.contract_steps}

    def test_bad_config_refused(self, policy: PolicyLike) -> None:
        check_bad_config_refused(policy)

    def test_caches(self, policy: PolicyLike) -> None:
        check_caches(policy, **self._common())

    def test_exact_without_caching(self, policy: PolicyLike) -> None:
        check_exact_without_caching(policy, **self._common())

    def test_summary_and_flops(self, policy: PolicyLike) -> None:
        check_summary_and_flops(policy, **self._common())

    def test_remove_restores(self, policy: PolicyLike) -> None:
        check_remove_restores(policy, **self._common())

    def test_contexts_isolated(self, policy: PolicyLike) -> None:
        check_contexts_isolated(policy, **self._common())

    def test_deterministic(self, policy: PolicyLike) -> None:
        check_deterministic(policy, **self._common())

    def test_batches(self, policy: PolicyLike) -> None:
        check_batches(policy, **self._common())

    def test_non_finite_fallback(self, policy: PolicyLike) -> None:
        check_non_finite_fallback(policy, **self._common())
