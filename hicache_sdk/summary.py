"""What a run did: steps, unit counts, FLOPs saved and cache memory, as a typed object and a table."""

from __future__ import annotations

import math
from typing import Any

import attrs

from .decision import local_reduce
from .state import ContextState

__all__ = ["RunSummary", "UnitSummary", "summarize"]


@attrs.frozen
class UnitSummary:
    """Counts of one unit over the last generation, summed over contexts."""

    key: str
    streams: tuple[str, ...]
    computed: int
    forecast: int
    partial: int
    fallbacks: int
    verified: int = 0
    #: per sample of the batch (in the first context's batch order), steps computed / forecast
    sample_computed: tuple[int, ...] = ()
    sample_forecast: tuple[int, ...] = ()


@attrs.frozen
class RunSummary:
    """Summary of the last generation.

    Attributes:
        policy, basis, adapter: tags of what ran.
        contexts: context names seen (``"cond"``, ``"uncond"``, or ``"default"``).
        steps: denoising steps per context; ``full_steps`` + ``forecast_steps`` == ``steps``.
        units: per-unit counts.
        flops_saved_fraction: counted share of the transformer's FLOPs not spent (matmuls and
            attention, as counted by torch's FlopCounterMode), net of the policy's own work (e.g.
            ClusCa's clustering); ``nan`` if not measured.
        cache_bytes: bytes of forecast state (ladders and policy state, every context) on the model's
            device at the end of the generation; offloaded ladders are counted in ``offloaded_bytes``.
        fallbacks: forecasts that were not finite and were recomputed.
        notes: remarks (e.g. the generic adapter chosen automatically, a guard that failed open).
        guarded_steps: steps the policy's guard made full (few-step schedules, unreadable signals).
        rejected_steps: drafted steps the policy rejected and the runtime ran again in full.
        peak_cache_bytes: the most forecast-state bytes on the model's device at the end of any step.
        offloaded_bytes: bytes of ladders held on the offload device at the end of the generation.
        granularity: of the units (``"modules"``, ``"block"``, ``"range"``, ``"output"``).
        storage: how the ladders were held (``"native"``, ``"bf16+fp8_e4m3:row"``, ``"planned"``, ...).
        memory_budget: the declared budget in bytes (``None``: none).
        predicted_bytes: the memory plan's predicted peak (``None`` without a plan).
        memory_plan: the levels the plan uses, e.g. ``"2 x bf16+fp8, 2 x block bf16+fp8"`` (``None``
            without a plan).
        prefetched, fetched: offloaded ladder reads that a prefetch had started / that waited for a copy.
        reductions, reduced_bytes: statistics the policy reduced across processes in this
            generation (every context) and the bytes they carried; 0 in one process.
    """

    policy: str
    basis: str
    adapter: str
    contexts: tuple[str, ...]
    steps: int
    full_steps: int
    forecast_steps: int
    units: tuple[UnitSummary, ...]
    flops_saved_fraction: float
    cache_bytes: int
    fallbacks: int
    notes: tuple[str, ...] = ()
    guarded_steps: int = 0
    rejected_steps: int = 0
    peak_cache_bytes: int = 0
    offloaded_bytes: int = 0
    granularity: str = "modules"
    storage: str = "native"
    memory_budget: int | None = None
    predicted_bytes: int | None = None
    memory_plan: str | None = None
    prefetched: int = 0
    fetched: int = 0
    reductions: int = 0
    reduced_bytes: int = 0

    @property
    def flops_speedup(self) -> float:
        """``1 / (1 - flops_saved_fraction)``: the counted FLOPs speedup."""
        if math.isnan(self.flops_saved_fraction):
            return math.nan
        return 1.0 / max(1e-12, 1.0 - self.flops_saved_fraction)

    def table(self) -> str:
        """A readable multi-line table."""
        head = [
            f"policy   {self.policy}",
            f"adapter  {self.adapter}",
            f"contexts {', '.join(self.contexts) or '-'}",
            f"steps    {self.steps} ({self.full_steps} full, {self.forecast_steps} forecast)",
            f"FLOPs    {self.flops_saved_fraction:.1%} saved, {self.flops_speedup:.2f}x",
            f"cache    {self.cache_bytes / 2**20:.2f} MiB (peak {self.peak_cache_bytes / 2**20:.2f} MiB), "
            f"units {self.granularity}, storage {self.storage}",
            *self._detail_lines(),
            f"fallbacks {self.fallbacks}",
            f"guarded  {self.guarded_steps} steps, rejected {self.rejected_steps} drafts",
            *[f"note     {n}" for n in self.notes],
        ]
        width = max([len(u.key) for u in self.units] + [4])
        rows = [f"{'unit':<{width}}  computed  forecast  partial  fallbacks  verified"]
        rows += [
            f"{u.key:<{width}}  {u.computed:>8}  {u.forecast:>8}  {u.partial:>7}  {u.fallbacks:>9}  {u.verified:>8}"
            for u in self.units
        ]
        return "\n".join([*head, "", *rows])

    def _detail_lines(self) -> list[str]:
        lines = []
        if self.memory_budget is not None:
            predicted = "-" if self.predicted_bytes is None else f"{self.predicted_bytes / 2**20:.2f} MiB"
            lines.append(
                f"budget   {self.memory_budget / 2**20:.2f} MiB: predicted {predicted}, measured peak "
                f"{self.peak_cache_bytes / 2**20:.2f} MiB; plan {self.memory_plan or 'not made yet'}"
            )
        if self.reductions:
            lines.append(
                f"reduce   {self.reductions} all-reduces across processes, {self.reduced_bytes} bytes "
                f"({self.reductions / max(self.steps, 1):.2f} per step)"
            )
        if self.offloaded_bytes or self.prefetched or self.fetched:
            lines.append(
                f"offload  {self.offloaded_bytes / 2**20:.2f} MiB held off the device; {self.prefetched} reads "
                f"prefetched, {self.fetched} fetched on demand"
            )
        return lines

    def __str__(self) -> str:
        return self.table()


def _added(a: list[int], b: list[int]) -> list[int]:
    return [x + y for x, y in zip(a, b, strict=True)]


def summarize(
    contexts: list[ContextState],
    *,
    policy: str,
    basis: str,
    adapter: str,
    notes: tuple[str, ...] = (),
    **memory: Any,
) -> RunSummary:
    """Aggregate per-context states into one :class:`RunSummary`; ``memory`` sets its memory fields
    (``peak_cache_bytes``, ``granularity``, ``storage``, ``memory_budget``, ``predicted_bytes``, ``memory_plan``)."""
    units: dict[str, list[int]] = {}
    streams: dict[str, tuple[str, ...]] = {}
    samples: dict[str, list[list[int]]] = {}
    for ctx in contexts:
        for key, unit in ctx.units.items():
            c = unit.counts
            acc = units.setdefault(key, [0, 0, 0, 0, 0])
            for i, v in enumerate((c.computed, c.forecast, c.partial, c.fallbacks, c.verified)):
                acc[i] += v
            streams[key] = unit.streams
            if key not in samples:
                samples[key] = [list(c.sample_computed), list(c.sample_forecast)]
            elif len(samples[key][0]) == len(c.sample_computed):  # contexts of one batch size add up
                samples[key] = [_added(samples[key][0], c.sample_computed), _added(samples[key][1], c.sample_forecast)]
    notes_of = dict.fromkeys(notes)
    for ctx in contexts:
        if ctx.guard_reason is not None:
            notes_of[f"{ctx.name}: {ctx.guard_reason}"] = None
        for reason, count in ctx.guard_notes.items():
            notes_of[f"{ctx.name}: {reason} ({count} steps)"] = None
    total = sum(c.flops_total for c in contexts)
    measured = all(c.flops_measured for c in contexts) and total > 0
    return RunSummary(
        policy=policy,
        basis=basis,
        adapter=adapter,
        contexts=tuple(c.name for c in contexts),
        steps=max((c.steps for c in contexts), default=0),
        full_steps=max((c.full_steps for c in contexts), default=0),
        forecast_steps=max((c.forecast_steps for c in contexts), default=0),
        units=tuple(
            UnitSummary(
                key=k,
                streams=streams[k],
                computed=v[0],
                forecast=v[1],
                partial=v[2],
                fallbacks=v[3],
                verified=v[4],
                sample_computed=tuple(samples[k][0]),
                sample_forecast=tuple(samples[k][1]),
            )
            for k, v in units.items()
        ),
        flops_saved_fraction=sum(c.flops_saved - c.flops_overhead for c in contexts) / total if measured else math.nan,
        cache_bytes=sum(c.nbytes for c in contexts),
        fallbacks=sum(v[3] for v in units.values()),
        notes=tuple(notes_of),
        guarded_steps=max((c.guarded_steps for c in contexts), default=0),
        rejected_steps=max((c.rejected_steps for c in contexts), default=0),
        offloaded_bytes=sum(c.offloaded_nbytes for c in contexts),
        reductions=sum(c.reductions for c in contexts if c.reducer is not local_reduce),
        reduced_bytes=sum(c.reduced_bytes for c in contexts if c.reducer is not local_reduce),
        prefetched=sum(
            getattr(ladder, "prefetched", 0) for c in contexts for u in c.units.values() for ladder in u.ladders
        ),
        fetched=sum(getattr(ladder, "fetched", 0) for c in contexts for u in c.units.values() for ladder in u.ladders),
        **memory,
    )
