"""Adapters compared: paper-faithful units against whole-block residual units.

Run ``python -m hicache_sdk.bench.adapters`` (``--help`` for options, ``--quick`` for a smoke test).
It measures two things and prints them as Markdown (``--out FOLDER`` also writes ``adapters.json``
and ``adapters.md``):

A. On the embedded digits model (a stock ``FluxTransformer2DModel``, trained): the ``flux`` adapter
   (attention and MLP units, cached before their gates) against the ``generic`` adapter (one
   residual unit per whole block), each with ``taylorseer`` (taylor basis, m = 2, W = 3) and with
   ``fora``, at intervals N in :data:`INTERVALS`. Per point: the counted FLOPs speedup of the run
   summary and the relative L2 error against full compute on the same samples (the bench's
   :func:`~hicache_sdk.bench.runner.run_bench`). The two adapters do not save exactly the same FLOPs
   at one N (the flux adapter still computes each block's modulation and gates), so the error
   ratio is also given at equal FLOPs: the generic error at the flux point's FLOPs speedup,
   interpolated linearly in log(error) along the generic curve of the same policy.

B. On the tiny random-weight model of every family (:data:`~hicache_sdk.testing.families.FAMILY_CASES`),
   at the paper setting (taylorseer, N = 7, W = 3, m = 2) and batch 1: for the adapter chosen
   automatically and for the ``generic`` adapter forced on the same model, the counted FLOPs speedup,
   the units per block, whether the adapter offers token paths (ClusCa), and the share of leaf-module
   calls a cached generation skips against an uncached one (forward pre-hooks on every module
   without children). Random weights say nothing about accuracy: these figures count work only.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any

import attrs
import torch

from ..accelerator import CacheHandle, compose
from ..errors import InvalidParameterError
from ..models import DigitsModel, load_digits_model
from ..registry import get_registry
from ..testing.families import FAMILY_CASES
from ..testing.model_case import ModelCase
from .compare_report import settings_json
from .methods import FULL, PAPER_SETTING, MethodSpec
from .report import check_writable, strict_json
from .runner import BenchReport, BenchSettings, format_number, machine_description, run_bench

__all__ = [
    "ADAPTERS",
    "ADAPTERS_FILES",
    "FAMILY_SETTING",
    "INTERVALS",
    "POLICIES",
    "QUICK_INTERVALS",
    "AdaptersReport",
    "DigitsPoint",
    "EqualFlops",
    "FamilyRow",
    "adapters_markdown",
    "digits_settings",
    "digits_table",
    "equal_flops",
    "equal_flops_table",
    "families_table",
    "family_row",
    "interpolate_log_error",
    "leaf_calls",
    "main",
    "run_digits",
    "run_families",
    "write_adapters",
]

ADAPTERS_FILES = ("adapters.json", "adapters.md")
#: the adapters compared on the digits model: paper-faithful units first, then whole blocks
ADAPTERS: tuple[str, ...] = ("flux", "generic")
#: the policies run at every interval (same schedule: the paper's W = 3; taylorseer with m = 2)
POLICIES: tuple[str, ...] = ("taylorseer", "fora")
INTERVALS: tuple[int, ...] = (3, 5, 7)
QUICK_INTERVALS: tuple[int, ...] = (3, 5)
#: the paper setting of part B (taylor basis: the paper's sigma does not apply)
FAMILY_SETTING: Mapping[str, Any] = {"interval": 7, "warmup": 3, "max_order": 2}
RANDOM_WEIGHTS_NOTE = (
    "Random weights say nothing about accuracy: these figures count work only (FLOPs counted by the run "
    "summary, leaf-module calls counted by forward pre-hooks)."
)


# --------------------------------------------------------------------------- A: digits model


@attrs.frozen
class DigitsPoint:
    """One adapter x policy x interval on the digits model, against full compute on the same samples."""

    adapter: str
    policy: str
    interval: int
    flops_speedup: float  # the run summary's counted FLOPs speedup
    rel_l2: float
    psnr: float
    full_steps: int
    forecast_steps: int
    setting: str  # the accelerator's tag


@attrs.frozen
class EqualFlops:
    """The generic adapter against the flux adapter for one policy at one interval.

    ``ratio`` compares the errors at the same N; ``generic_at_flux`` is the generic error
    interpolated at the flux point's FLOPs speedup (``None`` when the generic curve does not
    bracket it), and ``ratio_at_flux`` that error over the flux error.
    """

    policy: str
    interval: int
    flux_speedup: float
    flux_error: float
    generic_speedup: float
    generic_error: float
    ratio: float
    generic_at_flux: float | None
    ratio_at_flux: float | None


def digits_settings(*, quick: bool = False, steps: int | None = None) -> BenchSettings:
    """The samples of ``hicache frontier``: 10 (digits 0-9, one seed) over 50 steps; ``quick``: 2 over 20."""
    return BenchSettings(
        methods=(),
        steps=steps if steps is not None else (20 if quick else 50),
        digits=(3, 8) if quick else tuple(range(10)),
        seeds_per_digit=1,
        repeats=1,
    )


def _label(adapter: str, policy: str, interval: int) -> str:
    return f"{policy} {adapter} N={interval}"


def _specs(adapters: Sequence[str], policies: Sequence[str], intervals: Sequence[int]) -> tuple[MethodSpec, ...]:
    """Full compute and every adapter x policy x interval (the adapter forced through ``compose``)."""
    specs = [MethodSpec(label=FULL, policy=None)]
    for adapter in adapters:
        for policy in policies:
            for n in intervals:
                params = {"interval": n, "adapter": adapter}
                specs.append(MethodSpec(label=_label(adapter, policy, n), policy=policy, params=params))
    return tuple(specs)


def run_digits(
    settings: BenchSettings,
    *,
    intervals: Sequence[int] = INTERVALS,
    adapters: Sequence[str] = ADAPTERS,
    policies: Sequence[str] = POLICIES,
    model: DigitsModel | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[DigitsPoint], BenchReport]:
    """Every adapter x policy x interval on the digits model, scored by :func:`.runner.run_bench`.

    ``settings.methods`` is replaced by the points; its ``shared`` settings (the paper's W and m)
    apply where the policy takes them.
    """
    settings = attrs.evolve(settings, methods=_specs(adapters, policies, intervals))
    report = run_bench(settings, model=model or load_digits_model(), progress=progress)
    by_label = {r.label: r for r in report.results}
    points = []
    for adapter in adapters:
        for policy in policies:
            for n in intervals:
                r = by_label[_label(adapter, policy, n)]
                points.append(
                    DigitsPoint(
                        adapter=adapter,
                        policy=policy,
                        interval=n,
                        flops_speedup=r.flops_speedup,
                        rel_l2=r.rel_l2,
                        psnr=r.psnr,
                        full_steps=r.full_steps,
                        forecast_steps=r.forecast_steps,
                        setting=r.tag,
                    )
                )
    return points, report


def interpolate_log_error(curve: Sequence[tuple[float, float]], speedup: float) -> float | None:
    """The error at ``speedup`` on ``curve`` (``(speedup, error)`` points), linear in log(error).

    ``None`` when no two neighbouring points (sorted by speedup) bracket ``speedup``, or when an
    error needed is not a positive finite number.
    """
    points = sorted((s, e) for s, e in curve if math.isfinite(s))
    for (s0, e0), (s1, e1) in pairwise(points):
        if not s0 <= speedup <= s1:
            continue
        if not (e0 > 0 and e1 > 0 and math.isfinite(e0) and math.isfinite(e1)):
            return None
        if s1 == s0:
            return math.exp((math.log(e0) + math.log(e1)) / 2)
        t = (speedup - s0) / (s1 - s0)
        return math.exp(math.log(e0) + t * (math.log(e1) - math.log(e0)))
    exact = [e for s, e in points if s == speedup and e > 0 and math.isfinite(e)]
    return exact[0] if exact else None


def equal_flops(points: Sequence[DigitsPoint], *, paper: str = "flux", block: str = "generic") -> list[EqualFlops]:
    """For each policy and interval measured with both adapters: the error ratios ``block / paper``."""
    rows = []
    for policy in dict.fromkeys(p.policy for p in points):
        mine = {(p.adapter, p.interval): p for p in points if p.policy == policy}
        curve = [(p.flops_speedup, p.rel_l2) for p in points if p.policy == policy and p.adapter == block]
        for n in sorted({p.interval for p in points if p.policy == policy}):
            flux, generic = mine.get((paper, n)), mine.get((block, n))
            if flux is None or generic is None:
                continue
            at_flux = interpolate_log_error(curve, flux.flops_speedup)
            rows.append(
                EqualFlops(
                    policy=policy,
                    interval=n,
                    flux_speedup=flux.flops_speedup,
                    flux_error=flux.rel_l2,
                    generic_speedup=generic.flops_speedup,
                    generic_error=generic.rel_l2,
                    ratio=_ratio(generic.rel_l2, flux.rel_l2),
                    generic_at_flux=at_flux,
                    ratio_at_flux=None if at_flux is None else _ratio(at_flux, flux.rel_l2),
                )
            )
    return rows


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


# --------------------------------------------------------------------------- B: families


@attrs.frozen
class FamilyRow:
    """One adapter on one family's tiny random-weight model (``error``: why it could not run)."""

    family: str
    model: str
    adapter: str
    automatic: bool  # the adapter chosen when none is named (else forced)
    error: str | None = None
    flops_speedup: float = math.nan
    units_per_block: tuple[int, ...] = ()  # unit keys per block index, in run order
    token_paths: bool = False  # adapter.provides_token_paths (ClusCa)
    calls_uncached: int = 0  # leaf-module calls of one uncached generation
    calls_cached: int = 0
    full_steps: int = 0
    forecast_steps: int = 0

    @property
    def units(self) -> int:
        return sum(self.units_per_block)

    @property
    def calls_skipped(self) -> float:
        """``1 - cached / uncached`` leaf-module calls (``nan`` without a count)."""
        return 1.0 - self.calls_cached / self.calls_uncached if self.calls_uncached else math.nan


@contextmanager
def leaf_calls(model: torch.nn.Module) -> Iterator[list[int]]:
    """Count calls of every module without children of ``model`` (forward pre-hooks); ``[count]``."""
    count = [0]

    def hook(module: torch.nn.Module, args: Any) -> None:
        count[0] += 1

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        yield count
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads set to ``threads`` inside (``None``: unchanged), restored after."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _generate(case: ModelCase, model: torch.nn.Module, steps: int, handle: CacheHandle | None = None) -> None:
    """One generation at batch 1: ``steps`` calls at noise levels 1, 1 - 1/steps, ... on the same inputs."""
    if handle is not None:
        handle.reset(num_steps=steps)
    with torch.no_grad():
        for step in range(steps):
            model(**case.inputs(1, 1.0 - step / steps, 0))


def _units_per_block(handle: CacheHandle) -> tuple[int, ...]:
    """Unit keys per block index (in run order) over the handle's contexts."""
    blocks: dict[int, set[str]] = {}
    for ctx in handle.runtime.contexts.values():
        for key, unit in ctx.units.items():
            blocks.setdefault(unit.block, set()).add(key)
    return tuple(len(blocks[b]) for b in sorted(blocks))


def family_row(
    name: str,
    case: ModelCase,
    adapter: str | None,
    *,
    steps: int,
    setting: Mapping[str, Any] = FAMILY_SETTING,
    policy: str = "taylorseer",
    uncached_calls: int | None = None,
) -> FamilyRow:
    """``policy`` with ``adapter`` (``None``: the one chosen automatically) on ``case``'s model.

    ``uncached_calls``: the leaf calls of an uncached generation of ``steps`` steps, if already
    counted. An adapter that fails to attach or to run gives a row with ``error`` set.
    """
    model = case.build()
    automatic = get_registry().select_adapter(model).name
    chosen = adapter or automatic
    row = FamilyRow(family=name, model=type(model).__name__, adapter=chosen, automatic=chosen == automatic)
    if uncached_calls is None:
        with leaf_calls(model) as counted:
            _generate(case, model, steps)
        uncached_calls = counted[0]
    try:
        handle = compose(policy, adapter=adapter, **setting).apply(model)
    except Exception as exc:  # reported in the table, not raised: e.g. no block list the generic adapter knows
        return attrs.evolve(row, error=_error(exc, "attach"))
    try:
        with leaf_calls(model) as counted:
            _generate(case, model, steps, handle)
        summary = handle.summary()
        return attrs.evolve(
            row,
            flops_speedup=summary.flops_speedup,
            units_per_block=_units_per_block(handle),
            token_paths=handle.adapter.provides_token_paths,
            calls_uncached=uncached_calls,
            calls_cached=counted[0],
            full_steps=summary.full_steps,
            forecast_steps=summary.forecast_steps,
        )
    except Exception as exc:  # e.g. a block whose outputs the generic adapter cannot map to its inputs
        return attrs.evolve(row, error=_error(exc, "run"))
    finally:
        handle.remove()


def _error(exc: Exception, when: str) -> str:
    first = str(exc).split("\n", 1)[0]
    return f"{when}: {type(exc).__name__}: {first}"


def run_families(
    *,
    steps: int,
    cases: Mapping[str, ModelCase] = FAMILY_CASES,
    setting: Mapping[str, Any] = FAMILY_SETTING,
    threads: int | None = 1,
    progress: Callable[[str], None] | None = None,
) -> list[FamilyRow]:
    """For every case: the adapter chosen automatically, then ``generic`` forced (unless it was chosen).

    ``threads``: torch's CPU threads meanwhile (the models are tiny: one thread is fastest; counts
    do not depend on it).
    """
    rows = []
    with _threads(threads):
        for name, case in cases.items():
            if progress:
                progress(f"family {name}")
            model = case.build()
            with leaf_calls(model) as counted:
                _generate(case, model, steps)
            auto = family_row(name, case, None, steps=steps, setting=setting, uncached_calls=counted[0])
            rows.append(auto)
            if auto.adapter != "generic":
                rows.append(family_row(name, case, "generic", steps=steps, setting=setting, uncached_calls=counted[0]))
    return rows


# --------------------------------------------------------------------------- tables


def _x(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.2f}x"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def digits_table(points: Sequence[DigitsPoint]) -> str:
    """One row per adapter x policy x interval: FLOPs speedup, rel. L2 and PSNR against full compute."""
    header = ("adapter", "policy", "N", "FLOPs speedup", "rel. L2", "PSNR dB", "full/forecast")
    rows = [
        (
            p.adapter,
            p.policy,
            str(p.interval),
            _x(p.flops_speedup),
            format_number(p.rel_l2, 4),
            format_number(p.psnr, 2),
            f"{p.full_steps}/{p.forecast_steps}",
        )
        for p in points
    ]
    return _table(header, rows)


def equal_flops_table(rows: Sequence[EqualFlops]) -> str:
    """Per policy and N: both adapters' points, generic/flux at the same N and at the flux point's FLOPs."""
    header = (
        "policy",
        "N",
        "flux FLOPs",
        "flux rel. L2",
        "generic FLOPs",
        "generic rel. L2",
        "generic/flux, same N",
        "generic rel. L2 at flux FLOPs",
        "generic/flux, equal FLOPs",
    )
    body = [
        (
            r.policy,
            str(r.interval),
            _x(r.flux_speedup),
            format_number(r.flux_error, 4),
            _x(r.generic_speedup),
            format_number(r.generic_error, 4),
            format_number(r.ratio, 2),
            "not bracketed" if r.generic_at_flux is None else format_number(r.generic_at_flux, 4),
            "-" if r.ratio_at_flux is None else format_number(r.ratio_at_flux, 2),
        )
        for r in rows
    ]
    return _table(header, body)


def _blocks(units: Sequence[int]) -> str:
    if not units:
        return "-"
    low, high = min(units), max(units)
    return f"{low}" if low == high else f"{low}-{high}"


def families_table(rows: Sequence[FamilyRow]) -> str:
    """One row per family x adapter; rows that could not run show ``-`` and their error below."""
    header = (
        "family",
        "model",
        "adapter",
        "blocks",
        "units/block",
        "token paths",
        "FLOPs speedup",
        "calls skipped",
        "full/forecast",
    )
    body, errors = [], []
    for r in rows:
        adapter = r.adapter if r.automatic else f"{r.adapter} (forced)"
        if r.error is not None:
            body.append((r.family, r.model, adapter, "-", "-", "-", "error", "-", "-"))
            errors.append(f"- `{r.family}` with `{r.adapter}`: {r.error}")
            continue
        body.append(
            (
                r.family,
                r.model,
                adapter,
                str(len(r.units_per_block)),
                _blocks(r.units_per_block),
                "yes" if r.token_paths else "no",
                _x(r.flops_speedup),
                "-" if math.isnan(r.calls_skipped) else f"{r.calls_skipped:.1%}",
                f"{r.full_steps}/{r.forecast_steps}",
            )
        )
    return _table(header, body) + ("\n\n" + "\n".join(errors) if errors else "")


# --------------------------------------------------------------------------- report


@attrs.frozen
class AdaptersReport:
    """Both parts (either may be absent) and what is needed to reproduce them."""

    command: str
    machine: str
    digits: BenchSettings | None = None
    points: tuple[DigitsPoint, ...] = ()
    equal: tuple[EqualFlops, ...] = ()
    family_steps: int | None = None
    families: tuple[FamilyRow, ...] = ()
    seconds: Mapping[str, float] = attrs.field(factory=dict)


def adapters_markdown(report: AdaptersReport) -> str:
    """The whole ``adapters.md``."""
    lines = ["# hicache adapters: paper units against whole-block units", "", f"Machine: {report.machine}."]
    lines.append(f"Command: `{report.command}`.")
    if report.digits is not None:
        s = report.digits
        digits, _ = s.samples()
        lines += [
            "",
            "## A. Digits model (trained FluxTransformer2DModel): flux adapter against generic adapter",
            "",
            f"{s.steps} steps, {len(digits)} samples (digits {list(s.digits)}, {s.seeds_per_digit} seed each from "
            f"{s.seed}), CFG batched; taylorseer with the taylor basis, m = {PAPER_SETTING['max_order']}, "
            f"W = {PAPER_SETTING['warmup']}; fora with the same schedule. FLOPs speedup: the run summary's "
            "counted speedup; rel. L2: against full compute on the same samples.",
            "",
            digits_table(report.points),
            "",
            "At equal FLOPs: the two adapters do not save the same FLOPs at one N (the flux adapter still "
            "computes each block's modulation and gates on forecast steps). The generic error at the flux "
            "point's FLOPs speedup is interpolated linearly in log(error) along the generic curve of the "
            "same policy ('not bracketed' outside its range).",
            "",
            equal_flops_table(report.equal),
        ]
    if report.families:
        setting = ", ".join(f"{k}={v}" for k, v in FAMILY_SETTING.items())
        lines += [
            "",
            "## B. Every family's tiny random-weight model: family units against generic units",
            "",
            f"taylorseer ({setting}, taylor basis) over {report.family_steps} steps at batch 1; the adapter "
            "chosen automatically, then `generic` forced on the same model. Calls skipped: 1 - cached / uncached "
            "calls of every leaf module (module without children) over one generation. " + RANDOM_WEIGHTS_NOTE,
            "",
            families_table(report.families),
        ]
    if report.seconds:
        took = ", ".join(f"{part} {seconds:.0f} s" for part, seconds in report.seconds.items())
        lines += ["", f"Wall time: {took}."]
    return "\n".join(lines) + "\n"


def _json(report: AdaptersReport) -> str:
    payload: dict[str, Any] = {"command": report.command, "machine": report.machine, "seconds": dict(report.seconds)}
    if report.digits is not None:
        payload["digits"] = {
            "settings": {**settings_json(report.digits), "shared": dict(PAPER_SETTING)},
            "points": [attrs.asdict(p) for p in report.points],
            "equal_flops": [attrs.asdict(r) for r in report.equal],
        }
    if report.families:
        payload["families"] = {
            "settings": {"steps": report.family_steps, "batch": 1, "policy": "taylorseer", **FAMILY_SETTING},
            "note": RANDOM_WEIGHTS_NOTE,
            "rows": [{**attrs.asdict(r), "units": r.units, "calls_skipped": r.calls_skipped} for r in report.families],
        }
    return strict_json(payload)


def write_adapters(report: AdaptersReport, out: Path) -> list[Path]:
    """Write ``adapters.json`` and ``adapters.md`` into ``out`` (both or none); return their paths."""
    check_writable(out)
    staging = Path(tempfile.mkdtemp(prefix=".hicache-adapters-", dir=out))
    try:
        (staging / "adapters.json").write_text(_json(report))
        (staging / "adapters.md").write_text(adapters_markdown(report))
        written = []
        for name in ADAPTERS_FILES:
            os.replace(staging / name, out / name)
            written.append(out / name)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hicache_sdk.bench.adapters",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="N in 3 5, 20 steps, 2 samples (a smoke test)")
    parser.add_argument("--out", type=Path, help="folder for adapters.json and adapters.md (default: print only)")
    parser.add_argument("--part", choices=("all", "digits", "families"), default="all", help="what to run")
    parser.add_argument("--intervals", type=int, nargs="+", help="part A's N (default 3 5 7; 3 5 with --quick)")
    parser.add_argument("--steps", type=int, help="part A's steps (default 50; 20 with --quick)")
    parser.add_argument("--family-steps", type=int, help="part B's steps (default 50; 20 with --quick)")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads for part A (default: torch's choice; part B runs on one)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for option in ("steps", "family_steps", "threads"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    steps = args.steps or (20 if args.quick else 50)
    for n in args.intervals or ():
        if not 1 <= n <= steps:
            parser.error(f"--intervals: N must be in 1..{steps} (the steps), got {n}")
    if args.intervals and len(set(args.intervals)) != len(args.intervals):
        parser.error("--intervals: an interval is listed twice")


def _command(argv: Sequence[str]) -> str:
    return " ".join(["python -m hicache_sdk.bench.adapters", *argv])


def _run(args: argparse.Namespace, command: str, progress: Callable[[str], None]) -> AdaptersReport:
    """Run the parts ``args`` ask for; each part's wall seconds go in ``report.seconds``."""
    seconds: dict[str, float] = {}
    with _threads(args.threads):
        report = AdaptersReport(command=command, machine=machine_description("cpu"))
        if args.part in ("all", "digits"):
            start = time.perf_counter()
            settings = digits_settings(quick=args.quick, steps=args.steps)
            intervals = tuple(sorted(args.intervals or (QUICK_INTERVALS if args.quick else INTERVALS)))
            points, _ = run_digits(settings, intervals=intervals, progress=progress)
            seconds["A"] = time.perf_counter() - start
            report = attrs.evolve(report, digits=settings, points=tuple(points), equal=tuple(equal_flops(points)))
    if args.part in ("all", "families"):
        start = time.perf_counter()
        steps = args.family_steps or (20 if args.quick else 50)
        rows = run_families(steps=steps, progress=progress)
        seconds["B"] = time.perf_counter() - start
        report = attrs.evolve(report, family_steps=steps, families=tuple(rows))
    return attrs.evolve(report, seconds=seconds)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: run, print the Markdown, write the files with ``--out``."""
    parser = _parser()
    words = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(words)
    _check(parser, args)
    if args.out is not None:
        try:
            check_writable(args.out)
        except InvalidParameterError as exc:
            parser.error(str(exc))

    def progress(message: str) -> None:
        if not args.no_progress:
            print(f"[adapters] {message}", file=sys.stderr, flush=True)

    report = _run(args, _command(words), progress)
    print(adapters_markdown(report))
    if args.out is not None:
        for path in write_adapters(report, args.out):
            progress(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
