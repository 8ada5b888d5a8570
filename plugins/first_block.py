"""``first_block``: DBCache-style caching (First Block Cache at ``fn_blocks=1, bn_blocks=0``).

The first ``fn_blocks`` blocks always compute: they are the probe. After them, the relative L1
change of their image residual (tokens leaving block ``fn_blocks - 1`` minus tokens entering
block 0) against its value at the last step that computed the middle, ``sum|r_t - r_last| /
sum|r_last|``, decides the rest of the step: under ``threshold`` the middle blocks' units are
forecast by the basis (order 0: reused, as First Block Cache and DBCache do; ``taylor``: cache-dit's
DBCache + TaylorSeer calibrator; ``hermite`` / ``newton``: new), otherwise they compute and the
reference moves to this step. The last ``bn_blocks`` blocks always compute. Defaults follow
cache-dit's DBCache (threshold 0.08, 8 warm-up steps, no cap) with First Block Cache's single probe
block, which fits every model with two blocks or more.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from hicache_sdk.adapter import Adapter
from hicache_sdk.decision import BlockView, Decision, StepInfo, UnitDecision
from hicache_sdk.errors import InvalidParameterError
from hicache_sdk.policy import DynamicConfig, DynamicPolicy, threshold_field
from hicache_sdk.state import ContextState, UnitState
from hicache_sdk.validation import attrs_validator, check_bool, check_int

__all__ = ["FirstBlock", "FirstBlockConfig"]


@attrs.frozen(kw_only=True)
class FirstBlockConfig(DynamicConfig):
    """First Block Cache / DBCache settings.

    Attributes:
        threshold: largest relative L1 change of the probe residual (since the last computed step)
            at which the middle blocks are forecast; > 0.
        fn_blocks: Fn >= 1, leading blocks that always compute (the probe).
        bn_blocks: Bn >= 0, trailing blocks that always compute.
        max_consecutive: most forecast steps in a row (-1: no cap).
        per_sample: decide for each sample of the batch (the middle runs on the sub-batch whose
            change is over the threshold; the adapter must split batches).
    """

    threshold: float = threshold_field(0.08)
    fn_blocks: int = attrs.field(default=1, validator=attrs_validator(check_int, minimum=1))
    bn_blocks: int = attrs.field(default=0, validator=attrs_validator(check_int, minimum=0))
    max_consecutive: int = attrs.field(default=-1, validator=attrs_validator(check_int, minimum=-1))
    per_sample: bool = attrs.field(default=False, validator=attrs_validator(check_bool))


class ProbeState:
    """Per-context state: the probe's input, the reference residual, this step's decision."""

    def __init__(self) -> None:
        self.tokens_in: torch.Tensor | None = None
        self.reference: torch.Tensor | None = None
        self.decision: UnitDecision = Decision.COMPUTE
        self.consecutive: Any = 0  # an int, or a (batch,) tensor with per_sample

    @property
    def nbytes(self) -> int:
        return 0 if self.reference is None else self.reference.numel() * self.reference.element_size()


class FirstBlock(DynamicPolicy):
    """DBCache: probe the first Fn blocks, forecast the middle while their residual barely moves."""

    name = "first_block"
    Config = FirstBlockConfig

    @property
    def needs_batch_split(self) -> bool:
        return bool(self.config.per_sample)

    def check_adapter(self, adapter: Adapter) -> None:
        c, blocks = self.config, adapter.num_blocks
        if c.fn_blocks + c.bn_blocks >= blocks:
            raise InvalidParameterError(
                f"fn_blocks + bn_blocks must be < the number of blocks ({blocks} in {type(adapter.model).__name__}) "
                f"so that some block can be forecast, got fn_blocks={c.fn_blocks} + bn_blocks={c.bn_blocks}"
            )

    def new_policy_state(self) -> ProbeState:
        return ProbeState()

    def plan_signal(self, ctx: ContextState, info: StepInfo) -> bool:
        ctx.policy_state.decision = Decision.COMPUTE  # until the probe has spoken
        return False

    def on_block(self, ctx: ContextState, view: BlockView) -> None:
        state: ProbeState = ctx.policy_state
        if view.index == 0:
            state.tokens_in = view.tokens_in
        if view.index != self.config.fn_blocks - 1 or state.tokens_in is None:
            return
        residual = view.tokens_out - state.tokens_in
        state.tokens_in = None
        if ctx.full or state.reference is None or state.reference.shape != residual.shape:
            self._computed(state, residual)
            return
        if self.config.per_sample:
            self._decide_per_sample(ctx, state, residual)
            return
        change = float(self.relative_change(ctx, residual, state.reference))  # the step's one synchronisation
        capped = 0 <= self.config.max_consecutive <= state.consecutive
        if self.fail_open_if_unreadable(ctx, change) or change > self.config.threshold or capped:
            self._computed(state, residual)
        else:
            state.decision = Decision.FORECAST
            state.consecutive += 1

    def _computed(self, state: ProbeState, residual: torch.Tensor) -> None:
        state.reference = residual
        state.decision = Decision.COMPUTE
        state.consecutive = 0

    def _decide_per_sample(self, ctx: ContextState, state: ProbeState, residual: torch.Tensor) -> None:
        assert state.reference is not None
        change = self.relative_change(ctx, residual, state.reference, per_sample=True)
        consecutive = torch.as_tensor(state.consecutive, device=change.device)
        compute = change > self.config.threshold
        if self.config.max_consecutive >= 0:
            compute |= consecutive >= self.config.max_consecutive
        state.reference = torch.where(compute.view(-1, *[1] * (residual.dim() - 1)), residual, state.reference)
        state.consecutive = torch.where(compute, 0, consecutive + 1)
        state.decision = compute

    def decide(self, ctx: ContextState, unit: UnitState) -> UnitDecision:
        state: ProbeState = ctx.policy_state
        if unit.block < self.config.fn_blocks or unit.block >= ctx.num_blocks - self.config.bn_blocks:
            return Decision.COMPUTE
        return state.decision
