"""The overhead and ``torch.compile`` sections of ``hicache compare``, on the compare's samples."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch

from ..models import DEFAULT_GUIDANCE, DigitsModel, sample
from .compare_report import compile_table, overhead_tables
from .compiled import measure_compile
from .overhead import all_full_overhead, step_shares
from .rows import Target
from .runner import BenchSettings, torch_dtype

__all__ = ["ALL_FULL_METHODS", "compile_section", "overhead_section", "sampler"]

#: all-full runs (N = 1) measured against no SDK: the paper's order-2 ladder, and plain reuse (order 0)
ALL_FULL_METHODS: tuple[str, ...] = ("taylorseer:interval=1", "fora:interval=1")
#: interleaved (no SDK, SDK) pairs per all-full run, at least
OVERHEAD_PAIRS = 9


def sampler(
    settings: BenchSettings, *, steps: int | None = None, seeds_per_digit: int | None = None
) -> Callable[[DigitsModel], torch.Tensor]:
    """``generate(model)`` on the settings' samples (optionally fewer steps or seeds)."""
    narrowed = attrs.evolve(settings, seeds_per_digit=seeds_per_digit or settings.seeds_per_digit)
    digits, seeds = narrowed.samples()
    guidance = DEFAULT_GUIDANCE if settings.guidance is None else settings.guidance
    dtype = torch_dtype(settings.dtype)

    def generate(model: DigitsModel) -> torch.Tensor:
        return sample(
            model, digits, seeds, steps=steps or settings.steps, guidance=guidance, device=settings.device, dtype=dtype
        )

    return generate


def overhead_section(model: DigitsModel, settings: BenchSettings, target: Target) -> tuple[str, list[Any]]:
    """All-full runs against no SDK, and time shares per step kind at ``target`` (Markdown, records)."""
    generate = sampler(settings)
    # one seed per digit: a smaller batch makes the per-call overhead a larger share (the harder case)
    # and leaves time for more pairs
    paired = sampler(settings, seeds_per_digit=1)
    repeats = max(OVERHEAD_PAIRS, settings.repeats)
    runs = [
        all_full_overhead(model, paired, method=m, repeats=repeats, device=settings.device) for m in ALL_FULL_METHODS
    ]
    schedule = f"interval={target.interval},warmup={target.warmup}"
    shares = [step_shares(model, generate, f"{policy}:{schedule}") for policy in ("taylorseer", "clusca")]
    records: list[Any] = [*runs, *({"method": tag, "shares": [attrs.asdict(s) for s in rows]} for tag, rows in shares)]
    text = "\n".join(
        [
            f"All-full runs: {repeats} interleaved pairs (one seed per digit); the overhead is the median of the",
            "pairs' time ratios, and their range shows the machine's noise. 'Clocked in runtime' is the time inside",
            "the runtime's entry points (step decisions, serving, recording anchors) in one instrumented",
            "generation, as a share of the no-SDK time; the rest of the overhead is hook dispatch and the adapter's",
            "re-expressed block forwards. Step shares: one instrumented generation on the compare's samples; 'SDK'",
            "excludes the model work that the runtime calls (unit computations and token paths); the rest of a step",
            "is the model's mandatory work (embeddings, modulation, norms, gates, output layer) plus hook dispatch.",
            "",
            overhead_tables(runs, shares),
        ]
    )
    return text, records


def compile_section(
    model: DigitsModel, settings: BenchSettings, target: Target, *, steps: int, backend: str
) -> tuple[str, list[Any]]:
    """Eager against ``torch.compile`` without cache and with taylorseer at ``target`` (Markdown, records)."""
    generate = sampler(settings, steps=steps, seeds_per_digit=1)
    method = f"taylorseer:interval={target.interval},warmup={target.warmup}"
    phases = measure_compile(
        model, generate, method=method, backend=backend, repeats=max(3, settings.repeats), device=settings.device
    )
    text = "\n".join(
        [
            f"{steps} steps, one seed per digit, backend {backend!r}, a fresh dynamo cache per configuration;",
            "graphs are counted by a counting backend. The runtime's step decisions, serving and recording are",
            "outside the graphs (torch.compiler.disable), so only the first generation compiles.",
            "",
            compile_table(phases),
        ]
    )
    return text, list(phases)
