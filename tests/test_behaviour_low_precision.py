"""A bfloat16 model: the forecasts it is served are the float32 weighted sums of its ladders, rounded once.

docs/concepts.md and :class:`~hicache_sdk.ladder.DifferenceLadder`: ladders are stored in the
features' dtype (here bfloat16) and updates and forecasts compute in float32. The served anchors
(``handle.add_observer``) give the ladder: each update is replayed in float32 and stored in bfloat16
as documented, so the stored terms are known exactly. A forecast computed in float32 and rounded to
bfloat16 once is then within half a bfloat16 spacing of the exact sum of those terms (plus the
float32 sum's own rounding); one accumulated in bfloat16 rounds after each order and misses by up to
a whole spacing.
"""

from __future__ import annotations

import pytest
import torch
from helpers import UnitRecorder, flux_inputs, run_loop, tiny_flux

import hicache_sdk as sdk

STEPS = 12
WARMUP = 1


class StoredLadder:
    """The documented update, replayed: float32 arithmetic, each ``D^i`` stored in the feature dtype."""

    def __init__(self, max_order: int) -> None:
        self.max_order = max_order
        self.terms: list[torch.Tensor] = []
        self.last = 0
        self.spacing = 1.0

    def anchor(self, step: int, feature: torch.Tensor) -> None:
        new = feature.float()
        if self.terms and step >= WARMUP - 1:
            self.spacing = float(step - self.last)
            size = min(len(self.terms) + 1, self.max_order + 1)
            stored = []
            for i in range(size):
                following = (new - self.terms[i].float()) / self.spacing if i + 1 < size else None
                stored.append(new.to(feature.dtype))
                if following is not None:
                    new = following
            self.terms = stored
        else:
            self.terms = [feature.clone()]
        self.last = step


def bf16_spacing(values: torch.Tensor) -> torch.Tensor:
    """Distance from each bfloat16 value to the next one away from zero (8 significant bits)."""
    _, exponent = torch.frexp(values.double())
    return torch.ldexp(torch.ones_like(values, dtype=torch.float64), exponent - 8)


@pytest.mark.parametrize("basis", ["taylor", "newton"])
def test_bf16_forecasts_are_float32_sums_rounded_once(basis: str) -> None:
    model = tiny_flux().to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) for k, v in flux_inputs(batch=2, side=4, text=6).items()}
    basis_obj = sdk.get_basis(basis)()
    recorder = UnitRecorder()
    with sdk.compose("taylorseer", basis=basis_obj, interval=3, warmup=WARMUP, max_order=2).apply(model) as handle:
        handle.add_observer(recorder)
        out = run_loop(model, inputs, steps=STEPS)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert handle.summary().fallbacks == 0
    checked = 0
    for key in recorder.keys():
        for stream in range(len(recorder.outputs(key, 0))):
            ladder = StoredLadder(max_order=2)
            for step in recorder.steps(key):
                how, outputs = recorder.events["default", key, step]
                served = outputs[stream]
                assert served.dtype == torch.bfloat16
                if how == "computed":
                    ladder.anchor(step, served)
                    continue
                assert how == "forecast"
                if len(ladder.terms) < 3:
                    continue  # a sum of one or two terms is rounded once either way
                weights = basis_obj.weights(step - ladder.last, 2, ladder.spacing)
                exact = sum(w * t.double() for w, t in zip(weights, ladder.terms, strict=True))
                size = sum(abs(w) * t.double().abs() for w, t in zip(weights, ladder.terms, strict=True))
                allowed = 0.5 * bf16_spacing(served) + 4 * 2.0**-24 * size
                excess = (served.double() - exact).abs() - allowed
                assert (excess <= 0).all(), (
                    f"{key} output {stream} at step {step}: {int((excess > 0).sum())} values farther than half a bf16 "
                    f"spacing from the exact sum of the stored terms (by up to {float(excess.max()):.3g} more)"
                )
                checked += 1
    assert checked == 10 * 4  # 10 streams, order 2 at the forecasts after the anchors 6 and 9
