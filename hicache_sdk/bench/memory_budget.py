"""Cache bytes against accuracy on the embedded digits model: storage formats, unit granularities, budgets.

Run ``python -m hicache_sdk.bench.memory_budget`` (``--quick`` for a smoke test). At the paper
setting (HiCache: ``taylorseer`` with the ``hermite`` basis, N = 7, W = 3, m = 2, sigma = 0.5,
50 steps) it runs, side by side and interleaved (:func:`~hicache_sdk.bench.runner.run_bench`):

A. every storage format on the adapter's units, and the main formats on coarser units
   (``block``, ``range``, ``output``);
B. the memory planner at budgets of 50%, 33%, 25% and 10% of the bytes held today (adapter
   units, the model's float32).

Per row: the measured peak of forecast-state bytes on the device (the run summary's
``peak_cache_bytes``, every context), its share of today's, the rel. L2 error against the uncached
model on the same samples and its change against float32 storage, the counted FLOPs speedup and
the wall speedup (median of the interleaved repeats, with the repeats' spread). Budget rows also
give the plan and its predicted bytes. Everything is printed as Markdown.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import Any

import attrs

from ..errors import InvalidParameterError
from ..models import load_digits_model
from .methods import PAPER_SETTING, MethodSpec
from .runner import BenchSettings, MethodResult, machine_description, run_bench

__all__ = ["BUDGET_SHARES", "FORMAT_ROWS", "MemoryRow", "main", "memory_markdown", "run_memory"]

POLICY, BASIS = "taylorseer", "hermite"
#: (units, cache format) of part A; ``None``: the model's dtype (float32), "today".
FORMAT_ROWS: tuple[tuple[str, str | None], ...] = (
    ("modules", None),
    ("modules", "bf16"),
    ("modules", "fp16"),
    ("modules", "bf16+fp8"),
    ("modules", "fp8"),
    ("modules", "fp8:tensor"),
    ("modules", "fp8_e5m2"),
    ("block", None),
    ("block", "bf16+fp8"),
    ("block", "fp8"),
    ("range", None),
    ("range", "bf16+fp8"),
    ("range", "fp8"),
    ("output", None),
    ("output", "fp8"),
)
#: Budgets of part B, as shares of today's peak bytes.
BUDGET_SHARES: tuple[float, ...] = (0.5, 1 / 3, 0.25, 0.1)


@attrs.frozen
class MemoryRow:
    """One measured configuration."""

    label: str
    units: str
    storage: str
    peak_bytes: int
    rel_l2: float
    flops_speedup: float
    wall_speedup: float
    wall_spread: str
    budget: int | None = None
    predicted_bytes: int | None = None
    plan: str | None = None


def _label(units: str, fmt: str | None) -> str:
    return f"{units}/{fmt or 'fp32'}"


def _spec(label: str, **params: Any) -> MethodSpec:
    return MethodSpec(label=label, policy=POLICY, basis=BASIS, params=params)


def _rows(results: Sequence[MethodResult], meta: dict[str, dict[str, Any]]) -> list[MemoryRow]:
    rows = []
    for r in results:
        if r.label not in meta:
            continue
        spread = "-" if r.wall is None else f"{min(r.wall_seconds):.2f}-{max(r.wall_seconds):.2f} s"
        rows.append(
            MemoryRow(
                label=r.label,
                peak_bytes=r.peak_cache_bytes,
                rel_l2=r.rel_l2,
                flops_speedup=r.flops_speedup,
                wall_speedup=r.wall_speedup,
                wall_spread=spread,
                **meta[r.label],
            )
        )
    return rows


def run_memory(settings: BenchSettings, *, progress: Any = None) -> tuple[list[MemoryRow], list[MemoryRow]]:
    """Parts A and B: ``(format rows, budget rows)``."""
    model = load_digits_model(device=settings.device)
    meta: dict[str, dict[str, Any]] = {_label(u, f): {"units": u, "storage": f or "fp32"} for u, f in FORMAT_ROWS}
    specs = [_spec(_label(u, f), units=u, **({} if f is None else {"cache_dtype": f})) for u, f in FORMAT_ROWS]
    formats = _rows(
        run_bench(attrs.evolve(settings, methods=tuple(specs)), model=model, progress=progress).results, meta
    )
    today = formats[0].peak_bytes
    budgets = {f"budget {share:.0%}": max(1, int(today * share)) for share in BUDGET_SHARES}
    plans = _plans(settings, budgets, model)
    specs = [_spec(label, memory_budget=budget) for label, budget in budgets.items() if "refused" not in plans[label]]
    report = run_bench(attrs.evolve(settings, methods=tuple(specs)), model=model, progress=progress)
    meta = {
        label: {"units": "planned", "storage": "planned", "budget": budget, **plans[label]}
        for label, budget in budgets.items()
    }
    measured = {r.label: r for r in _rows(report.results, meta)}
    refused = [
        MemoryRow(
            label, "planned", "planned", 0, math.nan, math.nan, math.nan, "-", budget, None, plans[label]["refused"]
        )
        for label, budget in budgets.items()
        if "refused" in plans[label]
    ]
    return formats, [measured.get(label) or next(r for r in refused if r.label == label) for label in budgets]


def _plans(settings: BenchSettings, budgets: dict[str, int], model: Any) -> dict[str, dict[str, Any]]:
    """The plan each budget gives (from one short generation: the plan depends on shapes only)."""
    from ..models import sample

    digits, seeds = settings.samples()
    found: dict[str, dict[str, Any]] = {}
    for label, budget in budgets.items():
        acc = _spec(label, memory_budget=budget).accelerator(settings.shared)
        assert acc is not None
        with acc.apply(model.transformer) as handle:
            try:
                sample(model, digits, seeds, steps=3, device=settings.device)
            except InvalidParameterError as error:  # the budget cannot be met: the error names the smallest
                found[label] = {"refused": str(error)}
                continue
            summary = handle.summary()
        found[label] = {"predicted_bytes": summary.predicted_bytes, "plan": summary.memory_plan}
    return found


def _mib(count: float) -> str:
    return f"{count / 2**20:.2f}"


def memory_markdown(formats: Sequence[MemoryRow], budgets: Sequence[MemoryRow], settings: BenchSettings) -> str:
    """The two tables as Markdown, with the setting and the machine."""
    today, base_error = formats[0].peak_bytes, formats[0].rel_l2
    n = len(settings.samples()[0])
    lines = [
        f"Memory of forecast state on the embedded digits model: {POLICY}+{BASIS} "
        f"({', '.join(f'{k}={v}' for k, v in settings.shared.items())}), {settings.steps} steps, {n} samples "
        f"(batch {2 * n} with CFG), {settings.repeats} interleaved repeats; {machine_description(settings.device)}.",
        "",
        "| units | storage | peak cache MiB | of today | rel. L2 | vs fp32 | FLOPs speedup | wall speedup "
        "| wall range |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in formats:
        lines.append(
            f"| {r.units} | {r.storage} | {_mib(r.peak_bytes)} | {r.peak_bytes / today:.1%} | {r.rel_l2:.4f} | "
            f"{r.rel_l2 / base_error - 1:+.1%} | {r.flops_speedup:.2f}x | {r.wall_speedup:.2f}x | {r.wall_spread} |"
        )
    lines += [
        "",
        "| budget | MiB | predicted MiB | measured peak MiB | of today | rel. L2 | vs fp32 | plan |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in budgets:
        assert r.budget is not None
        if math.isnan(r.rel_l2):
            lines.append(
                f"| {r.label.removeprefix('budget ')} | {_mib(r.budget)} | - | - | - | - | - | refused: {r.plan} |"
            )
            continue
        predicted = "-" if r.predicted_bytes is None else _mib(r.predicted_bytes)
        lines.append(
            f"| {r.label.removeprefix('budget ')} | {_mib(r.budget)} | {predicted} | {_mib(r.peak_bytes)} | "
            f"{r.peak_bytes / today:.1%} | {r.rel_l2:.4f} | {r.rel_l2 / base_error - 1:+.1%} | {r.plan} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: run both parts and print the Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="2 samples, 20 steps, 1 repeat (a smoke test)")
    parser.add_argument("--samples-per-digit", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    settings = BenchSettings(
        methods=(),
        shared=dict(PAPER_SETTING),
        steps=20 if args.quick else 50,
        digits=(3, 7) if args.quick else tuple(range(10)),
        seeds_per_digit=1 if args.quick else args.samples_per_digit,
        repeats=1 if args.quick else args.repeats,
        device=args.device,
    )

    def progress(message: str) -> None:
        if not args.no_progress:
            print(f"[memory] {message}", file=sys.stderr, flush=True)

    formats, budgets = run_memory(settings, progress=progress)
    print(memory_markdown(formats, budgets, settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
