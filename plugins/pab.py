"""``pab``: Pyramid Attention Broadcast (arXiv 2408.12588), per-unit-type intervals.

Inside a window of noise levels (the middle of the generation, where attention outputs change
least) each unit computes every ``interval`` steps of its *kind*, and is forecast by the basis in
between (``max_order=0``: broadcast, i.e. reuse, as PAB does). The paper's pyramid: the broadcast
range grows with how little a kind varies, cross-attention (6) > temporal attention (4) > spatial
self-attention (2); MLPs are not broadcast. Outside the window every unit computes. Defaults are
diffusers' ``PyramidAttentionBroadcastConfig`` timestep window ``(100, 800)`` of 1000, as a noise
level ``(0.1, 0.8)``, with the paper's ranges. On Flux only the double blocks' joint attention is
broadcast (the single blocks' unit fuses attention and MLP: ``fused_interval``, 1 by default).
"""

from __future__ import annotations

import attrs

from hicache_sdk.decision import Decision, StepInfo, UnitDecision
from hicache_sdk.errors import InvalidParameterError
from hicache_sdk.policy import DynamicConfig, DynamicPolicy, order_field, warmup_field
from hicache_sdk.state import ContextState, UnitState
from hicache_sdk.validation import attrs_validator, check_int, check_real

__all__ = ["PyramidAttentionBroadcast", "PyramidAttentionBroadcastConfig"]


def _interval(default: int) -> int:
    return attrs.field(default=default, validator=attrs_validator(check_int, minimum=1))


def _sigma(default: float) -> float:
    return attrs.field(default=default, validator=attrs_validator(check_real, low=0.0, high=1.0))


@attrs.frozen(kw_only=True)
class PyramidAttentionBroadcastConfig(DynamicConfig):
    """PAB settings: one interval per unit kind (1: always computed) and the noise-level window.

    Attributes:
        attention_interval: spatial (joint) self-attention units.
        temporal_attention_interval: temporal attention units (video models).
        cross_attention_interval: cross-attention units.
        mlp_interval, fused_interval, block_interval: MLP units, fused attention+MLP units,
            whole-block units.
        window_low, window_high: broadcasting happens while ``window_low <= sigma <= window_high``
            (sigma: the noise level in [0, 1]; the adapter must know the model's timestep scale).
    """

    warmup: int = warmup_field(0)
    max_order: int = order_field(0)
    attention_interval: int = _interval(2)
    temporal_attention_interval: int = _interval(4)
    cross_attention_interval: int = _interval(6)
    mlp_interval: int = _interval(1)
    fused_interval: int = _interval(1)
    block_interval: int = _interval(1)
    window_low: float = _sigma(0.1)
    window_high: float = _sigma(0.8)

    def __attrs_post_init__(self) -> None:
        if self.window_low >= self.window_high:
            from hicache_sdk.errors import InvalidParameterError

            raise InvalidParameterError(
                f"window_low must be < window_high, got window_low={self.window_low} and window_high={self.window_high}"
            )


class WindowState:
    """Per-context state: the first step inside the window (None before it)."""

    def __init__(self) -> None:
        self.start: int | None = None


class PyramidAttentionBroadcast(DynamicPolicy):
    """PAB: per-kind broadcast intervals inside a noise-level window."""

    name = "pab"
    Config = PyramidAttentionBroadcastConfig

    def new_policy_state(self) -> WindowState:
        return WindowState()

    def plan_signal(self, ctx: ContextState, info: StepInfo) -> bool:
        if info.sigma is None:
            ctx.fail_open("guard: pab needs the noise level (sigma), unknown for this model: step computed")
            return True
        c = self.config
        if not c.window_low <= info.sigma <= c.window_high:
            return True
        state: WindowState = ctx.policy_state
        if state.start is None:
            state.start = info.step
        return False

    def interval_of(self, kind: str) -> int:
        """The interval of a unit kind (1 for kinds this policy does not broadcast)."""
        c = self.config
        return {
            "attention": c.attention_interval,
            "temporal_attention": c.temporal_attention_interval,
            "cross_attention": c.cross_attention_interval,
            "mlp": c.mlp_interval,
            "fused": c.fused_interval,
            "block": c.block_interval,
        }.get(kind, 1)

    def check_units(self, units: str) -> None:
        if units in ("range", "output"):
            raise InvalidParameterError(
                f"policy 'pab' broadcasts units by kind (attention, mlp, block, ...); units={units!r} has none of "
                "those kinds and would always compute. Use units='modules' or 'block'."
            )

    def decide(self, ctx: ContextState, unit: UnitState) -> UnitDecision:
        start = ctx.policy_state.start
        if start is None or (ctx.step - start) % self.interval_of(unit.kind) == 0:
            return Decision.COMPUTE
        return Decision.FORECAST
