"""Writing a bench report: JSON, Markdown, an image grid (an animated GIF for clips) and a speed-versus-error plot.

Everything is written to a temporary folder beside the target and moved into place only when
complete, so a failure never leaves a half-written report.

The JSON files (``bench.json`` here, ``compare.json`` in :mod:`.compare_report`) are strict JSON
(RFC 8259), readable by any parser: a number that is not finite is written as ``null``, never as
the ``Infinity``/``NaN`` tokens Python's ``json`` would emit. That concerns the PSNR of a row whose
images equal the reference (``+inf``, the ``full`` row) and a Frechet distance over a single sample
(``nan``); the Markdown tables spell those ``inf`` and ``nan``. See :func:`strict_json`.

Wall-clock figures come with their spread and flags (see :mod:`.wall`): the tables show each row's
per-repeat speedup range, the spread of its repeat times and a check column, and the report says in
one sentence whether the machine was quiet enough to trust the wall column.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import shutil
import tempfile
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from ..errors import InvalidParameterError
from .runner import BenchReport, MethodResult, format_number, result_rows
from .tasks import get_task
from .wall import WALL_SPREAD_TOLERANCE, format_flags, format_range, format_spread, wall_verdict

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image

__all__ = [
    "REPORT_FILES",
    "check_writable",
    "clip_grid_frames",
    "grid_columns",
    "markdown_table",
    "report_files",
    "sample_grid",
    "save_clip_grid",
    "speed_error_plot",
    "strict_json",
    "wall_check",
    "write_report",
]

REPORT_FILES = ("bench.json", "bench.md", "samples.png", "speed_vs_error.png")
"""The files of a digits report; a video report has the animated ``samples.gif`` instead of ``samples.png``."""

_COLUMNS = (
    ("method", lambda r: r.label),
    ("FLOPs speedup", lambda r: f"{r.flops_speedup:.2f}x"),
    ("wall speedup", lambda r: f"{r.wall_speedup:.2f}x"),
    ("wall range", lambda r: format_range(r.wall)),
    ("time spread", lambda r: format_spread(r.wall)),
    ("wall check", lambda r: format_flags(r.wall)),
    ("rel. L2", lambda r: format_number(r.rel_l2, 4)),
    ("PSNR dB", lambda r: format_number(r.psnr, 2)),
    ("SSIM", lambda r: format_number(r.ssim, 4)),
    ("accuracy", lambda r: f"{r.accuracy:.0%}"),
    ("Frechet", lambda r: format_number(r.frechet, 3)),
    ("full/forecast", lambda r: f"{r.full_steps}/{r.forecast_steps}"),
    ("cache MiB", lambda r: f"{r.cache_bytes / 2**20:.2f}"),
)


_TEMPORAL_COLUMN = ("temporal err", lambda r: format_number(r.temporal, 4))


def report_files(report: BenchReport) -> tuple[str, ...]:
    """The names of the files :func:`write_report` writes for ``report`` (its task's grid file)."""
    grid = get_task(report.settings.task).grid_file
    return tuple(grid if name == "samples.png" else name for name in REPORT_FILES)


def markdown_table(results: Sequence[MethodResult]) -> str:
    """The bench table in GitHub Markdown (with a temporal-error column when the samples are clips)."""
    columns: tuple[tuple[str, Callable[[MethodResult], str]], ...] = _COLUMNS
    if any(not math.isnan(r.temporal) for r in results):  # after the Frechet column
        at = [name for name, _ in _COLUMNS].index("Frechet") + 1
        columns = (*_COLUMNS[:at], _TEMPORAL_COLUMN, *_COLUMNS[at:])
    header = "| " + " | ".join(name for name, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    rows = ["| " + " | ".join(fmt(r) for _, fmt in columns) + " |" for r in results]
    return "\n".join([header, rule, *rows])


def wall_check(results: Sequence[MethodResult]) -> tuple[bool | None, str]:
    """Whether the wall column can be trusted (``None``: one repeat, not measured) and why, in a sentence."""
    return wall_verdict([(r.label, r.wall, r.wall_speedup, r.flops_speedup) for r in results])


def strict_json(payload: Any) -> str:
    """``payload`` as strict JSON: non-finite numbers become ``null`` (``allow_nan=False`` checks it)."""
    return json.dumps(_finite(payload), indent=2, allow_nan=False, default=str)


def _finite(value: Any) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


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
    task = get_task(s.task)
    lines = [
        "# hicache bench",
        "",
        f"Model: {task.describe}.",
        f"Machine: {report.machine}. {s.steps} steps, {len(digits)} {task.sample_noun} (digits {list(s.digits)}, "
        f"{s.seeds_per_digit} seeds each from {s.seed}), CFG {task.guidance if s.guidance is None else s.guidance}, "
        f"{s.repeats} interleaved repeats (wall speedup: "
        "median; wall range: the per-repeat speedups; time spread: slowest / fastest repeat time of the row).",
        f"Shared setting: {dict(s.shared)}. Repeats bit-identical: {report.deterministic}.",
        "",
        markdown_table(report.results),
        "",
        wall_check(report.results)[1],
        "",
        *task.notes,
        "",
        "Methods:",
        *[f"- `{r.label}`: {r.tag}" for r in report.results],
    ]
    return "\n".join(lines) + "\n"


def _ranges(values: Sequence[int]) -> str:
    """``0-3, 7`` for ``[0, 1, 2, 3, 7]``."""
    parts: list[str] = []
    ordered = sorted(set(values))
    start = prev = ordered[0]
    for v in [*ordered[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(parts)


def grid_columns(
    digits: Sequence[int], seeds: Sequence[int], max_columns: int = 40
) -> tuple[list[int], list[str], str]:
    """The samples ``samples.png`` shows, a label per column and a caption saying which seeds are shown.

    Samples ``i`` is ``(digits[i], seeds[i])``. Whole seeds are kept (every digit of a seed) while
    they fit in ``max_columns`` (the first seed always); the columns are ordered by digit, then seed.
    Returns ``(sample indices, column labels, caption)``.
    """
    if not digits or len(digits) != len(seeds):
        raise ValueError(f"expected aligned, non-empty digits and seeds, got {len(digits)} and {len(seeds)}")
    all_seeds = list(dict.fromkeys(seeds))
    shown: list[int] = []
    for seed in all_seeds:
        of_seed = [i for i, s in enumerate(seeds) if s == seed]
        if shown and len(shown) + len(of_seed) > max_columns:
            break
        shown += of_seed
    order = {d: k for k, d in enumerate(dict.fromkeys(digits))}
    shown.sort(key=lambda i: (order[digits[i]], all_seeds.index(seeds[i])))
    labels = [f"digit {digits[i]}\nseed {seeds[i]}" for i in shown]
    seeds_shown = sorted({seeds[i] for i in shown})
    if len(shown) == len(digits):
        caption = f"every sample: digits {_ranges(digits)}, seeds {_ranges(seeds_shown)} of each"
    else:
        caption = (
            f"{len(shown)} of {len(digits)} samples: seeds {_ranges(seeds_shown)} shown of {_ranges(all_seeds)} "
            f"(digits {_ranges(digits)})"
        )
    return shown, labels, "Rows: methods; columns: digit and seed. Shown: " + caption + "."


def sample_grid(report: BenchReport, max_columns: int = 40) -> Figure:
    """The image grid: one row per method, one labelled column per sample shown (see :func:`grid_columns`)."""
    from matplotlib.figure import Figure

    digits, seeds = report.settings.samples()
    shown, column_labels, caption = grid_columns(digits, seeds, max_columns)
    labels = [r.label for r in report.results]
    columns = len(shown)
    width = max(columns * 0.8 + 1.6, 6.0)
    fig = Figure(figsize=(width, len(labels) * 0.85 + 1.2))
    axes = fig.subplots(len(labels), columns, squeeze=False)
    for row, label in enumerate(labels):
        images = report.images[label]
        for col, index in enumerate(shown):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.imshow(images[index, 0].float().cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            if row == 0:
                ax.set_title(column_labels[col], fontsize=7)
        axes[row][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("\n".join(textwrap.wrap(caption, width=int(width * 14))), fontsize=8)
    fig.tight_layout()
    return fig


GIF_CELL = 64
"""Side in pixels of one clip's cell in ``samples.gif`` (frames are scaled up by a whole factor to about this)."""
GIF_FRAME_MS = 200
"""How long ``samples.gif`` shows each frame."""


def clip_grid_frames(report: BenchReport, max_columns: int = 40) -> list[Image.Image]:
    """The frames of ``samples.gif``: one row per method, one labelled column per clip (see :func:`grid_columns`).

    Frame ``t`` of the GIF shows frame ``t`` of every clip, so every clip plays in its cell; the
    method labels are on the left, ``digit/seed`` above each column.
    """
    from PIL import Image, ImageDraw

    digits, seeds = report.settings.samples()
    shown, _, _ = grid_columns(digits, seeds, max_columns)
    labels = [r.label for r in report.results]
    first = report.images[labels[0]]
    frames, side = first.shape[2], first.shape[-1] * max(1, GIF_CELL // first.shape[-1])
    pad, label_width, header = 2, 8 + 6 * max(len(label) for label in labels), 14
    width = label_width + len(shown) * (side + pad)
    height = header + len(labels) * (side + pad)
    base = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(base)
    for col, index in enumerate(shown):
        draw.text((label_width + col * (side + pad), 1), f"{digits[index]}/{seeds[index]}", fill=0)
    for row, label in enumerate(labels):
        draw.text((2, header + row * (side + pad) + side // 2 - 5), label, fill=0)
    pictures = []
    for t in range(frames):
        picture = base.copy()
        for row, label in enumerate(labels):
            clips = report.images[label]
            for col, index in enumerate(shown):
                pixels = (clips[index, 0, t].float().cpu().clamp(0, 1).numpy() * 255).round().astype("uint8")
                cell = Image.fromarray(pixels, mode="L").resize((side, side), Image.Resampling.NEAREST)
                picture.paste(cell, (label_width + col * (side + pad), header + row * (side + pad)))
        pictures.append(picture)
    return pictures


def save_clip_grid(report: BenchReport, path: Path, max_columns: int = 40) -> None:
    """Write the animated grid of clips (:func:`clip_grid_frames`) as a looping GIF."""
    first, *rest = clip_grid_frames(report, max_columns)
    first.save(path, format="GIF", save_all=True, append_images=rest, duration=GIF_FRAME_MS, loop=0)


def _save_sample_grid(report: BenchReport, path: Path) -> None:
    sample_grid(report).savefig(path, dpi=100)


_GRID_WRITERS: dict[str, Callable[[BenchReport, Path], None]] = {
    "samples.png": _save_sample_grid,
    "samples.gif": lambda report, path: save_clip_grid(report, path),
}
"""How each kind of grid file (a task's ``grid_file``) is drawn."""


def speed_error_plot(report: BenchReport) -> Figure:
    """Relative L2 error against FLOPs and wall speedups, every point labelled with its method.

    Rows with zero error (full compute, the reference) cannot sit on the log axis: the figure
    names them in a note instead.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    exact = []
    for r in report.results:
        if not r.rel_l2 > 0:
            exact.append(r.label)
            continue
        ax.scatter(r.flops_speedup, r.rel_l2, marker="o", color="C0")
        ax.scatter(r.wall_speedup, r.rel_l2, marker="x", color="C1")
        # the FLOPs point labelled above, the wall point below: readable even where the two coincide
        for x, offset, va in ((r.flops_speedup, 3, "bottom"), (r.wall_speedup, -3, "top")):
            ax.annotate(r.label, (x, r.rel_l2), fontsize=7, xytext=(3, offset), textcoords="offset points", va=va)
    ax.scatter([], [], marker="o", color="C0", label="FLOPs speedup")
    ax.scatter([], [], marker="x", color="C1", label="wall-clock speedup")
    ax.set_xlabel("speedup over full compute")
    ax.set_ylabel("relative L2 error (lower is better)")
    if len(exact) < len(report.results):  # a log axis needs a positive error to show
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if exact:
        ax.set_title("zero error, not on the log axis: " + ", ".join(exact), fontsize=8)
    fig.tight_layout()
    return fig


def _json(report: BenchReport) -> str:
    s = report.settings
    trusted, note = wall_check(report.results)
    payload = {
        "machine": report.machine,
        "deterministic": report.deterministic,
        "wall_check": {"tolerance": WALL_SPREAD_TOLERANCE, "trusted": trusted, "note": note},
        "settings": {
            **{k: v for k, v in attrs.asdict(s, recurse=False).items() if k not in ("methods", "shared")},
            "digits": list(s.digits),
            "shared": dict(s.shared),
            "methods": [m.label for m in s.methods],
        },
        "results": result_rows(report.results),
    }
    return strict_json(payload)


def write_report(report: BenchReport, out: Path) -> list[Path]:
    """Write the report files into ``out``; return their paths."""
    check_writable(out)
    staging = Path(tempfile.mkdtemp(prefix=".hicache-report-", dir=out))
    try:
        (staging / "bench.json").write_text(_json(report))
        (staging / "bench.md").write_text(_markdown(report))
        names = report_files(report)
        grid = get_task(report.settings.task).grid_file
        _GRID_WRITERS[grid](report, staging / grid)
        speed_error_plot(report).savefig(staging / "speed_vs_error.png", dpi=110)
        written = []
        for name in names:
            target = out / name
            os.replace(staging / name, target)
            written.append(target)
        for stale in set(_GRID_WRITERS) - set(names):  # another task's picture from an earlier run
            (out / stale).unlink(missing_ok=True)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
