"""Writing ``hicache compare`` results: Markdown tables and a JSON file.

``compare.json`` is strict JSON, non-finite numbers written as ``null`` (see
:func:`.report.strict_json`); the wall column comes with its spread and flags (see :mod:`.wall`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from .compare import CompareReport, CompareResult
from .compiled import CompilePhase
from .overhead import FullRunOverhead, StepShare
from .report import check_writable, strict_json
from .runner import format_number
from .wall import WALL_SPREAD_TOLERANCE, format_flags, format_range, format_spread, wall_verdict

__all__ = [
    "COMPARE_FILES",
    "compare_markdown",
    "compare_table",
    "compare_wall_check",
    "compile_table",
    "overhead_tables",
    "write_compare",
]

COMPARE_FILES = ("compare.json", "compare.md")


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.2f}"


def _speedup(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}x"


def _score(result: CompareResult, name: str, digits: int) -> str:
    return "-" if result.scores is None else format_number(getattr(result.scores, name), digits)


_COLUMNS = (
    ("method", lambda r: r.label),
    ("library", lambda r: r.family),
    ("FLOPs speedup", lambda r: _speedup(r.flops_speedup)),
    ("SDK summary", lambda r: _speedup(r.sdk_flops_speedup)),
    ("wall speedup", lambda r: _speedup(r.wall_speedup)),
    ("wall range", lambda r: format_range(r.wall)),
    ("time spread", lambda r: format_spread(r.wall)),
    ("wall check", lambda r: format_flags(r.wall)),
    ("rel. L2", lambda r: _score(r, "rel_l2", 4)),
    ("PSNR dB", lambda r: _score(r, "psnr", 2)),
    ("SSIM", lambda r: _score(r, "ssim", 4)),
    ("accuracy", lambda r: "-" if r.scores is None else f"{r.scores.accuracy:.0%}"),
    ("Frechet", lambda r: _score(r, "frechet", 3)),
    ("cache MiB", lambda r: "-" if r.skipped else _mib(r.cache_bytes)),
    ("SDK summary MiB", lambda r: _mib(r.sdk_cache_bytes)),
    ("full/forecast", lambda r: r.steps),
)


def compare_table(results: Sequence[CompareResult]) -> str:
    """The compare table in GitHub Markdown; skipped rows show ``skipped`` and are explained below it."""
    header = "| " + " | ".join(name for name, _ in _COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in _COLUMNS) + "|"
    rows = []
    for r in results:
        cells = [fmt(r) for _, fmt in _COLUMNS]
        if r.skipped:
            cells = [r.label, r.family, "skipped", *["-"] * (len(_COLUMNS) - 3)]
        rows.append("| " + " | ".join(cells) + " |")
    notes = [f"- `{r.label}` skipped: {r.skipped}" for r in results if r.skipped]
    return "\n".join([header, rule, *rows, *(["", *notes] if notes else [])])


def compare_wall_check(results: Sequence[CompareResult]) -> tuple[bool | None, str]:
    """Whether the wall column can be trusted (``None``: one repeat, not measured) and why, in a sentence."""
    return wall_verdict([(r.label, r.wall, r.wall_speedup, r.flops_speedup) for r in results if r.skipped is None])


def overhead_tables(full_runs: Sequence[FullRunOverhead], shares: Sequence[tuple[str, list[StepShare]]]) -> str:
    """The all-full overhead table and the per-step time shares, in Markdown."""
    lines = [
        "| all-full run (N = 1) | pairs | no SDK, median s | SDK, median s | overhead (median of pairs) "
        "| pairs' range | clocked in runtime | identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in full_runs:
        none, sdk = statistics.median(run.none_seconds), statistics.median(run.sdk_seconds)
        low, high = min(run.pair_ratios) - 1.0, max(run.pair_ratios) - 1.0
        lines.append(
            f"| `{run.method}` | {len(run.pair_ratios)} | {none:.3f} | {sdk:.3f} | {run.overhead:+.1%} | "
            f"{low:+.1%} to {high:+.1%} | {run.clocked_seconds / none:.1%} | {run.identical} |"
        )
    lines += [
        "",
        "| method | step kind | steps | median step ms | SDK ms | SDK share | begin/end step ms | serve ms | record ms "
        "| observe ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for tag, step_shares in shares:
        for s in step_shares:
            p = s.parts
            lines.append(
                f"| `{tag}` | {s.kind} | {s.steps} | {s.step_seconds * 1e3:.2f} | {s.sdk_seconds * 1e3:.2f} | "
                f"{s.share:.1%} | {(p['begin_step'] + p['end_step']) * 1e3:.3f} | {p['_serve'] * 1e3:.3f} | "
                f"{p['_record'] * 1e3:.3f} | {p['observe'] * 1e3:.3f} |"
            )
    return "\n".join(lines)


def compile_table(phases: Sequence[CompilePhase]) -> str:
    """Eager against ``torch.compile`` per configuration, in Markdown."""
    lines = [
        "| configuration | graphs compiled, 1st generation | later generations | graph breaks | eager median s "
        "| compiled median s | compile speedup | max abs diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in phases:
        lines.append(
            f"| `{p.method}` | {p.compiles_first} | {p.compiles_later} | {p.graph_breaks} | "
            f"{statistics.median(p.eager_seconds):.3f} | {statistics.median(p.compiled_seconds):.3f} | "
            f"{p.speedup:.2f}x | {p.max_abs_diff:.2e} |"
        )
    return "\n".join(lines)


def settings_json(s: Any) -> dict[str, Any]:
    """The sample settings of a compare or frontier run, as JSON."""
    return {
        "steps": s.steps,
        "digits": list(s.digits),
        "seeds_per_digit": s.seeds_per_digit,
        "seed": s.seed,
        "repeats": s.repeats,
        "device": s.device,
        "dtype": s.dtype,
    }


def _json(report: CompareReport, extras: dict[str, Any]) -> str:
    s = report.settings
    trusted, note = compare_wall_check(report.results)
    payload = {
        "machine": report.machine,
        "deterministic": report.deterministic,
        "wall_check": {"tolerance": WALL_SPREAD_TOLERANCE, "trusted": trusted, "note": note},
        "full_flops_counts": list(report.full_flops_counts),
        "mag_ratios": list(report.mag_ratios),
        "settings": settings_json(s),
        "results": [attrs.asdict(r) for r in report.results],
        **{key: [attrs.asdict(v) if attrs.has(type(v)) else v for v in values] for key, values in extras.items()},
    }
    return strict_json(payload)


def write_compare(report: CompareReport, markdown: str, out: Path, extras: dict[str, Any] | None = None) -> list[Path]:
    """Write ``compare.md`` (``markdown``) and ``compare.json`` into ``out``; return their paths."""
    check_writable(out)
    paths = [out / name for name in COMPARE_FILES]
    paths[0].write_text(_json(report, extras or {}))
    paths[1].write_text(markdown)
    return paths


def compare_markdown(
    report: CompareReport,
    *,
    command: str,
    overhead: str | None = None,
    compiled: str | None = None,
) -> str:
    """The whole ``compare.md``: settings, the table, each row's exact setting, and the extra sections."""
    s = report.settings
    digits, _ = s.samples()
    counts = ", ".join(f"{c:.6g}" for c in report.full_flops_counts)
    lines = [
        "# hicache compare",
        "",
        f"Machine: {report.machine}. {s.steps} steps, {len(digits)} samples (digits {list(s.digits)}, "
        f"{s.seeds_per_digit} seeds each from {s.seed}), CFG batched, {s.repeats} interleaved repeats (wall speedup: "
        "median; wall range: the per-repeat speedups; time spread: slowest / fastest repeat time of the row).",
        f"Command: `{command}`. Repeats bit-identical: {report.deterministic}. "
        f"FLOPs of full compute, counted {len(report.full_flops_counts)} times: {counts}.",
        "",
        compare_table(report.results),
        "",
        compare_wall_check(report.results)[1],
        "",
        "FLOPs are counted by torch's FlopCounterMode (matmuls and attention, CPU attention included) over one "
        "whole generation, the same way for every row; 'SDK summary' is what this SDK's own run summary says. "
        "Cache MiB is measured: the peak over the generation of the tensor bytes reachable from the model's "
        "non-parameter state (hooks, contexts), parameters excluded. Errors are against full compute on the same "
        "seeds; accuracy is the digit classifier's; Frechet distance is on its 64-d features (small-sample, for "
        "ranking only).",
        "",
        "Settings:",
        *[f"- `{r.label}`: `{r.setting}`" for r in report.results],
    ]
    if report.mag_ratios:
        lines.append(
            f"- MagCache ratios calibrated by diffusers on held-out seeds: {[round(r, 4) for r in report.mag_ratios]}"
        )
    if overhead:
        lines += ["", "## SDK overhead", "", overhead]
    if compiled:
        lines += ["", "## torch.compile", "", compiled]
    return "\n".join(lines) + "\n"
