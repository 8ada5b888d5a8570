"""``speca``: forecast, then verify (SpeCa, arXiv 2509.11628).

After a computed step the next steps are *drafted*: every unit is forecast by the basis. From the
``min_drafts``-th draft in a row on, the units of one late block (``verify_block``, the last by
default) also run on the drafted input and their forecast is checked against what they compute
with the reference code's per-element relative L1, ``mean(|f - c| / (|c| + 1e-10))``. Over the
threshold ``tau_t = max(threshold * decay ** (t / T), min_threshold)`` the draft is rejected:
with ``reject="recompute"`` the step runs again in full at once (what the cost counts as
overhead); with ``reject="next"`` the draft is kept and the next step computes, as the reference
code does. At most ``max_drafts`` drafts in a row. The verified units' FLOPs are not saved.
Defaults are the reference FLUX setting: threshold 7, decay 0.3, floor 0.1, 2 to 8 drafts,
3 warm-up steps, order 2.
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch

from hicache_sdk.adapter import Adapter
from hicache_sdk.decision import Decision, StepInfo, UnitDecision
from hicache_sdk.errors import InvalidParameterError, did_you_mean
from hicache_sdk.policy import DynamicConfig, DynamicPolicy, order_field, threshold_field, warmup_field
from hicache_sdk.state import ContextState, UnitState
from hicache_sdk.validation import attrs_validator, check_int, check_real

__all__ = ["SpeCa", "SpeCaConfig"]

REJECTIONS = ("recompute", "next")
EPSILON = 1e-10


def _check_reject(instance: object, attribute: attrs.Attribute, value: object) -> None:
    if value not in REJECTIONS:
        hint = did_you_mean(value, REJECTIONS) if isinstance(value, str) else ""
        raise InvalidParameterError(f"{attribute.name} must be one of {REJECTIONS}, got {value!r}.{hint}")


@attrs.frozen(kw_only=True)
class SpeCaConfig(DynamicConfig):
    """SpeCa settings.

    Attributes:
        threshold: base of the acceptance threshold on the verifier's relative error; > 0.
        decay: the threshold is multiplied by ``decay ** (t / T)`` over the generation, in (0, 1].
        min_threshold: floor of the decayed threshold, >= 0.
        min_drafts: drafts in a row before verification starts (the first ones are not checked), >= 1.
        max_drafts: most drafts in a row, >= 1.
        verify_block: the block whose units verify (its index in run order; -1: the last).
        reject: ``"recompute"`` (the rejected step runs again in full) or ``"next"`` (the next step
            computes, the reference code's behaviour).
    """

    warmup: int = warmup_field(3)
    max_order: int = order_field(2)
    threshold: float = threshold_field(7.0)
    decay: float = attrs.field(default=0.3, validator=attrs_validator(check_real, low=0.0, high=1.0, low_open=True))
    min_threshold: float = attrs.field(default=0.1, validator=attrs_validator(check_real, low=0.0))
    min_drafts: int = attrs.field(default=2, validator=attrs_validator(check_int, minimum=1))
    max_drafts: int = attrs.field(default=8, validator=attrs_validator(check_int, minimum=1))
    verify_block: int = attrs.field(default=-1, validator=attrs_validator(check_int))
    reject: Literal["recompute", "next"] = attrs.field(default="recompute", validator=_check_reject)

    def __attrs_post_init__(self) -> None:
        if self.min_drafts > self.max_drafts:
            raise InvalidParameterError(
                f"min_drafts must be <= max_drafts (else no draft is ever verified), got min_drafts={self.min_drafts} "
                f"and max_drafts={self.max_drafts}"
            )


class DraftState:
    """Per-context state: drafts in a row, the verifier's error sums of this step, a forced full step."""

    def __init__(self) -> None:
        self.drafts = 0
        self.verifying = False
        self.error: torch.Tensor | None = None  # [sum of per-element relative errors, count]
        self.compute_next = False


class SpeCa(DynamicPolicy):
    """SpeCa: draft each step by the basis forecast, verify on one late block, reject on a large error."""

    name = "speca"
    Config = SpeCaConfig

    def check_adapter(self, adapter: Adapter) -> None:
        blocks = adapter.num_blocks
        if not -blocks <= self.config.verify_block < blocks:
            raise InvalidParameterError(
                f"verify_block must be in [{-blocks}, {blocks - 1}] for {type(adapter.model).__name__} "
                f"({blocks} blocks), got {self.config.verify_block}"
            )

    def new_policy_state(self) -> DraftState:
        return DraftState()

    def plan_signal(self, ctx: ContextState, info: StepInfo) -> bool:
        state: DraftState = ctx.policy_state
        if state.compute_next or state.drafts >= self.config.max_drafts:
            return True
        state.drafts += 1
        state.verifying = state.drafts >= self.config.min_drafts
        state.error = None
        return False

    def check_units(self, units: str) -> None:
        if units in ("range", "output"):
            raise InvalidParameterError(
                f"policy 'speca' verifies a draft on one late block's unit; units={units!r} has no per-block unit. "
                "Use units='modules' or 'block'."
            )

    def decide(self, ctx: ContextState, unit: UnitState) -> UnitDecision:
        state: DraftState = ctx.policy_state
        if state.verifying and unit.block >= 0 and self._is_verifier(unit.block, ctx):
            return Decision.VERIFY
        return Decision.FORECAST

    def _is_verifier(self, block: int, ctx: ContextState) -> bool:
        return block == self.config.verify_block % max(ctx.num_blocks, block + 1)

    def verify(
        self,
        ctx: ContextState,
        unit: UnitState,
        forecast: tuple[torch.Tensor, ...],
        computed: tuple[torch.Tensor, ...],
    ) -> None:
        state: DraftState = ctx.policy_state
        for f, c in zip(forecast, computed, strict=True):
            relative = ((f.float() - c.float()).abs() / (c.float().abs() + EPSILON)).sum()
            sums = torch.stack([relative, torch.full_like(relative, float(c.numel()))])
            state.error = sums if state.error is None else state.error + sums

    def threshold_at(self, step: int, total_steps: int | None) -> float:
        """``tau_t = max(threshold * decay ** (t / T), min_threshold)`` (no decay when T is unknown)."""
        c = self.config
        progress = step / total_steps if total_steps else 0.0
        return max(c.threshold * c.decay**progress, c.min_threshold)

    def end_step(self, ctx: ContextState, output: torch.Tensor | None) -> bool:
        state: DraftState = ctx.policy_state
        if ctx.full:
            state.drafts = 0
            state.compute_next = False
            state.verifying = False
            return True
        if state.error is None:
            return True
        sums = ctx.reduce(state.error)
        error = float(sums[0] / sums[1].clamp_min(1.0))  # the step's one synchronisation
        state.error = None
        if error <= self.threshold_at(ctx.step, ctx.total_steps):
            return True
        if self.config.reject == "next":
            state.compute_next = True
            return True
        return False
