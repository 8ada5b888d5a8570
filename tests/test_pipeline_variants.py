"""The pipeline variants users run, on tiny hub-free pipelines (tests/tiny_pipelines.py).

img2img and inpainting start mid-schedule; editing pipelines concatenate reference-image tokens
to the latents; a bare loop may change its token count mid-run or call the transformer without
``cache_context``; guidance-distilled Flux runs one context; Wan 2.2 passes a generation from
one transformer to the other; a user-modified block sends the model to the generic adapter.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import numpy as np
import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanTransformerBlock
from helpers import flux_inputs, flux_prompt, run_loop, timesteps, tiny_flux, tiny_wan, wan_inputs
from tiny_pipelines import (
    flux_edit_call,
    flux_guidance_pipeline,
    flux_img2img_pipeline,
    flux_inpaint_pipeline,
    flux_kontext_pipeline,
    guidance_call,
    input_mask,
    qwenimage_edit_call,
    qwenimage_edit_pipeline,
    wan22_call,
    wan22_pipeline,
)

import hicache_sdk as sdk
from hicache_sdk.accelerator import handle_of
from hicache_sdk.testing.families import FAMILY_CASES


# -- observing -------------------------------------------------------------------------------------
class Events:
    """An observer keeping every served unit, in order: ``(call, context, step, key, how)``.

    ``call`` is the index of the transformer call (set by :meth:`counting`'s forward pre-hook), so
    events stay apart when the runtime's step counter restarts (a new generation).
    """

    def __init__(self) -> None:
        self.rows: list[tuple[int, str, int, str, str]] = []
        self.calls = 0

    def __call__(self, context: str, step: int, key: str, how: str, outputs: tuple[torch.Tensor, ...]) -> None:
        self.rows.append((self.calls - 1, context, step, key, how))

    @contextmanager
    def counting(self, *models: torch.nn.Module) -> Iterator[Events]:
        def hook(module: torch.nn.Module, args: Any, kwargs: Any) -> None:
            self.calls += 1

        handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in models]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def how(self, *, call: int | None = None, step: int | None = None, context: str | None = None) -> dict[str, str]:
        """``key -> how`` of the units served at one transformer call (or one step of one context)."""
        return {
            key: how
            for c, ctx, s, key, how in self.rows
            if (call is None or c == call) and (step is None or s == step) and (context is None or ctx == context)
        }

    def forecast_steps(self, context: str) -> list[int]:
        return sorted({s for _, ctx, s, _, how in self.rows if ctx == context and how == "forecast"})


def transformer_calls(model: torch.nn.Module) -> tuple[list[dict[str, Any]], Callable[[], None]]:
    """Keyword arguments of every forward of ``model`` (a pre-hook), and the function removing the hook."""
    seen: list[dict[str, Any]] = []

    def hook(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        seen.append(dict(kwargs))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen, handle.remove


def no_hooks_left(model: torch.nn.Module) -> list[str]:
    """Names of the modules of ``model`` that still carry a hook registry or an instance ``forward``."""
    return [
        name or "<model>"
        for name, module in model.named_modules()
        if hasattr(module, "_diffusers_hook") or "forward" in vars(module) or hasattr(module, "_hicache_handle")
    ]


# -- 1, 2: img2img, inpainting, editing with reference tokens ---------------------------------------
@attrs.frozen
class Variant:
    """A pipeline variant: how to build and call it, and what its transformer sees.

    ``calls``: transformer calls of one call (``strength=0.6`` of 20 steps starts at step 8: 12
    calls); ``tokens``: image tokens the transformer sees (edits add the reference image's);
    ``context``: the context its calls run in (Flux's image pipelines call no ``cache_context``);
    ``partial``: the run starts mid-schedule, below noise level 1.
    """

    build: Callable[[], Any]
    call: Callable[..., Any]
    steps: int
    calls: int
    tokens: int
    output_tokens: int
    context: str
    partial: bool = False


VARIANTS = {
    "img2img": Variant(
        flux_img2img_pipeline,
        lambda pipe, **kw: flux_edit_call(pipe, strength=0.6, **kw),
        steps=20,
        calls=12,
        tokens=64,
        output_tokens=64,
        context="default",
        partial=True,
    ),
    "inpaint": Variant(
        flux_inpaint_pipeline,
        lambda pipe, **kw: flux_edit_call(pipe, strength=0.6, mask_image=input_mask(), **kw),
        steps=20,
        calls=12,
        tokens=64,
        output_tokens=64,
        context="default",
        partial=True,
    ),
    "kontext": Variant(
        flux_kontext_pipeline,
        lambda pipe, **kw: flux_edit_call(pipe, _auto_resize=False, max_area=32 * 32, **kw),
        steps=12,
        calls=12,
        tokens=64 + 64,
        output_tokens=64,
        context="default",
    ),
    "qwenimage_edit": Variant(
        qwenimage_edit_pipeline,
        lambda pipe, **kw: qwenimage_edit_call(pipe, **kw),
        steps=12,
        calls=12,
        tokens=4 + 1024,
        output_tokens=4,
        context="cond",
    ),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request: pytest.FixtureRequest) -> tuple[Variant, Any, torch.Tensor]:
    """``(variant, pipeline, uncached latents)``, built once per variant."""
    spec = VARIANTS[request.param]
    pipe = spec.build()
    return spec, pipe, spec.call(pipe, steps=spec.steps)


def test_interval_one_equals_the_uncached_pipeline(variant: tuple[Variant, Any, torch.Tensor]) -> None:
    spec, pipe, reference = variant
    assert reference.shape[1] == spec.output_tokens
    with sdk.compose("fora", interval=1).apply(pipe) as handle:
        out = spec.call(pipe, steps=spec.steps)
    assert torch.equal(out, reference)
    assert handle.summary().steps == spec.calls


@pytest.mark.parametrize("name", ["img2img", "inpaint"])
def test_partial_denoise_decoded_images_equal_at_interval_one(name: str) -> None:
    """The decoded images (not only the latents) of a run that starts mid-schedule, bit for bit."""
    spec = VARIANTS[name]
    pipe = spec.build()
    plain = spec.call(pipe, steps=spec.steps, output_type="np")
    with sdk.compose("fora", interval=1).apply(pipe):
        cached = spec.call(pipe, steps=spec.steps, output_type="np")
    assert isinstance(cached, np.ndarray) and cached.shape == plain.shape == (1, 32, 32, 3)
    assert (cached == plain).all()


def test_forecasts_and_counts_the_steps_it_runs(variant: tuple[Variant, Any, torch.Tensor]) -> None:
    """Forecasts, one step per transformer call, and the right number of steps for the policy.

    With ``tail=1`` the last call must compute: under interval 2 and warm-up 3 it is a forecast
    step (11 is odd), so only a policy told the generation has ``calls`` steps makes it full.
    """
    spec, pipe, reference = variant
    events = Events()
    seen, unhook = transformer_calls(pipe.transformer)
    try:
        with sdk.compose("taylorseer", interval=2, tail=1).apply(pipe) as handle, events.counting(pipe.transformer):
            handle.add_observer(events)
            out = spec.call(pipe, steps=spec.steps)
            total_steps = {name: ctx.total_steps for name, ctx in handle.runtime.contexts.items()}
    finally:
        unhook()
    summary = handle.summary()
    assert len(seen) == events.calls == spec.calls
    assert {kw["hidden_states"].shape[1] for kw in seen} == {spec.tokens}
    assert (float(seen[0]["timestep"][0]) < 0.9) == spec.partial  # Flux and Qwen-Image take sigma
    assert torch.isfinite(out).all() and out.shape == reference.shape
    assert not torch.equal(out, reference)
    assert summary.contexts == (spec.context,)
    assert summary.steps == spec.calls
    assert total_steps == {spec.context: spec.calls}
    # warm-up 0, 1, 2; then full every 2nd step from 2 on; the last step full by the tail
    assert events.forecast_steps(spec.context) == [3, 5, 7, 9]
    assert (summary.full_steps, summary.forecast_steps) == (8, 4)
    assert set(events.how(step=spec.calls - 1).values()) == {"computed"}
    assert summary.fallbacks == 0


def test_img2img_with_true_cfg_keeps_cond_and_uncond_apart() -> None:
    """docs/concepts.md: "CFG in two calls is two contexts", each with one step per denoising step."""
    spec = VARIANTS["img2img"]
    pipe = spec.build()
    cfg = {"true_cfg_scale": 2.0, **flux_prompt(seed=1, negative=True)}
    with sdk.compose("taylorseer", interval=2).apply(pipe) as handle:
        spec.call(pipe, steps=spec.steps, **cfg)
    summary = handle.summary()
    assert len(summary.contexts) == 2
    assert summary.steps == spec.calls  # 12 denoising steps per context, not 24 interleaved calls


# -- 3: a token count that changes within a generation ----------------------------------------------
STEPS = 10
CHANGE = 5  # the step at which the loop grows its latents


def _wan_grow(latent: torch.Tensor, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """One more latent frame (2 -> 3 frames: 32 -> 48 tokens)."""
    return torch.cat([latent, latent[:, :, -1:]], dim=2), inputs


def _flux_grow(latent: torch.Tensor, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """4 x 4 -> 5 x 5 image tokens (new tokens appended, position ids of the larger grid)."""
    bigger = flux_inputs(side=5, seed=1)
    grown = torch.cat([latent, bigger["hidden_states"][:, latent.shape[1] :]], dim=1)
    return grown, {**inputs, "img_ids": bigger["img_ids"]}


def _wan_case() -> tuple[torch.nn.Module, dict[str, Any], float, Any]:
    inputs = FAMILY_CASES["wan"].inputs(1, 1.0, 0)
    del inputs["timestep"], inputs["return_dict"]
    return FAMILY_CASES["wan"].build(), inputs, 1000.0, _wan_grow


def _flux_case() -> tuple[torch.nn.Module, dict[str, Any], float, Any]:
    return tiny_flux(), flux_inputs(), 1.0, _flux_grow


GROWING = {"wan": _wan_case, "flux": _flux_case}


def growing_loop(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    scale: float,
    grow: Any,
    record: list[dict[str, Any]],
    change: int = CHANGE,
) -> list[torch.Tensor]:
    """A bare Euler loop whose token count grows at step ``change`` while the noise level keeps falling."""
    latent = inputs["hidden_states"].clone()
    levels = timesteps(STEPS)
    outputs = []
    with torch.no_grad():
        for step, level in enumerate(levels):
            if step == change:
                latent, inputs = grow(latent, inputs)
            call = {**inputs, "hidden_states": latent, "timestep": torch.full((1,), scale * level)}
            record.append(call)
            out = model(**call, return_dict=False)[0]
            outputs.append(out)
            nxt = levels[step + 1] if step + 1 < STEPS else 0.0
            latent = latent + (nxt - level) * out
    return outputs


@pytest.mark.parametrize("family", list(GROWING))
def test_a_token_count_that_changes_mid_run_recomputes_then_forecasts_again(family: str) -> None:
    model, inputs, scale, grow = GROWING[family]()
    events = Events()
    record: list[dict[str, Any]] = []
    with sdk.compose("taylorseer", interval=2).apply(model) as handle, events.counting(model):
        handle.add_observer(events)
        outputs = growing_loop(model, inputs, scale, grow, record)
    assert events.calls == STEPS
    assert all(torch.isfinite(o).all() for o in outputs)
    assert outputs[CHANGE].numel() > outputs[CHANGE - 1].numel()
    assert "forecast" in events.how(call=CHANGE - 2).values()  # step 3 forecast before the change
    assert set(events.how(call=CHANGE).values()) == {"computed"}
    with torch.no_grad():
        plain = model(**record[CHANGE], return_dict=False)[0]
    assert torch.equal(outputs[CHANGE], plain)
    later = [call for call in range(CHANGE + 1, STEPS) if "forecast" in events.how(call=call).values()]
    assert later, "nothing was forecast after the token count changed"


def test_a_token_count_change_keeps_the_last_step_full_with_a_tail() -> None:
    """``tail=1``: the last of the run's ``STEPS`` calls computes, whatever happened before it.

    The loop announces its steps with ``handle.reset(num_steps=STEPS)`` (as documented for a bare
    loop with a tail); its tokens grow at call 4, and the last call (9) is the 6th after the change:
    a forecast step of the schedule (interval 2, warm-up 3) unless the tail makes it full.
    """
    model, inputs, scale, grow = GROWING["flux"]()
    events = Events()
    with sdk.compose("taylorseer", interval=2, tail=1).apply(model) as handle, events.counting(model):
        handle.add_observer(events)
        handle.reset(num_steps=STEPS)
        growing_loop(model, inputs, scale, grow, [], change=4)
    assert "forecast" in events.how(call=STEPS - 3).values()  # call 7: forecasting goes on after the change
    assert set(events.how(call=STEPS - 1).values()) == {"computed"}


# -- 4: a bare loop without cache_context -------------------------------------------------------------
@pytest.mark.parametrize("family", ["flux", "wan"])
def test_a_bare_loop_without_contexts_forecasts_and_restarts_each_run(family: str) -> None:
    model, inputs = (tiny_flux(), flux_inputs()) if family == "flux" else (tiny_wan(), wan_inputs())
    plain = run_loop(model, inputs, steps=STEPS)
    with sdk.compose("fora", interval=1).apply(model):
        exact = run_loop(model, inputs, steps=STEPS)
    assert torch.equal(exact, plain)
    with sdk.compose("taylorseer", interval=2).apply(model) as handle:
        first = run_loop(model, inputs, steps=STEPS)
        after_first = handle.summary()
        second = run_loop(model, inputs, steps=STEPS)  # the noise level rises back to 1: a new generation
        after_second = handle.summary()
    with sdk.compose("taylorseer", interval=2).apply(model):
        fresh = run_loop(model, inputs, steps=STEPS)
    assert torch.isfinite(first).all() and not torch.equal(first, plain)
    assert torch.equal(first, second) and torch.equal(first, fresh)
    for summary in (after_first, after_second):
        assert summary.contexts == ("default",)
        assert (summary.steps, summary.full_steps, summary.forecast_steps) == (STEPS, 6, 4)


# -- 5: guidance-distilled Flux without CFG ------------------------------------------------------------
def test_guidance_distilled_flux_without_cfg() -> None:
    pipe = flux_guidance_pipeline()
    reference = guidance_call(pipe, steps=STEPS)
    with sdk.compose("fora", interval=1).apply(pipe):
        exact = guidance_call(pipe, steps=STEPS)
    assert torch.equal(exact, reference)
    seen, unhook = transformer_calls(pipe.transformer)
    try:
        with sdk.compose("taylorseer", interval=2).apply(pipe) as handle:
            out = guidance_call(pipe, steps=STEPS)
    finally:
        unhook()
    summary = handle.summary()
    assert len(seen) == STEPS
    assert all(torch.equal(kw["guidance"], torch.tensor([3.5])) for kw in seen)
    assert summary.contexts == ("cond",)
    assert summary.adapter == "flux"
    assert (summary.steps, summary.full_steps, summary.forecast_steps) == (STEPS, 6, 4)
    assert torch.isfinite(out).all() and not torch.equal(out, reference)


# -- 6: Wan 2.2, two transformers --------------------------------------------------------------------
WAN22_STEPS = 12
SWITCH = 5  # timesteps 999, 970, 937, 900, 857 >= 850 on `transformer`; 807, ... on `transformer_2`


@pytest.fixture(scope="module")
def wan22() -> tuple[Any, torch.Tensor]:
    pipe = wan22_pipeline()
    return pipe, wan22_call(pipe, steps=WAN22_STEPS)


def test_wan22_interval_one_equals_the_uncached_pipeline(wan22: tuple[Any, torch.Tensor]) -> None:
    pipe, reference = wan22
    with sdk.compose("fora", interval=1).apply(pipe) as handle:
        out = wan22_call(pipe, steps=WAN22_STEPS)
    assert torch.equal(out, reference)
    assert handle.summary().steps == WAN22_STEPS


def test_wan22_serves_both_transformers_in_one_generation(wan22: tuple[Any, torch.Tensor]) -> None:
    pipe, reference = wan22
    events = Events()
    first_seen, unhook_first = transformer_calls(pipe.transformer)
    second_seen, unhook_second = transformer_calls(pipe.transformer_2)
    try:
        with sdk.compose("taylorseer", interval=2).apply(pipe) as handle:
            stop_observing = handle.add_observer(events)
            first = wan22_call(pipe, steps=WAN22_STEPS)
            stop_observing()
            summary = handle.summary()
            split = (len(first_seen), len(second_seen))
            second = wan22_call(pipe, steps=WAN22_STEPS)
    finally:
        unhook_first()
        unhook_second()
    # both experts ran, each in both contexts: the split is where the boundary says
    assert split == (2 * SWITCH, 2 * (WAN22_STEPS - SWITCH))
    assert torch.isfinite(first).all() and not torch.equal(first, reference)
    assert torch.equal(first, second)  # nothing leaks from one call into the next
    assert summary.contexts == ("cond", "uncond")
    assert summary.steps == WAN22_STEPS
    assert summary.adapter == "wan"
    units = {u.key: u for u in summary.units}
    own = {k for k in units if not k.startswith("transformer_2.")}
    other = {k for k in units if k.startswith("transformer_2.")}
    expected = {f"blocks.{b}.{m}" for b in range(2) for m in ("attn1", "attn2", "ffn")}
    assert own == expected
    assert other == {f"transformer_2.{k}" for k in expected}
    # `transformer`: full 0, 1, 2, 4, forecast 3; `transformer_2`: step 5 (a forecast step of the
    # schedule) computes in full as the switch, then full 6, 8, 10 and forecast 7, 9, 11; per context
    assert all((units[k].computed, units[k].forecast) == (2 * 4, 2 * 1) for k in own)
    assert all((units[k].computed, units[k].forecast) == (2 * 4, 2 * 3) for k in other)
    for context in ("cond", "uncond"):
        at_switch = events.how(step=SWITCH, context=context)
        assert set(at_switch) == other and set(at_switch.values()) == {"computed"}
        assert set(events.how(step=SWITCH + 2, context=context).values()) == {"forecast"}
        assert set(events.how(step=SWITCH - 2, context=context).values()) == {"forecast"}
        assert f"{context}: denoiser switched to transformer_2: that step computed in full (1 steps)" in summary.notes
    assert (summary.full_steps, summary.forecast_steps) == (WAN22_STEPS - 4, 4)


def test_wan22_remove_restores_both_transformers(wan22: tuple[Any, torch.Tensor]) -> None:
    pipe, reference = wan22
    handle = sdk.compose("taylorseer", interval=2).apply(pipe)
    wan22_call(pipe, steps=WAN22_STEPS)
    assert handle_of(pipe) is handle
    assert [model for model, _ in handle.denoisers] == [pipe.transformer, pipe.transformer_2]
    handle.remove()
    assert handle_of(pipe) is None
    assert no_hooks_left(pipe.transformer) == []
    assert no_hooks_left(pipe.transformer_2) == []
    assert torch.equal(wan22_call(pipe, steps=WAN22_STEPS), reference)
    with sdk.compose("fora", interval=1).apply(pipe):  # both can be served again
        assert torch.equal(wan22_call(pipe, steps=WAN22_STEPS), reference)


# -- 7: a user-modified block -------------------------------------------------------------------------
class HalvedWanBlock(WanTransformerBlock):
    """A user's block: diffusers' Wan block with its output halved."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().forward(hidden_states, *args, **kwargs) * 0.5


def _subclassed(model: Any) -> str:
    model.blocks[0].__class__ = HalvedWanBlock
    return "blocks.0 is a HalvedWanBlock, not one of its stock blocks (WanTransformerBlock)"


def _patched(model: Any) -> str:
    original = model.blocks[1].forward

    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return original(hidden_states, *args, **kwargs) * 0.5

    model.blocks[1].forward = forward
    return "blocks.1 (WanTransformerBlock) does not run the stock forward (a modified block)"


def _wrapped(model: Any) -> str:
    original = model.blocks[1].forward
    model.blocks[1].forward = lambda *args, **kwargs: original(*args, **kwargs) * 0.5
    return "blocks.1 (WanTransformerBlock) does not run the stock forward (a modified block)"


MODIFICATIONS = {"subclass": _subclassed, "instance_forward": _patched, "args_kwargs_wrapper": _wrapped}


@pytest.mark.parametrize(
    "how",
    [
        "subclass",
        "instance_forward",
        "args_kwargs_wrapper",
    ],
)
def test_a_modified_block_falls_back_to_the_generic_adapter(how: str) -> None:
    model = tiny_wan()
    stock = run_loop(model, wan_inputs(), steps=8)
    reason = MODIFICATIONS[how](model)
    modified_forward = model.blocks[1].forward if how != "subclass" else None
    plain = run_loop(model, wan_inputs(), steps=8)
    assert not torch.equal(plain, stock)  # the modification changes the outputs

    with pytest.raises(sdk.AdapterMismatchError, match=re.escape(reason)):
        sdk.compose("taylorseer", adapter="wan").apply(model)
    assert no_hooks_left(model) == ([] if how == "subclass" else ["blocks.1"])  # a refused apply leaves nothing

    with sdk.compose("taylorseer", interval=2).apply(model) as handle:
        out = run_loop(model, wan_inputs(), steps=8)
    summary = handle.summary()
    assert summary.adapter == "generic"
    assert f"adapter 'generic' chosen automatically: the wan adapter does not fit WanTransformer3DModel: {reason}" in (
        summary.notes
    )
    assert summary.notes == handle.notes
    assert torch.isfinite(out).all() and summary.forecast_steps == 3  # full 0, 1, 2, 4, 6; forecast 3, 5, 7
    with sdk.compose("fora", interval=1).apply(model):
        assert torch.equal(run_loop(model, wan_inputs(), steps=8), plain)
    # removing restores the user's block as it was
    if modified_forward is not None:
        assert model.blocks[1].forward is modified_forward
    else:
        assert type(model.blocks[0]) is HalvedWanBlock
    assert torch.equal(run_loop(model, wan_inputs(), steps=8), plain)
