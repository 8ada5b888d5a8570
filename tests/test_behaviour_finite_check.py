"""A forecast that is not finite in any one of a unit's outputs is recomputed (a fallback), never served.

The poison is an overflow in low-precision storage, on the *second* output of a two-output unit: the
text stream of a Flux double-stream attention (streams ``img``, ``txt``), and the image stream of an
SD3 joint block on the generic adapter (outputs ``encoder_hidden_states``, ``hidden_states``). One
projection's weights are scaled up so that this stream's values exceed float16's largest (65504)
while staying finite in the float32 model (the layer norms downstream absorb them); float16 ladders
store them as infinities, so every forecast of that unit is non-finite in that stream only.

Checked from outside: the summary's counts, the poisoned module's calls, what the runtime served
(``handle.add_observer``) and the model output. (On Flux the text stream of a forecast step feeds only
units that are forecast too, so a served infinity stays in the text tokens; SD3's image stream
reaches the model output.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
from helpers import CallCounter, UnitRecorder, flux_inputs, run_loop, sd3_inputs, tiny_flux, tiny_sd3

import hicache_sdk as sdk

STEPS = 10
FULL = [0, 3, 6, 9]  # interval 3, warm-up 1
FLOAT16_MAX = 65504.0


class Poisoned(NamedTuple):
    model: torch.nn.Module
    inputs: dict[str, Any]
    scale: float  # timestep scale of the loop
    key: str  # the poisoned unit
    module: torch.nn.Module  # what computes it


def poisoned_flux() -> Poisoned:
    model = tiny_flux()
    with torch.no_grad():
        model.transformer_blocks[0].attn.to_add_out.weight.mul_(1e6)  # the text attention output
    return Poisoned(model, flux_inputs(batch=2), 1.0, "transformer_blocks.0.attn", model.transformer_blocks[0].attn)


def poisoned_sd3() -> Poisoned:
    model = tiny_sd3()
    with torch.no_grad():
        model.transformer_blocks[0].ff.net[2].weight.mul_(1e6)  # the image MLP, hence the image residual
    return Poisoned(model, sd3_inputs(batch=2), 1000.0, "transformer_blocks.0", model.transformer_blocks[0])


@pytest.mark.parametrize("make", [poisoned_flux, poisoned_sd3], ids=["flux-text-stream", "sd3-image-stream"])
def test_a_non_finite_second_output_falls_back(make: Callable[[], Poisoned]) -> None:
    model, inputs, scale, key, module = make()
    uncached = run_loop(model, inputs, steps=STEPS, scale=scale)
    assert torch.isfinite(uncached).all()  # the model itself is fine in float32

    recorder = UnitRecorder()
    counter = CallCounter({"poisoned": module})
    generic = key == "transformer_blocks.0"  # the SD3 case exercises the generic adapter's residual units
    acc = sdk.compose(
        "taylorseer", interval=3, warmup=1, cache_dtype=torch.float16, adapter="generic" if generic else None
    )
    with acc.apply(model) as handle, counter.counting():
        handle.add_observer(recorder)
        out = run_loop(model, inputs, steps=STEPS, scale=scale)

    first, second = recorder.outputs(key, 0)
    assert float(first.abs().max()) < FLOAT16_MAX < float(second.abs().max())  # only the second output overflows
    summary = handle.summary()
    units = {u.key: u for u in summary.units}
    forecast_steps = STEPS - len(FULL)
    counts = (units[key].computed, units[key].forecast, units[key].fallbacks)
    assert counts == (len(FULL), 0, forecast_steps), f"{key} (computed, forecast, fallbacks): {counts}"
    assert all((u.forecast, u.fallbacks) == (forecast_steps, 0) for k, u in units.items() if k != key)
    assert summary.fallbacks == forecast_steps
    assert counter.calls["poisoned"] == STEPS  # recomputed at every forecast step
    assert [recorder.how(key, s) for s in range(STEPS)] == [
        "computed" if s in FULL else "fallback" for s in range(STEPS)
    ]
    served = [
        (k, s, i)
        for (_, k, s), (_, outputs) in recorder.events.items()
        for i, t in enumerate(outputs)
        if not torch.isfinite(t).all()
    ]
    assert served == [], f"non-finite outputs served (unit, step, output): {served}"
    assert torch.isfinite(out).all(), "a non-finite forecast reached the model output"
