"""An example hicache-sdk plugin: ``probe_cache``, an adaptive cache policy.

Installed, it is found through its entry point in the ``hicache`` group (see ``pyproject.toml``);
``hicache_sdk.compose("probe_cache", basis="hermite", threshold=0.2)`` then works like a built-in.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch

from hicache_sdk import Policy, hookimpl
from hicache_sdk.decision import BlockView, Decision, StepInfo, UnitDecision
from hicache_sdk.policy import DynamicConfig, DynamicPolicy, threshold_field
from hicache_sdk.state import ContextState, UnitState
from hicache_sdk.validation import attrs_validator, check_int

__all__ = ["ProbeCache", "ProbeCacheConfig", "ProbeState", "hicache_register_policies"]
__version__ = "0.1.0"


@attrs.frozen(kw_only=True)
class ProbeCacheConfig(DynamicConfig):
    """``probe_cache`` settings, on top of :class:`~hicache_sdk.policy.DynamicConfig`'s warm-up, tail and guard.

    Attributes:
        threshold: the relative change of block 0's residual, summed over the steps since the
            later blocks last computed, below which they are forecast (> 0; untuned).
        max_forecasts: the most steps in a row whose later blocks are forecast (>= 1).
    """

    threshold: float = threshold_field(0.2)
    max_forecasts: int = attrs.field(default=4, validator=attrs_validator(check_int, minimum=1))


@attrs.define
class ProbeState:
    """One context's state for one generation (``ctx.policy_state``); the policy object holds none."""

    previous: torch.Tensor | None = None  # block 0's residual at the previous step
    accumulated: float = 0.0  # relative change summed since the later blocks last computed
    streak: int = 0  # steps forecast in a row
    forecast: bool = False  # this step's verdict for the blocks after the probe

    @property
    def nbytes(self) -> int:
        """Bytes held; the run summary counts them with the cache."""
        return 0 if self.previous is None else self.previous.numel() * self.previous.element_size()


class ProbeCache(DynamicPolicy):
    """Block 0 always computes (the probe); the later blocks are forecast while its residual barely moves.

    At each step the probe's residual (image tokens out minus in) is compared with the previous
    step's; the relative changes add up until they reach ``threshold``, and that step computes
    every block and starts the sum again (TeaCache's accumulation, on a First Block Cache probe).
    """

    name = "probe_cache"
    Config = ProbeCacheConfig

    def new_policy_state(self) -> ProbeState:
        return ProbeState()

    def plan_signal(self, ctx: ContextState, info: StepInfo) -> bool:
        ctx.policy_state.forecast = False  # nothing is forecast until the probe has run
        return False  # not full: block 0 computes, then on_block decides the rest

    def on_block(self, ctx: ContextState, view: BlockView) -> None:
        if view.index != 0:
            return
        state: ProbeState = ctx.policy_state
        residual = view.tokens_out - view.tokens_in
        previous, state.previous = state.previous, residual
        state.forecast = False
        if ctx.full or previous is None:
            state.accumulated, state.streak = 0.0, 0  # every block computes at this step
            return
        change = float(self.relative_change(ctx, residual, previous))  # this point's one host sync
        if self.fail_open_if_unreadable(ctx, change):
            state.accumulated, state.streak = 0.0, 0
            return
        state.accumulated += change
        if state.accumulated < self.config.threshold and state.streak < self.config.max_forecasts:
            state.forecast, state.streak = True, state.streak + 1
        else:
            state.accumulated, state.streak = 0.0, 0

    def decide(self, ctx: ContextState, unit: UnitState) -> UnitDecision:
        if unit.block > 0 and ctx.policy_state.forecast:
            return Decision.FORECAST
        return Decision.COMPUTE  # block 0 (the probe), units outside blocks, and every unit of a computed step


@hookimpl
def hicache_register_policies(register: Callable[[type[Policy]], None]) -> None:
    """Register this distribution's policy with hicache-sdk."""
    register(ProbeCache)
