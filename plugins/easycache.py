"""``easycache``: EasyCache's calibration-free runtime-adaptive criterion (arXiv 2507.02860).

At computed steps the *transformation rate* ``k = mean|v_t - v_c| / mean|x_t - x_c|`` relates the
model output's change to its input's change since the previous computed step ``c``. At the other
steps the output's relative change is estimated as ``k * mean|x_t - x_{t-1}| / mean|v_c|`` and
accumulated; while the sum stays under ``threshold`` the step is not computed, else it is and the
sum restarts from 0 (as the reference code: mean absolute values, the previous *step*'s input, k
from consecutive computed steps). Where EasyCache reuses the transformation vector ``v - x``, this
policy forecasts every unit with the basis (``max_order=0`` reuses each unit's newest output).
Defaults are the reference Wan 2.1 setting: threshold 0.05, 10 warm-up steps, last step computed.
"""

from __future__ import annotations

import attrs
import torch

from hicache_sdk.decision import StepInfo
from hicache_sdk.policy import DynamicConfig, DynamicPolicy, tail_field, threshold_field, warmup_field
from hicache_sdk.state import ContextState

__all__ = ["EasyCache", "EasyCacheConfig"]

TINY = torch.finfo(torch.float32).tiny


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum|a - b|`` in float32 (a sum, not a mean: the reduction point adds the shards' sums)."""
    return (a.float() - b.float()).abs().sum()


@attrs.frozen(kw_only=True)
class EasyCacheConfig(DynamicConfig):
    """EasyCache settings.

    Attributes:
        threshold: tolerance of the accumulated estimated relative output change; > 0 (the reference
            Wan 2.1 default 0.05; 0.1 gave it about 2x, 0.2 about 3x).
        warmup: leading steps always computed (reference: 10).
        tail: trailing steps always computed (reference: the last one; needs the number of steps).
    """

    threshold: float = threshold_field(0.05)
    warmup: int = warmup_field(10)
    tail: int = tail_field(1)


class RateState:
    """Per-context state: inputs and output of the newest computed step, k, the accumulated change."""

    def __init__(self) -> None:
        self.latents: torch.Tensor | None = None  # this step's input
        self.previous: torch.Tensor | None = None  # the previous step's input
        self.computed_input: torch.Tensor | None = None
        self.computed_output: torch.Tensor | None = None
        self.rate: torch.Tensor | None = None  # k, on the device
        self.pending: torch.Tensor | None = None  # k's local sums, reduced with the next decision's
        self.accumulated = 0.0
        self.unusable: str | None = None  # why the criterion cannot be computed for this model

    @property
    def nbytes(self) -> int:
        held = [t for t in (self.previous, self.computed_input, self.computed_output) if t is not None]
        return sum(t.numel() * t.element_size() for t in held)


class EasyCache(DynamicPolicy):
    """EasyCache: skip (forecast) steps while the estimated accumulated output change is small."""

    name = "easycache"
    Config = EasyCacheConfig

    def new_policy_state(self) -> RateState:
        return RateState()

    def plan_step(self, ctx: ContextState, info: StepInfo) -> bool:
        state: RateState = ctx.policy_state
        state.latents = None if info.latents is None else info.latents.detach().clone()
        return super().plan_step(ctx, info)

    def plan_signal(self, ctx: ContextState, info: StepInfo) -> bool:
        state: RateState = ctx.policy_state
        x = state.latents
        if x is None:
            ctx.fail_open("guard: easycache needs the model's input latents, none given: step computed")
            return True
        if state.unusable is not None:
            ctx.fail_open(state.unusable)
            return True
        if (state.rate is None and state.pending is None) or state.previous is None or state.computed_output is None:
            return True
        local = torch.stack([_distance(x, state.previous), state.computed_output.abs().sum()])
        if state.pending is not None:  # one all-reduce per decision: k's sums travel with this step's
            local = torch.cat([local, state.pending])
        sums = ctx.reduce(local)
        if state.pending is not None:
            state.rate = torch.where(sums[3] > 0, sums[2] / sums[3].clamp_min(TINY), 0.0)
            state.pending = None
        assert state.rate is not None
        estimate = float(torch.where(sums[1] > 0, state.rate * sums[0] / sums[1].clamp_min(TINY), torch.inf))  # sync
        if estimate == float("inf"):
            ctx.fail_open("guard: easycache's output reference is zero: step computed")
            return True
        state.accumulated += estimate
        if state.accumulated < self.config.threshold:
            return False
        return True

    def end_step(self, ctx: ContextState, output: torch.Tensor | None) -> bool:
        state: RateState = ctx.policy_state
        x = state.latents
        if x is not None and (output is None or output.shape != x.shape):
            state.unusable = (
                "guard: easycache needs a model output shaped like its input "
                f"({tuple(x.shape)}, got {None if output is None else tuple(output.shape)}): step computed"
            )
        elif ctx.full and x is not None and output is not None:
            v = output.detach().float()
            if state.computed_input is not None and state.computed_output is not None:
                # k = sum|v - v_prev| / sum|x - x_prev|: reduced at the next decision (see plan_signal)
                state.pending = torch.stack([_distance(v, state.computed_output), _distance(x, state.computed_input)])
            state.computed_input = x.float()
            state.computed_output = v.clone()
            state.accumulated = 0.0
        state.previous = x
        return True
