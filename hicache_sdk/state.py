"""Per-generation state: one :class:`ContextState` per CFG branch, one :class:`UnitState` per unit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch

from .ladder import DifferenceLadder

__all__ = ["ContextState", "UnitCounts", "UnitState"]


@attrs.define
class UnitCounts:
    """How one unit was served during a generation."""

    computed: int = 0
    forecast: int = 0
    partial: int = 0  # forecast steps where some tokens were recomputed (token-level policies)
    fallbacks: int = 0  # forecast steps that were not finite and were recomputed


class UnitState:
    """The ladders of one unit (one per output stream) and its counters."""

    def __init__(
        self, key: str, streams: Sequence[str] | None, max_order: int, storage_dtype: torch.dtype | None
    ) -> None:
        self.key = key
        self.max_order = max_order
        self.storage_dtype = storage_dtype
        self.streams: tuple[str, ...] = ()
        self.ladders: tuple[DifferenceLadder, ...] = ()
        if streams is not None:
            self.set_streams(streams)
        self.counts = UnitCounts()
        #: (shape, dtype, device) of each output at the newest computation; forecasts must match it
        self.layout: tuple[Any, ...] = ()

    def set_streams(self, streams: Sequence[str]) -> None:
        """Name the unit's output streams (one ladder each)."""
        self.streams = tuple(streams)
        self.ladders = tuple(DifferenceLadder(self.max_order, self.storage_dtype) for _ in self.streams)

    @property
    def empty(self) -> bool:
        """Whether nothing was recorded yet."""
        return not self.ladders or self.ladders[0].order < 0

    def stream_keys(self) -> tuple[str, ...]:
        """Full names of this unit's streams, e.g. ``transformer_blocks.0.attn.img``."""
        return tuple(f"{self.key}.{s}" if s else self.key for s in self.streams)

    @property
    def nbytes(self) -> int:
        return sum(ladder.nbytes for ladder in self.ladders)


class ContextState:
    """State of one denoising context (``"cond"``, ``"uncond"`` or ``"default"``) for one generation."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.reset()

    def reset(self) -> None:
        """Start a new generation: forget units, counters and policy state."""
        self.step = -1
        self.full = True
        self.last_timestep: float | None = None
        self.last_step_index: int | None = None  # the pipeline's loop index, when its cache context has one
        self.signature: tuple[Any, ...] | None = None  # shapes and dtypes of the forward's tensor inputs
        self.total_steps: int | None = None  # steps of this generation, when the pipeline tells it
        self.units: dict[str, UnitState] = {}
        self.policy_state: Any = None
        self.full_steps = 0
        self.forecast_steps = 0
        self.flops_total = 0.0
        self.flops_saved = 0.0
        self.flops_overhead = 0.0  # the policy's own work (e.g. clustering), counted against the savings
        self.flops_measured = True

    @property
    def steps(self) -> int:
        return self.step + 1

    @property
    def nbytes(self) -> int:
        extra = getattr(self.policy_state, "nbytes", 0)
        return sum(u.nbytes for u in self.units.values()) + int(extra)
