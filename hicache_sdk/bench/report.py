"""Writing a bench report: JSON, Markdown, an image grid and a speed-versus-error plot.

Everything is written to a temporary folder beside the target and moved into place only when
complete, so a failure never leaves a half-written report.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import attrs

from ..errors import InvalidParameterError
from .runner import BenchReport, MethodResult, format_number, result_rows

__all__ = ["REPORT_FILES", "check_writable", "markdown_table", "write_report"]

REPORT_FILES = ("bench.json", "bench.md", "samples.png", "speed_vs_error.png")

_COLUMNS = (
    ("method", lambda r: r.label),
    ("FLOPs speedup", lambda r: f"{r.flops_speedup:.2f}x"),
    ("wall speedup", lambda r: f"{r.wall_speedup:.2f}x"),
    ("rel. L2", lambda r: format_number(r.rel_l2, 4)),
    ("PSNR dB", lambda r: format_number(r.psnr, 2)),
    ("SSIM", lambda r: format_number(r.ssim, 4)),
    ("accuracy", lambda r: f"{r.accuracy:.0%}"),
    ("Frechet", lambda r: format_number(r.frechet, 3)),
    ("full/forecast", lambda r: f"{r.full_steps}/{r.forecast_steps}"),
    ("cache MiB", lambda r: f"{r.cache_bytes / 2**20:.2f}"),
)


def markdown_table(results: Sequence[MethodResult]) -> str:
    """The bench table in GitHub Markdown."""
    header = "| " + " | ".join(name for name, _ in _COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in _COLUMNS) + "|"
    rows = ["| " + " | ".join(fmt(r) for _, fmt in _COLUMNS) + " |" for r in results]
    return "\n".join([header, rule, *rows])


def check_writable(out: Path) -> None:
    """Fail early, with a clear message, if ``out`` cannot be created or written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".probe-", delete=True)
        probe.close()
    except OSError as exc:
        raise InvalidParameterError(f"output folder {out} is not writable: {exc.strerror or exc}") from exc


def _markdown(report: BenchReport) -> str:
    s = report.settings
    digits, _ = s.samples()
    lines = [
        "# hicache bench",
        "",
        f"Machine: {report.machine}. {s.steps} steps, {len(digits)} samples (digits {list(s.digits)}, "
        f"{s.seeds_per_digit} seeds each from {s.seed}), CFG, {s.repeats} interleaved repeats (wall: median).",
        f"Shared setting: {dict(s.shared)}. Repeats bit-identical: {report.deterministic}.",
        "",
        markdown_table(report.results),
        "",
        "Errors are against full compute on the same seeds; accuracy is the digit classifier's;",
        "Frechet distance is on the classifier's 64-d features (small-sample, for ranking only).",
        "",
        "Methods:",
        *[f"- `{r.label}`: {r.tag}" for r in report.results],
    ]
    return "\n".join(lines) + "\n"


def _save_grid(report: BenchReport, path: Path, columns: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r.label for r in report.results]
    columns = min(columns, len(report.images[labels[0]]))
    fig, axes = plt.subplots(len(labels), columns, figsize=(columns * 0.8 + 1.6, len(labels) * 0.85), squeeze=False)
    for row, label in enumerate(labels):
        images = report.images[label]
        for col in range(columns):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col < len(images):
                ax.imshow(images[col, 0].float().cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        axes[row][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _save_plot(report: BenchReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in report.results:
        if r.rel_l2 <= 0:
            continue
        ax.scatter(r.flops_speedup, r.rel_l2, marker="o", color="C0")
        ax.scatter(r.wall_speedup, r.rel_l2, marker="x", color="C1")
        ax.annotate(r.label, (r.flops_speedup, r.rel_l2), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.scatter([], [], marker="o", color="C0", label="FLOPs speedup")
    ax.scatter([], [], marker="x", color="C1", label="wall-clock speedup")
    ax.set_xlabel("speedup over full compute")
    ax.set_ylabel("relative L2 error (lower is better)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _json(report: BenchReport) -> str:
    s = report.settings
    payload = {
        "machine": report.machine,
        "deterministic": report.deterministic,
        "settings": {
            **{k: v for k, v in attrs.asdict(s, recurse=False).items() if k not in ("methods", "shared")},
            "digits": list(s.digits),
            "shared": dict(s.shared),
            "methods": [m.label for m in s.methods],
        },
        "results": result_rows(report.results),
    }
    return json.dumps(payload, indent=2, default=str)


def write_report(report: BenchReport, out: Path) -> list[Path]:
    """Write the report files into ``out``; return their paths."""
    check_writable(out)
    staging = Path(tempfile.mkdtemp(prefix=".hicache-report-", dir=out))
    try:
        (staging / "bench.json").write_text(_json(report))
        (staging / "bench.md").write_text(_markdown(report))
        _save_grid(report, staging / "samples.png")
        _save_plot(report, staging / "speed_vs_error.png")
        written = []
        for name in REPORT_FILES:
            target = out / name
            os.replace(staging / name, target)
            written.append(target)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
