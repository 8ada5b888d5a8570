"""``hicache frontier``: error against speedup, each method swept over its speed knob.

Each of this SDK's policies is swept over one knob (:data:`SWEEP`: the interval N of the
step-schedule policies, the threshold of the signal-driven ones), with every basis for the
policies that forecast (a ``max_order`` in their config) and ``taylor`` for those that only reuse;
the other libraries' caches are swept beside them (:data:`BASELINE_SWEEP`). Every point is one row
of ``hicache compare``'s machinery (:func:`.compare.run_compare`): its FLOPs counted over one whole
generation the same way for every row, its wall time the median of interleaved repeats with their
spread (:mod:`.wall`), its error against full compute on the same seeds.

Output: ``frontier.json`` (strict JSON, see :func:`.report.strict_json`), ``frontier.md`` (the
table) and ``frontier.png`` (relative L2 against the FLOPs speedup and against the wall speedup,
one line per policy x basis and per baseline, log error axis).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from ..errors import InvalidParameterError, did_you_mean
from ..models import DigitsModel
from ..registry import get_registry
from .compare import CompareReport, CompareResult, calibrate, run_compare
from .compare_report import settings_json
from .methods import PAPER_SETTING, MethodSpec, parse_params
from .report import check_writable, strict_json
from .rows import Attached, CompareRow, SdkAttached, Target, full_row
from .runner import BenchSettings, format_number
from .wall import WALL_SPREAD_TOLERANCE, format_flags, format_range, format_spread, wall_verdict

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "BASELINE_SWEEP",
    "DEFAULT_BASES",
    "FRONTIER_FILES",
    "SWEEP",
    "FrontierPoint",
    "FrontierReport",
    "Knob",
    "Series",
    "frontier_markdown",
    "frontier_plot",
    "frontier_table",
    "parse_knob_values",
    "plan_sweep",
    "run_frontier",
    "write_frontier",
]

FRONTIER_FILES = ("frontier.json", "frontier.md", "frontier.png")
#: the bases swept by default for the policies that forecast (``--bases`` takes any registered one)
DEFAULT_BASES: tuple[str, ...] = ("taylor", "hermite", "newton")
#: knobs whose values are step counts: integers in 1..steps
STEP_KNOBS = ("interval", "attention_interval")

Number = int | float


@attrs.frozen
class Knob:
    """The speed knob of one policy or baseline: its name, the default values and the ``--quick`` ones.

    ``shared`` are the settings every point of the sweep takes where the policy accepts them
    (``interval`` policies: the paper setting, W = 3, m = 2, sigma = 0.5; the others: sigma only,
    their own warm-up and order).
    """

    name: str
    values: tuple[Number, ...]
    quick: tuple[Number, ...]
    shared: Mapping[str, Any] = attrs.field(factory=lambda: {"sigma": PAPER_SETTING["sigma"]})


_INTERVALS = Knob("interval", (2, 3, 5, 8), (2, 3), shared=dict(PAPER_SETTING))

#: this SDK's policies and their knobs; a policy not registered here is skipped with a note
SWEEP: Mapping[str, Knob] = {
    "fora": _INTERVALS,
    "taylorseer": _INTERVALS,
    "clusca": _INTERVALS,
    "first_block": Knob("threshold", (0.1, 0.2, 0.4, 0.8), (0.1, 0.4)),
    "easycache": Knob("threshold", (0.02, 0.05, 0.1, 0.2), (0.05, 0.2)),
    "speca": Knob("threshold", (2.0, 4.0, 7.0, 15.0), (2.0, 7.0)),
    "pab": Knob("attention_interval", (2, 3, 4, 6), (2, 4)),
}

#: the other libraries' caches (see :mod:`.baselines`), each over its own knob
BASELINE_SWEEP: Mapping[str, Knob] = {
    "diffusers-first-block": Knob("threshold", (0.1, 0.2, 0.3, 0.4), (0.1, 0.3)),
    "diffusers-magcache": Knob("threshold", (0.06, 0.15, 0.3, 0.6), (0.06, 0.3)),
    "diffusers-taylorseer": Knob("interval", (2, 3, 5, 8), (2, 3)),
    "cache-dit": Knob("threshold", (0.08, 0.16, 0.25, 0.4), (0.08, 0.25)),
}
_BASELINE_TITLES = {
    "diffusers-first-block": "diffusers First Block Cache",
    "diffusers-magcache": "diffusers MagCache",
    "diffusers-taylorseer": "diffusers TaylorSeer (paper units)",
    "cache-dit": "cache-dit DBCache + TaylorSeer O1",
}


@attrs.frozen
class Series:
    """One line of the frontier: a policy with a basis (``family="hicache"``), or a baseline."""

    name: str  # "taylorseer+hermite", "fora", "diffusers-magcache"
    family: str  # "hicache", "diffusers" or "cache-dit"
    knob: str
    values: tuple[Number, ...]
    policy: str | None = None
    basis: str = "taylor"
    shared: Mapping[str, Any] = attrs.field(factory=dict)

    @property
    def title(self) -> str:
        return _BASELINE_TITLES.get(self.name, self.name)

    def label(self, value: Number) -> str:
        return f"{self.name} {self.knob}={_fmt(value)}"

    def spec(self, value: Number) -> MethodSpec:
        """This SDK's method at ``value`` (only for ``family="hicache"``)."""
        assert self.policy is not None
        return MethodSpec(label=self.label(value), policy=self.policy, basis=self.basis, params={self.knob: value})


@attrs.frozen
class FrontierPoint:
    """One measured point: a series at one knob value (``series`` is ``"full"`` for the reference)."""

    series: str
    family: str
    knob: str
    value: Number | None
    result: CompareResult


@attrs.frozen
class FrontierReport:
    """The points, the compare report they come from, and the notes on what was skipped."""

    compare: CompareReport
    series: tuple[Series, ...]
    points: tuple[FrontierPoint, ...]
    notes: tuple[str, ...] = ()


def _fmt(value: Number) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def parse_knob_values(items: Sequence[str]) -> dict[str, tuple[Number, ...]]:
    """``["taylorseer=3,5,8", "cache-dit=0.1,0.3"]`` -> ``{"taylorseer": (3, 5, 8), "cache-dit": (0.1, 0.3)}``.

    Values are sorted and must be finite numbers > 0; errors name ``--knob-values``.
    """
    parsed: dict[str, tuple[Number, ...]] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name or not text.strip():
            raise InvalidParameterError(f"--knob-values {item!r}: expected NAME=v1,v2,... (e.g. taylorseer=3,5,8)")
        if name in parsed:
            raise InvalidParameterError(f"--knob-values names {name!r} twice")
        values = [parse_params([f"v={v}"])["v"] for v in text.split(",") if v.strip()]
        for value in values:
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and value > 0)
            ):
                raise InvalidParameterError(f"--knob-values {name}: values must be finite numbers > 0, got {value!r}")
        if len(set(values)) != len(values):
            raise InvalidParameterError(f"--knob-values {name}: a value is listed twice in {text!r}")
        parsed[name] = tuple(sorted(values))
    return parsed


def _forecasts(policy: str, shared: Mapping[str, Any]) -> bool:
    """Whether the policy forecasts through a basis: a ``max_order`` > 0 (shared, else its default).

    Policies without one, or at order 0, only reuse: the basis changes nothing, so only ``taylor`` runs.
    """
    config = get_registry().get("policy", policy).obj.Config
    field = next((f for f in attrs.fields(config) if f.name == "max_order"), None)
    if field is None:
        return False
    order = shared.get("max_order", field.default)
    return not isinstance(order, int) or order > 0


def _knob_of(policy: str) -> Knob | None:
    """The sweep's knob for ``policy``; for a policy it does not list, ``interval`` if the policy has one."""
    if policy in SWEEP:
        return SWEEP[policy]
    fields = {f.name for f in attrs.fields(get_registry().get("policy", policy).obj.Config)}
    return _INTERVALS if "interval" in fields else None


def _check_value(series: Series, value: Number, steps: int, option: str) -> None:
    if series.knob in STEP_KNOBS and (not isinstance(value, int) or not 1 <= value <= steps):
        raise InvalidParameterError(
            f"{option} {series.name}: {series.knob} must be an integer in 1..{steps} (the steps), got {value!r}"
        )
    if series.family != "hicache":
        return
    try:
        series.spec(value).accelerator(series.shared)
    except (InvalidParameterError, TypeError, ValueError) as exc:
        raise InvalidParameterError(f"{option} {series.name}: {series.knob}={value!r} is refused: {exc}") from exc


def _values(
    name: str,
    knob: Knob,
    knob_values: Mapping[str, Sequence[Number]],
    quick: bool,
    steps: int,
    notes: list[str],
) -> tuple[Number, ...]:
    """The values given for ``name``, else its defaults less the step counts beyond ``steps`` (with a note)."""
    if name in knob_values:
        return tuple(knob_values[name])
    values = knob.quick if quick else knob.values
    if knob.name in STEP_KNOBS:
        dropped = [v for v in values if v > steps]
        if dropped:
            left = "left out" if len(dropped) < len(values) else "all left out, so it is skipped"
            notes.append(f"note: {name}: {knob.name} {dropped} exceed the {steps} steps; {left}")
        values = tuple(v for v in values if v <= steps)
    return values


def plan_sweep(
    *,
    policies: Sequence[str] | None,
    bases: Sequence[str] | None,
    knob_values: Mapping[str, Sequence[Number]],
    baselines: Sequence[str],
    quick: bool,
    steps: int,
) -> tuple[list[Series], list[str]]:
    """The series to run, and notes on what is skipped. Checks every name and value; errors name the option.

    ``policies=None``: every policy of :data:`SWEEP`, those not registered skipped with a note.
    ``bases=None``: :data:`DEFAULT_BASES` (the registered ones) for policies that forecast, ``taylor``
    only with ``quick``.
    """
    registered = set(get_registry().entries("policy"))
    known_bases = set(get_registry().entries("basis"))
    notes: list[str] = []
    if bases is not None:
        for basis in bases:
            if basis not in known_bases:
                raise InvalidParameterError(
                    f"--bases: unknown basis {basis!r} (registered: {', '.join(sorted(known_bases))})."
                    f"{did_you_mean(basis, known_bases)}"
                )
    if bases is not None:
        chosen_bases = list(dict.fromkeys(bases))
    else:  # --quick: one line per policy
        chosen_bases = ["taylor"] if quick else [b for b in DEFAULT_BASES if b in known_bases]
    explicit = policies is not None
    names = list(dict.fromkeys(policies)) if policies is not None else list(SWEEP)
    series: list[Series] = []
    for policy in names:
        if policy not in registered:
            if policy not in SWEEP:
                known = sorted(registered | set(SWEEP))
                raise InvalidParameterError(
                    f"--policies: unknown policy {policy!r} (known: {', '.join(known)}).{did_you_mean(policy, known)}"
                )
            notes.append(f"note: policy {policy!r} is not registered here; skipped")
            continue
        knob = _knob_of(policy)
        if knob is None:
            raise InvalidParameterError(
                f"--policies: no speed knob known for policy {policy!r} (the sweep knows {', '.join(SWEEP)})"
            )
        fields = {f.name for f in attrs.fields(get_registry().get("policy", policy).obj.Config)}
        if knob.name not in fields:
            message = f"policy {policy!r} has no parameter {knob.name!r} (it has {', '.join(sorted(fields))})"
            if explicit:
                raise InvalidParameterError(f"--policies: {message}")
            notes.append(f"note: {message}; skipped")
            continue
        values = _values(policy, knob, knob_values, quick, steps, notes)
        if not values:
            continue
        for basis in chosen_bases if _forecasts(policy, knob.shared) else ["taylor"]:
            name = policy if basis == "taylor" else f"{policy}+{basis}"
            series.append(Series(name, "hicache", knob.name, values, policy=policy, basis=basis, shared=knob.shared))
    for baseline in dict.fromkeys(baselines):
        knob = BASELINE_SWEEP[baseline]
        family = "cache-dit" if baseline == "cache-dit" else "diffusers"
        values = _values(baseline, knob, knob_values, quick, steps, notes)
        if not values:
            continue
        series.append(Series(baseline, family, knob.name, values))
    swept = {s.policy or s.name for s in series}
    for name in knob_values:
        if name not in swept:
            raise InvalidParameterError(
                f"--knob-values names {name!r}, which this sweep does not run (it runs {', '.join(sorted(swept))})"
            )
    for s in series:
        for value in s.values:
            _check_value(s, value, steps, "--knob-values" if (s.policy or s.name) in knob_values else "default value:")
    if not series:
        raise InvalidParameterError("nothing to sweep: no registered policy and no baseline chosen")
    return series, notes


def _sdk_row(series: Series, value: Number) -> CompareRow:
    accelerator = series.spec(value).accelerator(series.shared)
    assert accelerator is not None

    def attach(model: DigitsModel) -> Attached:
        return SdkAttached(model, accelerator.apply(model.transformer))

    return CompareRow(label=series.label(value), family="hicache", setting=accelerator.tag, attach=attach)


def _baseline_row(series: Series, value: Number, model: DigitsModel, steps: int, ratios: Sequence[float]) -> CompareRow:
    from .baselines import cache_dit_row, first_block_cache_row, mag_cache_row, taylorseer_matched_row

    if series.name == "diffusers-first-block":
        row = first_block_cache_row(float(value))
    elif series.name == "diffusers-magcache":
        row = mag_cache_row(ratios, steps, float(value))
    elif series.name == "diffusers-taylorseer":
        warmup = int(PAPER_SETTING["warmup"])
        row = taylorseer_matched_row(Target(_fmt(value), int(value), warmup), int(PAPER_SETTING["max_order"]))
    else:
        row = cache_dit_row(model, steps, float(value))
    return attrs.evolve(row, label=series.label(value))


def run_frontier(
    settings: BenchSettings,
    series: Sequence[Series],
    *,
    model: DigitsModel,
    progress: Callable[[str], None] | None = None,
    notes: Sequence[str] = (),
) -> FrontierReport:
    """Run every point of ``series`` beside full compute (one :func:`.compare.run_compare`)."""
    ratios: list[float] = []
    if any(s.name == "diffusers-magcache" for s in series):
        if progress:
            progress("calibrating MagCache")
        ratios = calibrate(model, settings)
    rows = [full_row()]
    keys: list[tuple[Series, Number]] = []
    for s in series:
        for value in s.values:
            make = (
                _sdk_row(s, value) if s.family == "hicache" else _baseline_row(s, value, model, settings.steps, ratios)
            )
            rows.append(make)
            keys.append((s, value))
    report = run_compare(settings, rows, model=model, progress=progress, mag_ratios=ratios)
    full = report.results[0]
    points = [FrontierPoint("full", full.family, "-", None, full)]
    for (s, value), result in zip(keys, report.results[1:], strict=True):
        points.append(FrontierPoint(s.name, s.family, s.knob, value, result))
    return FrontierReport(compare=report, series=tuple(series), points=tuple(points), notes=tuple(notes))


# --------------------------------------------------------------------------- writing


def _speedup(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.2f}x"


def _score(point: FrontierPoint, name: str, digits: int) -> str:
    scores = point.result.scores
    return "-" if scores is None else format_number(getattr(scores, name), digits)


_COLUMNS: tuple[tuple[str, Callable[[FrontierPoint], str]], ...] = (
    ("series", lambda p: p.series),
    ("library", lambda p: p.family),
    ("knob", lambda p: "-" if p.value is None else f"{p.knob}={_fmt(p.value)}"),
    ("FLOPs speedup", lambda p: _speedup(p.result.flops_speedup)),
    ("wall speedup", lambda p: _speedup(p.result.wall_speedup)),
    ("wall range", lambda p: format_range(p.result.wall)),
    ("time spread", lambda p: format_spread(p.result.wall)),
    ("wall check", lambda p: format_flags(p.result.wall)),
    ("rel. L2", lambda p: _score(p, "rel_l2", 4)),
    ("PSNR dB", lambda p: _score(p, "psnr", 2)),
    ("full/forecast", lambda p: p.result.steps),
)


def frontier_table(points: Sequence[FrontierPoint]) -> str:
    """The frontier in GitHub Markdown, one row per point; skipped points show ``-`` and why below."""
    header = "| " + " | ".join(name for name, _ in _COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in _COLUMNS) + "|"
    rows = []
    for p in points:
        cells = [fmt(p) for _, fmt in _COLUMNS]
        if p.result.skipped:
            cells = [*cells[:3], "skipped", *["-"] * (len(_COLUMNS) - 4)]
        rows.append("| " + " | ".join(cells) + " |")
    skipped = {p.series: p.result.skipped for p in points if p.result.skipped}
    notes = [f"- `{name}` skipped: {why}" for name, why in skipped.items()]
    return "\n".join([header, rule, *rows, *(["", *notes] if notes else [])])


def _wall_check(report: FrontierReport) -> tuple[bool | None, str]:
    results = [p.result for p in report.points if p.result.skipped is None]
    return wall_verdict([(r.label, r.wall, r.wall_speedup, r.flops_speedup) for r in results])


_BASIS_STYLES = {"taylor": ("-", "o"), "hermite": ("--", "^"), "newton": (":", "s"), "scaled_taylor": ("-.", "D")}


def _style(series: Series, colors: dict[str, str]) -> dict[str, Any]:
    if series.family == "hicache":
        assert series.policy is not None
        color = colors.setdefault(series.policy, f"C{len(colors) % 10}")
        linestyle, marker = _BASIS_STYLES.get(series.basis, ("-.", "v"))
        return {"color": color, "linestyle": linestyle, "marker": marker}
    baseline_colors = ("#000000", "#b8860b", "#8b008b", "#17becf")
    color = baseline_colors[list(BASELINE_SWEEP).index(series.name) % len(baseline_colors)]
    return {"color": color, "linestyle": (0, (5, 2, 1, 2)), "marker": "X"}


def frontier_plot(report: FrontierReport) -> Figure:
    """Two panels, relative L2 (log) against the FLOPs speedup and against the wall speedup.

    One line per series through its knob values in order; the wall panel's bars are the per-repeat
    speedups (see :mod:`.wall`). Points with zero error (full compute) cannot sit on the log axis.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13.0, 7.2))
    flops_ax, wall_ax = fig.subplots(1, 2, sharey=True)
    colors: dict[str, str] = {}
    exact: list[str] = []
    for series in report.series:
        points = sorted(
            (p for p in report.points if p.series == series.name and p.value is not None and p.result.scores),
            key=lambda p: float(p.value or 0),
        )
        errors = [p.result.scores.rel_l2 if p.result.scores else 0.0 for p in points]
        exact += [p.result.label for p, e in zip(points, errors, strict=True) if not e > 0]
        points = [p for p, e in zip(points, errors, strict=True) if e > 0]
        errors = [e for e in errors if e > 0]
        if not points:
            continue
        style = _style(series, colors)
        flops_ax.plot([p.result.flops_speedup for p in points], errors, label=series.title, markersize=5, **style)
        walls = [p.result.wall_speedup for p in points]
        low = [w - p.result.wall.speedup_min if p.result.wall else 0.0 for p, w in zip(points, walls, strict=True)]
        high = [p.result.wall.speedup_max - w if p.result.wall else 0.0 for p, w in zip(points, walls, strict=True)]
        bars = [[max(0.0, v) for v in low], [max(0.0, v) for v in high]]
        wall_ax.errorbar(walls, errors, xerr=bars, markersize=5, capsize=2, elinewidth=0.8, **style)
    for ax, what in ((flops_ax, "counted FLOPs speedup"), (wall_ax, "wall-clock speedup (median; bars: per-repeat)")):
        ax.set_xlabel(f"{what} over full compute")
        ax.grid(True, which="both", alpha=0.3)
        if ax.has_data():  # a log axis needs a positive error to show
            ax.set_yscale("log")
    flops_ax.set_ylabel("relative L2 error vs full compute (lower is better)")
    flops_ax.set_title("error vs counted FLOPs speedup", fontsize=10)
    wall_ax.set_title("error vs wall speedup", fontsize=10)
    settings = report.compare.settings
    digits, _ = settings.samples()
    title = (
        f"hicache frontier: {report.compare.machine}; {settings.steps} steps, {len(digits)} samples, "
        f"{settings.repeats} interleaved repeats"
    )
    if exact:
        title += "\nzero error (same images as full compute), not on the log axis: " + ", ".join(exact)
    fig.suptitle("\n".join(line for part in title.split("\n") for line in textwrap.wrap(part, 190)), fontsize=9)
    handles, labels = flops_ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    rows = math.ceil(len(handles) / 5) if handles else 0
    fig.tight_layout(rect=(0, 0.028 * rows + 0.01, 1, 1))
    return fig


def _json(report: FrontierReport, command: str) -> str:
    c = report.compare
    s = c.settings
    trusted, note = _wall_check(report)
    payload = {
        "command": command,
        "machine": c.machine,
        "deterministic": c.deterministic,
        "wall_check": {"tolerance": WALL_SPREAD_TOLERANCE, "trusted": trusted, "note": note},
        "full_flops_counts": list(c.full_flops_counts),
        "mag_ratios": list(c.mag_ratios),
        "settings": settings_json(s),
        "sweep": {
            r.name: {"family": r.family, "knob": r.knob, "values": list(r.values), "shared": dict(r.shared)}
            for r in report.series
        },
        "notes": list(report.notes),
        "points": [
            {"series": p.series, "knob": p.knob, "value": p.value, **attrs.asdict(p.result)} for p in report.points
        ],
    }
    return strict_json(payload)


def frontier_markdown(report: FrontierReport, *, command: str) -> str:
    """The whole ``frontier.md``: settings, the table, the wall check and each series' exact setting."""
    c = report.compare
    s = c.settings
    digits, _ = s.samples()
    lines = [
        "# hicache frontier",
        "",
        f"Machine: {c.machine}. {s.steps} steps, {len(digits)} samples (digits {list(s.digits)}, "
        f"{s.seeds_per_digit} seeds each from {s.seed}), CFG batched, {s.repeats} interleaved repeats (wall speedup: "
        "median; wall range: the per-repeat speedups; time spread: slowest / fastest repeat time of the row).",
        f"Command: `{command}`. Repeats bit-identical: {c.deterministic}.",
        "",
        frontier_table(report.points),
        "",
        _wall_check(report)[1],
        "",
        "FLOPs are counted by torch's FlopCounterMode over one whole generation, the same way for every row "
        "(other libraries included); errors are against full compute on the same seeds.",
        "",
        "Settings (first value of each series):",
    ]
    for series in report.series:
        first = next((p for p in report.points if p.series == series.name), None)
        if first is not None:
            lines.append(f"- `{series.name}` over {series.knob} {[*series.values]}: `{first.result.setting}`")
    if c.mag_ratios:
        lines.append(
            f"- MagCache ratios calibrated by diffusers on held-out seeds: {[round(r, 4) for r in c.mag_ratios]}"
        )
    if report.notes:
        lines += ["", *[f"- {n}" for n in report.notes]]
    return "\n".join(lines) + "\n"


def write_frontier(report: FrontierReport, out: Path, *, command: str) -> list[Path]:
    """Write ``frontier.json``, ``frontier.md`` and ``frontier.png`` into ``out`` (all or none); return their paths."""
    check_writable(out)
    staging = Path(tempfile.mkdtemp(prefix=".hicache-frontier-", dir=out))
    try:
        (staging / "frontier.json").write_text(_json(report, command))
        (staging / "frontier.md").write_text(frontier_markdown(report, command=command))
        frontier_plot(report).savefig(staging / "frontier.png", dpi=110)
        written = []
        for name in FRONTIER_FILES:
            os.replace(staging / name, out / name)
            written.append(out / name)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
