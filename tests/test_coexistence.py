"""Never two feature caches on one model: diffusers' caches and cache-dit are refused, naming both."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from diffusers import FirstBlockCacheConfig, FluxPipeline, TaylorSeerCacheConfig
from diffusers.hooks import apply_first_block_cache
from helpers import flux_pipeline, pipeline_call

import hicache_sdk as sdk
from hicache_sdk.errors import CacheConflictError

ACCELERATOR = sdk.compose("taylorseer", interval=3, warmup=1)

CONFIGS: dict[str, Callable[[], Any]] = {
    "taylorseer": lambda: TaylorSeerCacheConfig(cache_interval=3, taylor_factors_dtype=torch.float32),
    "first-block-cache": lambda: FirstBlockCacheConfig(threshold=0.2),
}


@pytest.fixture
def pipe() -> FluxPipeline:
    return flux_pipeline()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_applying_beside_an_enabled_diffusers_cache_names_both(pipe: FluxPipeline, name: str) -> None:
    config = CONFIGS[name]()
    pipe.transformer.enable_cache(config)
    with pytest.raises(CacheConflictError) as info:
        ACCELERATOR.apply(pipe)
    message = str(info.value)
    assert f"diffusers' {type(config).__name__}" in message
    assert "hicache taylorseer[taylor](interval=3, warmup=1" in message
    assert "disable_cache()" in message
    # nothing was attached: the diffusers cache alone runs, and after disabling it the SDK attaches
    pipeline_call(pipe, steps=4)
    pipe.transformer.disable_cache()
    with ACCELERATOR.apply(pipe) as handle:
        pipeline_call(pipe, steps=4)
        assert handle.summary().forecast_steps > 0


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_enabling_a_diffusers_cache_while_attached_names_both(pipe: FluxPipeline, name: str) -> None:
    config = CONFIGS[name]()
    with ACCELERATOR.apply(pipe):
        with pytest.raises(CacheConflictError, match=f"cannot enable {type(config).__name__} .* hicache taylorseer"):
            pipe.transformer.enable_cache(config)
        assert not pipe.transformer.is_cache_enabled
    pipe.transformer.enable_cache(config)  # detached: diffusers' own method again
    assert pipe.transformer.is_cache_enabled


def test_a_cache_hooked_without_enable_cache_is_refused_at_the_next_generation(pipe: FluxPipeline) -> None:
    with ACCELERATOR.apply(pipe):
        pipeline_call(pipe, steps=4)
        apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=0.2))
        with pytest.raises(
            CacheConflictError, match=r"diffusers' hook 'fbc_leader_block_hook' on transformer_blocks.0"
        ):
            pipeline_call(pipe, steps=4)


def test_outputs_equal_the_sdk_alone_when_nothing_else_is_enabled(pipe: FluxPipeline) -> None:
    """The guard costs nothing in behaviour: a run with the guard equals the same run repeated."""
    with ACCELERATOR.apply(pipe):
        first = pipeline_call(pipe, steps=6)
        second = pipeline_call(pipe, steps=6)
    assert torch.equal(first, second)


def test_a_model_cached_by_cache_dit_is_refused() -> None:
    pipe = flux_pipeline()
    vars(pipe.transformer)["_is_cached"] = True  # what cache_dit.enable_cache sets on the transformer
    with pytest.raises(CacheConflictError, match="cache-dit"):
        ACCELERATOR.apply(pipe)


def test_cache_dit_and_this_sdk_refuse_each_other() -> None:
    cache_dit = pytest.importorskip("cache_dit")
    model = flux_pipeline().transformer
    options = {
        "cache_config": cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, num_inference_steps=4),
    }
    cache_dit.enable_cache(model, **options)
    try:
        with pytest.raises(CacheConflictError, match=r"cache-dit \(enabled with cache_dit.enable_cache\)"):
            ACCELERATOR.apply(model)
    finally:
        cache_dit.disable_cache(model)
    pipe = flux_pipeline()  # a fresh model: cache-dit cannot undo its patches over this SDK's hooks
    with ACCELERATOR.apply(pipe):
        cache_dit.enable_cache(pipe.transformer, **options)
        with pytest.raises(CacheConflictError, match="cache-dit"):
            pipeline_call(pipe, steps=4)
