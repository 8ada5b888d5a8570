"""Rows of other libraries: diffusers' built-in caches and cache-dit's DBCache, on the digits model.

diffusers' caches attach through ``transformer.enable_cache(config)`` and run inside
``transformer.cache_context(...)`` (the digits sampler batches CFG into one call per step, so one
context serves both branches); their state is reset after each generation, as a pipeline does.
cache-dit is optional (``pip install 'hicache-sdk[compare]'``): it patches the model for good, so
each attachment works on a fresh copy of the untouched model.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..hooks import detach_all
from ..models import DigitsModel, sample
from .rows import Attached, CompareRow, Target

__all__ = [
    "PAPER_UNITS",
    "cache_dit_row",
    "calibrate_mag_ratios",
    "diffusers_row",
    "first_block_cache_row",
    "mag_cache_row",
    "pyramid_attention_row",
    "taylorseer_matched_row",
    "taylorseer_shipped_row",
]

#: diffusers ``TaylorSeerCacheConfig`` identifiers for the paper's units on Flux (this SDK's flux adapter):
#: cached = double-block attention and MLPs, single-block fused output projection; skipped on forecast
#: steps (zeros, as its ``skip_predict_identifiers`` do) = what only feeds that projection.
PAPER_UNITS: dict[str, list[str]] = {
    "cache_identifiers": [
        r"transformer_blocks\.\d+\.(attn|ff|ff_context)",
        r"single_transformer_blocks\.\d+\.proj_out",
    ],
    "skip_predict_identifiers": [r"single_transformer_blocks\.\d+\.(attn|proj_mlp)"],
}


class _DiffusersAttached(Attached):
    def __init__(self, model: DigitsModel, config: Any, extra: Any = None) -> None:
        super().__init__(model)
        self._extra = extra  # e.g. a timestep tracker to remove with the cache
        model.transformer.enable_cache(config)

    @contextlib.contextmanager
    def generation(self) -> Iterator[None]:
        transformer = self.model.transformer
        try:
            with transformer.cache_context("compare"):
                yield
        finally:
            transformer._reset_stateful_cache()

    def remove(self) -> None:
        transformer = self.model.transformer
        transformer.disable_cache()
        detach_all(transformer)  # drop the empty hook registries diffusers leaves behind
        if self._extra is not None:
            self._extra.remove()


def diffusers_row(label: str, make_config: Callable[[], Any], setting: str | None = None) -> CompareRow:
    """A row for ``transformer.enable_cache(make_config())`` (a fresh config per attachment)."""

    def attach(model: DigitsModel) -> Attached:
        return _DiffusersAttached(model, make_config())

    return CompareRow(label=label, family="diffusers", setting=setting or repr(make_config()), attach=attach)


def taylorseer_shipped_row() -> CompareRow:
    """diffusers' ``TaylorSeerCacheConfig()`` as shipped: attention only, N=5, W=3, m=1, bf16 factors."""
    from diffusers import TaylorSeerCacheConfig

    return diffusers_row("diffusers taylorseer (defaults)", TaylorSeerCacheConfig)


def taylorseer_matched_row(target: Target, max_order: int) -> CompareRow:
    """diffusers' TaylorSeer on the paper's units, fp32 factors, N and m as given, W one less.

    Its schedule is full iff ``s < W or (s - W - 1) % N == 0``: with ``W - 1`` it computes as many
    full steps of 50 as the reference schedule with ``W`` (anchors one step later); the reference
    schedule itself is not expressible.
    """
    from diffusers import TaylorSeerCacheConfig

    def make() -> Any:
        return TaylorSeerCacheConfig(
            cache_interval=target.interval,
            disable_cache_before_step=target.warmup - 1,
            max_order=max_order,
            taylor_factors_dtype=torch.float32,
            **PAPER_UNITS,
        )

    return diffusers_row(f"diffusers taylorseer, paper units @{target.name}", make)


def first_block_cache_row(threshold: float = 0.05) -> CompareRow:
    """diffusers' First Block Cache (default threshold 0.05)."""
    from diffusers import FirstBlockCacheConfig

    return diffusers_row(
        f"diffusers first-block-cache (threshold {threshold})", lambda: FirstBlockCacheConfig(threshold)
    )


def calibrate_mag_ratios(model: DigitsModel, digits: Sequence[int], seeds: Sequence[int], steps: int) -> list[float]:
    """Run diffusers' MagCache calibration (``calibrate=True``) once on ``model``; return its ratios.

    diffusers prints the ratios at the end of the run and then forgets them; they are read from
    that output.
    """
    from diffusers import MagCacheConfig

    attached = _DiffusersAttached(model, MagCacheConfig(calibrate=True, num_inference_steps=steps))
    printed = io.StringIO()
    try:
        with attached.generation(), contextlib.redirect_stdout(printed):
            sample(model, digits, seeds, steps=steps)
    finally:
        attached.remove()
    found = re.search(r"Calibration Complete.*?\n\s*(\[[^\]]*\])", printed.getvalue(), re.DOTALL)
    if found is None:
        raise RuntimeError(f"diffusers' MagCache calibration printed no ratios: {printed.getvalue()[-300:]!r}")
    ratios = [float(r) for r in ast.literal_eval(found.group(1))]
    if len(ratios) != steps:
        raise RuntimeError(f"MagCache calibration gave {len(ratios)} ratios for {steps} steps")
    return ratios


def mag_cache_row(ratios: Sequence[float], steps: int, threshold: float = 0.06) -> CompareRow:
    """diffusers' MagCache with ratios calibrated on this model (defaults otherwise)."""
    from diffusers import MagCacheConfig

    def make() -> Any:
        return MagCacheConfig(threshold=threshold, num_inference_steps=steps, mag_ratios=list(ratios))

    setting = f"MagCacheConfig(threshold={threshold}, num_inference_steps={steps}, mag_ratios=<calibrated>)"
    return diffusers_row(f"diffusers magcache (threshold {threshold})", make, setting)


class _TimestepTracker:
    """Keeps the current timestep of the transformer's calls on diffusers' 0..1000 scale (for PAB)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.value = 1000.0
        self._handle = transformer.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        timestep = kwargs.get("timestep")
        if isinstance(timestep, torch.Tensor) and timestep.numel():
            self.value = float(timestep.reshape(-1)[0]) * 1000.0  # the digits sampler passes s in [0, 1]

    def __call__(self) -> float:
        return self.value

    def remove(self) -> None:
        self._handle.remove()


def pyramid_attention_row(skip_range: int = 2) -> CompareRow:
    """diffusers' Pyramid Attention Broadcast on every attention, timestep range (100, 800) as shipped."""
    from diffusers import PyramidAttentionBroadcastConfig

    def attach(model: DigitsModel) -> Attached:
        tracker = _TimestepTracker(model.transformer)
        config = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=skip_range, current_timestep_callback=tracker
        )
        return _DiffusersAttached(model, config, extra=tracker)

    setting = f"PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range={skip_range}, (100, 800))"
    return CompareRow(label="diffusers PAB", family="diffusers", setting=setting, attach=attach)


class _CacheDitAttached(Attached):
    def __init__(self, pristine: DigitsModel, options: dict[str, Any]) -> None:
        import cache_dit

        super().__init__(copy.deepcopy(pristine))
        cache_dit.enable_cache(self.model.transformer, **options)

    def steps_note(self) -> str:
        import cache_dit

        stats = cache_dit.summary(self.model.transformer, logging=False)
        cached = len(getattr(stats[0], "cached_steps", []) or []) if stats else 0
        return f"{cache_dit_steps(stats) - cached}/{cached}"

    def remove(self) -> None:
        import cache_dit

        cache_dit.disable_cache(self.model.transformer)


def cache_dit_steps(stats: Any) -> int:
    """Steps cache-dit executed in the last generation."""
    return int(getattr(stats[0], "accumulated_executed_steps", 0) or 0) if stats else 0


def cache_dit_row(model: DigitsModel, steps: int, threshold: float = 0.08, order: int = 1) -> CompareRow:
    """cache-dit's DBCache (first block computed, none at the end) with its TaylorSeer calibrator.

    ``Fn_compute_blocks=1, Bn_compute_blocks=0`` fit the 4-block model (cache-dit's default 8
    needs more blocks); CFG is batched (``enable_separate_cfg=False``); other settings are its
    defaults. Skipped, with the reason, when cache-dit is not importable.
    """
    label = f"cache-dit DBCache F1B0 + TaylorSeer O{order} (threshold {threshold})"
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")
    try:
        import cache_dit
    except ImportError as exc:
        reason = f"cache-dit is not installed ({exc}); install it with: pip install 'hicache-sdk[compare]'"
        return CompareRow(label=label, family="cache-dit", setting="-", attach=None, skipped=reason)
    cache_config = cache_dit.DBCacheConfig(
        Fn_compute_blocks=1,
        Bn_compute_blocks=0,
        residual_diff_threshold=threshold,
        enable_separate_cfg=False,
        num_inference_steps=steps,
    )
    calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=order)
    options = {"cache_config": cache_config, "calibrator_config": calibrator}
    pristine = copy.deepcopy(model)

    def attach(_: DigitsModel) -> Attached:
        return _CacheDitAttached(pristine, options)

    setting = f"{cache_config.strify()} + {calibrator.strify(details=True)}"
    return CompareRow(label=label, family="cache-dit", setting=setting, attach=attach)
