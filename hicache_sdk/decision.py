"""What a policy sees and what it decides: step signals, block views, unit decisions, the reduction point.

A policy decides at three points of a step (see :class:`~hicache_sdk.Policy`):

1. at step start, from a :class:`StepInfo` (step index, noise level, number of steps, context,
   batch size, the model's input latents);
2. after a block ran, from a :class:`BlockView` of its image tokens in and out (a *probe*: the
   policy makes the first blocks compute and decides the rest of the step from what they gave);
3. per unit, returning a :class:`Decision` or a per-sample mask.

Every statistic computed from tensor values goes through one reduction point (a :data:`Reducer`)
before it is compared with a threshold (:meth:`DynamicPolicy.relative_change
<hicache_sdk.policy.DynamicPolicy.relative_change>` does it), so that several processes holding shards of the tokens
take the same decision. In one process the reducer is the identity.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import attrs
import torch

__all__ = [
    "UNIT_KINDS",
    "BlockView",
    "Decision",
    "Reducer",
    "StepInfo",
    "UnitDecision",
    "UnitInfo",
    "local_reduce",
]


class Decision(enum.Enum):
    """How one unit is served at one step.

    ``COMPUTE``: run it (its outputs become a new anchor). ``FORECAST``: serve the policy's
    forecast; the unit does not run. ``VERIFY``: run it *and* forecast it, show both to
    :meth:`Policy.verify <hicache_sdk.Policy.verify>` and serve the forecast (the draft, as
    SpeCa's reference code does); the computed outputs are not recorded as an anchor and the
    unit's FLOPs are not saved.
    """

    COMPUTE = "compute"
    FORECAST = "forecast"
    VERIFY = "verify"


UnitDecision = Decision | torch.Tensor
"""A unit decision: a :class:`Decision`, or a boolean tensor of shape ``(batch,)`` whose ``True``
samples are computed (on the sub-batch, when the adapter can split a batch) and whose ``False``
samples are forecast."""

Reducer = Callable[[torch.Tensor], torch.Tensor]
"""``reduce(local) -> global``: sums a statistic over every process that holds a shard of the tokens
(elementwise, the same shape back). A policy reduces sums (not means), numerator and denominator
stacked in one tensor, so the ratio it forms afterwards is the global one."""


def local_reduce(statistic: torch.Tensor) -> torch.Tensor:
    """The reduction point of a single process: the local statistic is the global one."""
    return statistic


@attrs.frozen
class StepInfo:
    """What a policy knows when a step starts.

    Attributes:
        context: the denoising context (``"cond"``, ``"uncond"``, or ``"default"``).
        step: 0-based step of this context's generation.
        timestep: the timestep the model received (its own convention), if it has one.
        sigma: the noise level in ``[0, 1]`` (from ``timestep`` by the adapter's
            :meth:`~hicache_sdk.Adapter.noise_level`), or ``None`` when unknown.
        total_steps: steps of this generation, when the pipeline (or ``handle.reset``) tells it.
        batch_size: samples in the model's input (CFG batched into one call counts both halves).
        latents: the model's main input (``hidden_states``), or ``None``; read it, never write it.
    """

    context: str
    step: int
    timestep: float | None
    sigma: float | None
    total_steps: int | None
    batch_size: int | None
    latents: torch.Tensor | None = attrs.field(default=None, repr=False)


#: The kinds of unit adapters declare (``Runtime.unit(..., kind=...)``); policies such as ``pab`` key on them.
UNIT_KINDS: tuple[str, ...] = ("attention", "cross_attention", "temporal_attention", "mlp", "fused", "block")


@attrs.frozen
class UnitInfo:
    """Where a unit sits in the model, as its adapter declares it (``UnitState.info``).

    Attributes:
        key: unique name, e.g. ``transformer_blocks.0.attn``.
        block: index of the unit's block in the order the model runs its blocks (-1: outside any block).
        kind: what the unit computes, one of :data:`UNIT_KINDS`: ``"attention"`` (self or joint
            attention), ``"cross_attention"``, ``"temporal_attention"``, ``"mlp"``, ``"fused"``
            (attention and MLP in one projection) or ``"block"`` (a whole block's residual).
    """

    key: str
    block: int = -1
    kind: str = "block"


@attrs.frozen
class BlockView:
    """A block's image tokens before and after it ran, at the current step (a probe's signal).

    Attributes:
        index: the block's position in the order the model runs its blocks.
        num_blocks: blocks of the model (every block list together).
        tokens_in: image hidden states the block received, ``(batch, tokens, channels)``.
        tokens_out: image hidden states it returned.
        observed_blocks: the adapter's :attr:`~hicache_sdk.Adapter.observed_blocks` (blocks
            ``0 .. observed_blocks - 1`` are the ones token-level policies such as ClusCa index).
    """

    index: int
    num_blocks: int
    tokens_in: torch.Tensor = attrs.field(repr=False)
    tokens_out: torch.Tensor = attrs.field(repr=False)
    observed_blocks: int = 0
