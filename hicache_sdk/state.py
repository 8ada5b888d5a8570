"""Per-generation state: one :class:`ContextState` per CFG branch, one :class:`UnitState` per unit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch

from .compact_ladder import convert_ladder, make_ladder
from .decision import Reducer, UnitInfo, local_reduce
from .ladder import DifferenceLadder
from .storage import LadderStorage

__all__ = ["ContextState", "UnitCounts", "UnitState"]


@attrs.define
class UnitCounts:
    """How one unit was served during a generation (kept by the runtime; policies read it).

    Attributes:
        computed: steps where the unit ran for every sample and recorded an anchor.
        forecast: steps where it was served by the policy (some tokens or samples may have run).
        partial: forecast steps where some tokens (a token path) or some samples (a mask) ran.
        fallbacks: forecasts that were not finite and were recomputed.
        verified: steps where it ran to check a forecast (decision ``VERIFY``).
        sample_computed: per sample of the batch, the steps where it ran for that sample.
        sample_forecast: per sample, the steps where it was forecast for that sample.
    """

    computed: int = 0
    forecast: int = 0
    partial: int = 0
    fallbacks: int = 0
    verified: int = 0
    sample_computed: list[int] = attrs.field(factory=list)
    sample_forecast: list[int] = attrs.field(factory=list)

    def count_samples(self, batch: int, computed: Sequence[int] | None) -> None:
        """Add one step: ``computed`` lists the samples that ran (``None``: none ran)."""
        if len(self.sample_computed) != batch:
            self.sample_computed = [0] * batch
            self.sample_forecast = [0] * batch
        ran = set(computed or ())
        if not ran:  # the common cases, without a loop over the samples' membership
            self.sample_forecast = [n + 1 for n in self.sample_forecast]
        elif len(ran) == batch:
            self.sample_computed = [n + 1 for n in self.sample_computed]
        else:
            for b in range(batch):
                if b in ran:
                    self.sample_computed[b] += 1
                else:
                    self.sample_forecast[b] += 1

    @property
    def samples(self) -> int:
        """Batch size seen (0 before the first step)."""
        return len(self.sample_computed)


class UnitState:
    """The ladders of one unit (one per output stream) and its counters.

    Attributes:
        key: the unit's name; ``block`` and ``kind``: where it sits and what it computes.
        streams: names of its outputs; ``ladders``: one :class:`~hicache_sdk.ladder.DifferenceLadder`
            per stream (a policy forecasts from them and may edit a term, as ClusCa does with
            ``D^0``: ``term(i)`` then ``set_term(i, edited)``, since an encoded ladder's term is a copy).
        counts: a :class:`UnitCounts`; ``layout``: (shape, dtype, device) of each computed output.
        storage: how its ladders are held (:class:`~hicache_sdk.storage.LadderStorage`; ``None``: in
            the features' dtype, with them).
    """

    def __init__(
        self,
        key: str,
        streams: Sequence[str] | None,
        max_order: int,
        storage: LadderStorage | None = None,
        *,
        block: int = -1,
        kind: str = "block",
    ) -> None:
        self.key = key
        #: the unit's block in run order (-1: none) and what it computes (see :class:`~hicache_sdk.decision.UnitInfo`)
        self.block = block
        self.kind = kind
        self.max_order = max_order
        self.storage = storage
        self.streams: tuple[str, ...] = ()
        self.ladders: tuple[DifferenceLadder, ...] = ()
        if streams is not None:
            self.set_streams(streams)
        self.counts = UnitCounts()
        #: (shape, dtype, device) of each output at the newest computation; forecasts must match it
        self.layout: tuple[Any, ...] = ()
        #: what the adapter said of the unit's inputs at its last call (``None``: not told)
        self.inputs: Any = None

    def restart(self) -> None:
        """Forget the anchors (the counters stay): the unit computes at its next call."""
        for ladder in self.ladders:
            ladder.reset()

    def set_streams(self, streams: Sequence[str]) -> None:
        """Name the unit's output streams (one ladder each)."""
        self.streams = tuple(streams)
        self.ladders = tuple(make_ladder(self.max_order, self.storage) for _ in self.streams)

    def restore(self, storage: LadderStorage | None) -> None:
        """Hold the ladders in ``storage`` from now on, keeping their anchors (re-encoded)."""
        if storage != self.storage:
            self.storage = storage
            self.ladders = tuple(convert_ladder(ladder, self.max_order, storage) for ladder in self.ladders)

    def record(
        self, outputs: Sequence[torch.Tensor], step: int, *, extend: bool = True, rows: torch.Tensor | None = None
    ) -> None:
        """Record freshly computed outputs (one per stream) as the newest anchor of each ladder."""
        for ladder, value in zip(self.ladders, outputs, strict=True):
            ladder.update(value, step, extend=extend, rows=rows)

    @property
    def info(self) -> UnitInfo:
        """Where the unit sits and what it computes, as its adapter declared it."""
        return UnitInfo(self.key, self.block, self.kind)

    @property
    def empty(self) -> bool:
        """Whether nothing was recorded yet."""
        return not self.ladders or self.ladders[0].order < 0

    def stream_keys(self) -> tuple[str, ...]:
        """Full names of this unit's streams, e.g. ``transformer_blocks.0.attn.img``."""
        return tuple(f"{self.key}.{s}" if s else self.key for s in self.streams)

    @property
    def nbytes(self) -> int:
        """Bytes its ladders hold on the compute device (offloaded terms are not counted)."""
        return sum(ladder.device_nbytes for ladder in self.ladders)

    @property
    def offloaded_nbytes(self) -> int:
        """Bytes its ladders hold on the offload device."""
        return sum(ladder.nbytes - ladder.device_nbytes for ladder in self.ladders)


class ContextState:
    """State of one denoising context (``"cond"``, ``"uncond"`` or ``"default"``) for one generation.

    What a policy reads: ``name``, ``step`` (0-based), ``full`` (the step computes every unit),
    ``num_blocks`` (blocks of the model, as the adapter binds them),
    ``total_steps`` (or ``None``), ``units`` (key -> :class:`UnitState`), ``policy_state`` (what
    :meth:`Policy.new_policy_state <hicache_sdk.Policy.new_policy_state>` made; the policy's own),
    ``reduce`` (the reduction point, see :mod:`hicache_sdk.decision`; ``reducer`` is the function
    behind it). The counters are the
    runtime's. A policy may call :meth:`fail_open`.
    """

    def __init__(self, name: str, reduce: Reducer = local_reduce, num_blocks: int = 0) -> None:
        self.name = name
        self.reducer = reduce
        self.num_blocks = num_blocks
        self.reset()

    def reset(self) -> None:
        """Start a new generation: forget units, counters and policy state."""
        self.step = -1
        self.full = True
        self.last_level: float | None = None  # noise level of the last step (sigma, or the raw timestep)
        self.last_step_index: int | None = None  # the pipeline's loop index, when its cache context has one
        self.signature: tuple[Any, ...] | None = None  # shapes and dtypes of the forward's tensor inputs
        self.total_steps: int | None = None  # steps of this generation, when the pipeline tells it
        self.units: dict[str, UnitState] = {}
        self.policy_state: Any = None
        self.model: str | None = None  # the denoiser of the last step (pipelines with several, e.g. Wan 2.2)
        self.full_steps = 0
        self.forecast_steps = 0
        self.flops_total = 0.0
        self.flops_saved = 0.0
        self.flops_overhead = 0.0  # the policy's own work (e.g. clustering), counted against the savings
        self.flops_measured = True
        self.guard_reason: str | None = None  # the whole generation computes (Policy.guard)
        self.guard_notes: dict[str, int] = {}  # fail-open reasons and how many steps each
        self.guarded_steps = 0
        self.rejected_steps = 0  # steps whose draft the policy rejected and that ran again in full
        self.reductions = 0  # statistics reduced through ctx.reduce in this generation
        self.reduced_bytes = 0

    def reduce(self, statistic: torch.Tensor) -> torch.Tensor:
        """The global value of a local statistic (a sum over every process holding a shard of the tokens).

        Counted: ``reductions`` (calls in this generation) and ``reduced_bytes`` (bytes they carried).
        """
        self.reductions += 1
        self.reduced_bytes += statistic.numel() * statistic.element_size()
        return self.reducer(statistic)

    def fail_open(self, reason: str) -> None:
        """Compute every remaining unit of this step, and say why in the run summary."""
        if not self.full:
            self.full = True
            self.guarded_steps += 1
        self.guard_notes.setdefault(reason, 0)
        self.guard_notes[reason] += 1

    @property
    def steps(self) -> int:
        return self.step + 1

    @property
    def nbytes(self) -> int:
        """Bytes of forecast state on the compute device: the units' ladders and the policy's state."""
        extra = getattr(self.policy_state, "nbytes", 0)
        return sum(u.nbytes for u in self.units.values()) + int(extra)

    @property
    def offloaded_nbytes(self) -> int:
        """Bytes of the units' ladders held on the offload device."""
        return sum(u.offloaded_nbytes for u in self.units.values())
