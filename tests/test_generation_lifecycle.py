"""A failed or interrupted generation never leaks into the next one; what the SDK counts as a step.

Every case compares the call after a failure with the same call on a fresh handle, bit for bit,
and the summary with the fresh run's summary (so it describes only what ran).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from diffusers import FlowMatchHeunDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from helpers import flux_inputs, flux_pipeline, pipeline_call, run_loop, tiny_flux

import hicache_sdk as sdk
from hicache_sdk.errors import InvalidParameterError

ACCELERATOR = sdk.compose("taylorseer", interval=3, warmup=1, max_order=2)


class Boom(Exception):
    pass


@contextmanager
def failing_forward(model: FluxTransformer2DModel, at_call: int, error: BaseException) -> Iterator[None]:
    """Raise ``error`` inside the ``at_call``-th transformer forward (0-based), deep in its first block."""
    calls = [0]

    def hook(module: torch.nn.Module, args: Any) -> None:
        calls[0] += 1
        if calls[0] - 1 == at_call:
            raise error

    handle = model.transformer_blocks[0].norm1.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def fresh(run: Callable[[], torch.Tensor], model: FluxTransformer2DModel) -> tuple[torch.Tensor, Any]:
    with ACCELERATOR.apply(model) as handle:
        out = run()
        return out, handle.summary()


# -- pipelines -------------------------------------------------------------------------------------
@pytest.fixture
def pipe() -> FluxPipeline:
    return flux_pipeline()


CALLS: dict[str, Callable[[FluxPipeline], torch.Tensor]] = {
    "same resolution": lambda p: pipeline_call(p, steps=8),
    "another resolution": lambda p: pipeline_call(p, steps=8, size=96),
    "cfg off after cfg on": lambda p: pipeline_call(p, steps=8),
}


@pytest.mark.parametrize("at_call", [0, 1, 5])
@pytest.mark.parametrize("next_call", sorted(CALLS))
@pytest.mark.parametrize("error", [Boom("inside the forward"), KeyboardInterrupt()], ids=["exception", "interrupt"])
def test_after_a_failed_call_the_next_equals_a_fresh_run(
    pipe: FluxPipeline, at_call: int, next_call: str, error: BaseException
) -> None:
    run = CALLS[next_call]
    expected, expected_summary = fresh(lambda: run(pipe), pipe.transformer)
    failing = (lambda: pipeline_call(pipe, steps=8, cfg=True)) if next_call.startswith("cfg") else None
    with ACCELERATOR.apply(pipe) as handle:
        with failing_forward(pipe.transformer, at_call, error), pytest.raises(type(error)):
            (failing or (lambda: pipeline_call(pipe, steps=8)))()
        got = run(pipe)
        summary = handle.summary()
    assert torch.equal(got, expected)
    assert summary == expected_summary  # steps, contexts (no stale "uncond"), unit counts, FLOPs, bytes
    assert summary.steps == 8


def test_a_failed_first_step_leaves_nothing_behind(pipe: FluxPipeline) -> None:
    expected, expected_summary = fresh(lambda: pipeline_call(pipe, steps=6), pipe.transformer)
    with ACCELERATOR.apply(pipe) as handle:
        for _ in range(3):  # repeated failures at the very first forward
            with failing_forward(pipe.transformer, 0, Boom()), pytest.raises(Boom):
                pipeline_call(pipe, steps=6)
        assert handle.summary().steps == 1  # the summary describes what ran: one (failed) step
        got = pipeline_call(pipe, steps=6)
        assert handle.summary() == expected_summary
    assert torch.equal(got, expected)


# -- bare loops ------------------------------------------------------------------------------------
def test_bare_loop_interrupted_then_restarted_at_a_lower_noise_level() -> None:
    """An img2img-like run starting below where the interrupted one stopped is a new generation."""
    model = tiny_flux()
    inputs = flux_inputs()

    def low_start() -> torch.Tensor:
        return run_loop(model, inputs, steps=10, scale=0.5)

    expected, expected_summary = fresh(low_start, model)
    with ACCELERATOR.apply(model) as handle:
        with failing_forward(model, 10, KeyboardInterrupt()), pytest.raises(KeyboardInterrupt):
            run_loop(model, inputs, steps=20)  # interrupted at step 10, noise level 0.5
        got = low_start()
        assert handle.summary() == expected_summary
    assert torch.equal(got, expected)


def test_bare_loop_at_another_resolution_after_a_failure() -> None:
    model = tiny_flux()

    def small() -> torch.Tensor:
        return run_loop(model, flux_inputs(side=2), steps=7)

    expected, _ = fresh(small, model)
    with ACCELERATOR.apply(model):
        with failing_forward(model, 4, Boom()), pytest.raises(Boom):
            run_loop(model, flux_inputs(side=4), steps=7)
        assert torch.equal(small(), expected)


def test_new_input_shapes_start_a_new_generation_without_a_failure() -> None:
    """A bare loop that changes resolution while the noise level keeps falling is not continued."""
    model = tiny_flux()
    expected, _ = fresh(lambda: run_loop(model, flux_inputs(side=2), steps=6, scale=0.4), model)
    with ACCELERATOR.apply(model):
        run_loop(model, flux_inputs(side=4), steps=6)  # ends at noise level 1/6 < 0.4... then:
        got = run_loop(model, flux_inputs(side=2), steps=6, scale=0.1)  # lower start, other shapes
        assert torch.equal(run_loop(model, flux_inputs(side=2), steps=6, scale=0.4), expected)
    assert got.shape[-2] == 4


# -- the sampler contract ----------------------------------------------------------------------------
def heun_loop(model: FluxTransformer2DModel, steps: int) -> tuple[torch.Tensor, Any]:
    """diffusers' second-order FlowMatchHeunDiscreteScheduler driving ``model`` in a bare loop."""
    scheduler = FlowMatchHeunDiscreteScheduler()
    scheduler.set_timesteps(steps)
    inputs = flux_inputs(side=2)
    latent = inputs.pop("hidden_states")
    levels = []
    with ACCELERATOR.apply(model) as handle, torch.no_grad():
        for t in scheduler.timesteps:
            levels.append(float(t))
            out = model(**inputs, hidden_states=latent, timestep=(t / 1000).reshape(1), return_dict=False)[0]
            latent = scheduler.step(out, t, latent).prev_sample
        summary = handle.summary()
    return latent, (summary, levels)


def test_a_heun_sampler_is_one_generation_of_one_step_per_call() -> None:
    """Heun evaluates every level after the first twice: one generation, every call one step, and
    caching keeps working (a new generation on an equal level would turn it off)."""
    model = tiny_flux(num_layers=1, num_single_layers=1)
    _, (summary, levels) = heun_loop(model, 6)
    assert len(levels) == 11 and len(set(levels)) == 6  # repeated levels, as the contract says
    assert summary.steps == 11
    assert (summary.full_steps, summary.forecast_steps) == (4, 7)  # reference schedule N=3, W=1: calls 0, 3, 6, 9


def test_a_rising_noise_level_starts_a_new_generation() -> None:
    model = tiny_flux(num_layers=1, num_single_layers=1)
    inputs = flux_inputs(side=2)
    with ACCELERATOR.apply(model) as handle:
        run_loop(model, inputs, steps=5)
        run_loop(model, inputs, steps=4)
        assert handle.summary().steps == 4


# -- always-full tail ----------------------------------------------------------------------------------
@pytest.mark.parametrize("tail", [0, 1, 3])
def test_tail_computes_the_last_steps_of_a_pipeline_call(pipe: FluxPipeline, tail: int) -> None:
    seen: list[tuple[int, str]] = []
    accelerator = sdk.compose("taylorseer", interval=4, warmup=1, tail=tail)
    with accelerator.apply(pipe) as handle:
        handle.add_observer(
            lambda ctx, step, key, how, out: seen.append((step, how)) if key.endswith("0.attn") else None
        )
        pipeline_call(pipe, steps=10)
        summary = handle.summary()
    computed = [step for step, how in seen if how == "computed"]
    schedule = [0, 4, 8]  # reference schedule, N=4, W=1
    assert computed == sorted(set(schedule) | set(range(10 - tail, 10)))
    assert summary.full_steps == len(computed)


def test_tail_in_a_bare_loop_needs_the_number_of_steps() -> None:
    model = tiny_flux(num_layers=1, num_single_layers=1)
    inputs = flux_inputs(side=2)
    accelerator = sdk.compose("taylorseer", interval=4, warmup=1, tail=2)
    with accelerator.apply(model) as handle:
        with pytest.raises(InvalidParameterError, match=r"tail=2 .* number of steps .* handle.reset\(num_steps=...\)"):
            run_loop(model, inputs, steps=10)
        handle.reset(num_steps=10)
        run_loop(model, inputs, steps=10)
        summary = handle.summary()
    assert (summary.steps, summary.full_steps) == (10, 4)  # 0, 4, 8 and the tail 8, 9


def test_tail_must_be_a_non_negative_integer() -> None:
    with pytest.raises(InvalidParameterError, match="tail must be >= 0, got -1"):
        sdk.compose("fora", tail=-1)
    with pytest.raises(InvalidParameterError, match="num_steps must be >= 1, got 0"):
        model = tiny_flux(num_layers=1, num_single_layers=1)
        with sdk.compose("fora").apply(model) as handle:
            handle.reset(num_steps=0)


# -- pipelines that describe their loop in the cache context (Wan, LTX) ---------------------------------
def described_loop(model: FluxTransformer2DModel, steps: int, scale: float = 1.0, stop_at: int | None = None) -> Any:
    """A loop passing ``step_index`` and ``num_inference_steps`` in its cache context, as Wan's pipeline
    does; with ``stop_at`` it raises between two steps (outside any transformer forward)."""
    inputs = flux_inputs(side=2)
    latent = inputs.pop("hidden_states")
    outputs = []
    with torch.no_grad():
        for i in range(steps):
            if i == stop_at:
                raise Boom("a callback between two steps")
            level = scale * (1.0 - i / steps)
            with model.cache_context("cond", step_index=i, num_inference_steps=steps):
                out = model(**inputs, hidden_states=latent, timestep=torch.tensor([level]), return_dict=False)[0]
            outputs.append(out)
            latent = latent - out / steps
    return torch.stack(outputs)


def test_a_loop_index_back_at_zero_starts_a_new_generation() -> None:
    """A failure between two steps (no forward raised) followed by a lower-noise run is still a new
    generation when the pipeline passes its loop index."""
    model = tiny_flux(num_layers=1, num_single_layers=1)
    expected, expected_summary = fresh(lambda: described_loop(model, 8, scale=0.3), model)
    with ACCELERATOR.apply(model) as handle:
        with pytest.raises(Boom):
            described_loop(model, 8, stop_at=6)
        got = described_loop(model, 8, scale=0.3)
        assert handle.summary() == expected_summary
    assert torch.equal(got, expected)


def test_tail_reads_the_number_of_steps_from_the_cache_context() -> None:
    model = tiny_flux(num_layers=1, num_single_layers=1)
    with sdk.compose("taylorseer", interval=4, warmup=1, tail=3).apply(model) as handle:
        described_loop(model, 12)
        summary = handle.summary()
    assert (summary.steps, summary.full_steps) == (12, 6)  # 0, 4, 8 and the tail 9, 10, 11


def test_the_embedded_models_sampler_announces_its_steps() -> None:
    from hicache_sdk.models import load_digits_model, sample

    model = load_digits_model()
    with sdk.compose("taylorseer", interval=4, warmup=1, tail=2).apply(model.transformer) as handle:
        assert sdk.accelerator.handle_of(model.transformer) is handle
        sample(model, [1], [0], steps=9)
        summary = handle.summary()
    assert (summary.steps, summary.full_steps) == (9, 4)  # 0, 4, 8 and the tail 7, 8
    assert sdk.accelerator.handle_of(model.transformer) is None
