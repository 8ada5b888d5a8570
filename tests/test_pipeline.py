"""compose("clusca", basis="hermite") and friends in a stock FluxPipeline built offline, with true CFG."""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import FluxPipeline
from helpers import CallCounter, flux_modules, flux_pipeline, full_flux_pipeline, pipeline_call

import hicache_sdk as sdk

STEPS = 12
SIZE = 96  # 6 x 6 = 36 image tokens per sample, more than the 16 clusters of ClusCa's defaults


@pytest.fixture(scope="module")
def pipe() -> FluxPipeline:
    return flux_pipeline()


@pytest.fixture(scope="module")
def reference(pipe: FluxPipeline) -> torch.Tensor:
    return pipeline_call(pipe, steps=STEPS, cfg=True, size=SIZE)


def test_hi_clusca_in_one_line_with_true_cfg(pipe: FluxPipeline, reference: torch.Tensor) -> None:
    counter = CallCounter(flux_modules(pipe.transformer))
    with sdk.compose("clusca", basis="hermite").apply(pipe) as handle, counter.counting():
        out = pipeline_call(pipe, steps=STEPS, cfg=True, size=SIZE)
    summary = handle.summary()
    assert torch.isfinite(out).all()
    assert not torch.equal(out, reference)
    assert summary.contexts == ("cond", "uncond")
    assert summary.adapter == "flux"
    assert summary.policy.startswith("clusca[hermite(sigma=0.5)](interval=5, warmup=3")
    assert (summary.steps, summary.full_steps, summary.forecast_steps, summary.fallbacks) == (STEPS, 4, 8, 0)
    units = {u.key: u for u in summary.units}
    assert (units["transformer_blocks.1.ff"].computed, units["transformer_blocks.1.ff"].partial) == (8, 16)
    # per context: the image MLP sees all 36 tokens at the 4 full steps and 16 at the 8 forecast steps
    assert sorted(counter.rows["transformer_blocks.0.ff"]) == sorted([36] * 8 + [16] * 16)
    assert counter.calls["transformer_blocks.0.attn"] == 8
    assert counter.calls["single_transformer_blocks.0.proj_out"] == 8
    assert "contexts cond, uncond" in summary.table()
    assert 0.0 < summary.flops_saved_fraction < 1.0


@pytest.mark.parametrize(
    ("policy", "basis"),
    [("clusca", "hermite"), ("taylorseer", "hermite"), ("fora", "taylor"), ("taylorseer", "newton")],
)
def test_interval_one_in_the_pipeline_equals_no_cache(
    policy: str, basis: str, pipe: FluxPipeline, reference: torch.Tensor
) -> None:
    with sdk.compose(policy, basis=basis, interval=1).apply(pipe):
        out = pipeline_call(pipe, steps=STEPS, cfg=True, size=SIZE)
    assert torch.equal(out, reference)


def test_the_same_call_twice_gives_the_same_images(pipe: FluxPipeline) -> None:
    with sdk.compose("clusca", basis="hermite", interval=4).apply(pipe) as handle:
        first = pipeline_call(pipe, steps=STEPS, cfg=True, size=SIZE)
        second = pipeline_call(pipe, steps=STEPS, cfg=True, size=SIZE)
    assert torch.equal(first, second)
    assert handle.summary().steps == STEPS


def test_num_inference_steps_can_change_between_calls(pipe: FluxPipeline) -> None:
    acc = sdk.compose("clusca", basis="hermite", interval=3)
    with acc.apply(pipe) as handle:
        pipeline_call(pipe, steps=STEPS, cfg=True, size=SIZE)
        short = pipeline_call(pipe, steps=7, cfg=True, size=SIZE)
        summary = handle.summary()
    with acc.apply(pipe):
        fresh = pipeline_call(pipe, steps=7, cfg=True, size=SIZE)
    assert torch.equal(short, fresh)
    assert (summary.steps, summary.full_steps) == (7, 4)  # full at 0, 1, 2, 5 (W=3, N=3)


def test_detaching_restores_the_pipeline(pipe: FluxPipeline, reference: torch.Tensor) -> None:
    signature = inspect.signature(pipe.transformer.forward)
    with sdk.compose("taylorseer", basis="hermite", interval=4, max_order=2).apply(pipe):
        pipeline_call(pipe, steps=STEPS, cfg=True, size=SIZE)
    assert inspect.signature(pipe.transformer.forward) == signature
    assert "forward" not in vars(pipe.transformer)
    assert torch.equal(pipeline_call(pipe, steps=STEPS, cfg=True, size=SIZE), reference)


def test_clusca_with_a_batch_of_two_prompts(pipe: FluxPipeline) -> None:
    counter = CallCounter(flux_modules(pipe.transformer))
    with sdk.compose("clusca", basis="hermite", num_clusters=8).apply(pipe) as handle, counter.counting():
        out = pipeline_call(pipe, steps=8, cfg=True, batch=2, size=SIZE)
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    summary = handle.summary()
    assert (summary.full_steps, summary.forecast_steps) == (4, 4)
    # both samples of both contexts clustered their 36 tokens: every forecast step refreshed 8 tokens
    # per sample (a context without clusters of this batch's shape would refresh none)
    units = {u.key: u for u in summary.units}
    assert (units["transformer_blocks.1.ff"].partial, units["transformer_blocks.1.ff"].forecast) == (8, 8)
    rows = counter.rows["transformer_blocks.1.ff"]
    assert set(counter.batches["transformer_blocks.1.ff"]) == {2}
    assert sorted(rows) == sorted([36] * 8 + [8] * 8)  # 2 contexts x (4 full + 4 forecast) steps


def test_a_complete_pipeline_with_prompts_built_offline() -> None:
    pipe = full_flux_pipeline()
    kwargs = {
        "prompt": "a photo of a cat",
        "negative_prompt": "a dog",
        "true_cfg_scale": 3.0,
        "height": 32,
        "width": 32,
        "num_inference_steps": 10,
        "max_sequence_length": 8,
    }
    plain = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="np").images
    with sdk.compose("clusca", basis="hermite", num_clusters=8).apply(pipe) as handle:
        images = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="pil").images
        cached = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="np").images
    summary = handle.summary()
    assert images[0].size == (32, 32)
    assert summary.contexts == ("cond", "uncond")
    assert (summary.full_steps, summary.forecast_steps) == (4, 6)
    assert cached.shape == plain.shape and not (cached == plain).all()
