"""``hicache compare``: this SDK beside diffusers' caches and cache-dit, on one model, seeds and machine.

Every row runs in this one process on the embedded digits model and the bench's samples. First,
per row, one untimed generation counts its FLOPs (torch's ``FlopCounterMode`` with CPU attention,
over the whole generation, the same for every row) and the peak bytes its cache holds (see
:mod:`.memory`); then every row is timed ``repeats`` times, interleaved in a rotating order, and
scored against full compute. Each row's wall speedup comes with the spread of its repeats and its
flags (:mod:`.wall`).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import attrs
import torch

from ..errors import InvalidParameterError
from ..flops import flop_counter_mode
from ..models import DEFAULT_GUIDANCE, DigitsModel, load_digit_classifier, load_digits_model, sample
from ..models.classifier import DigitClassifier
from ..summary import RunSummary
from .baselines import (
    cache_dit_row,
    calibrate_mag_ratios,
    first_block_cache_row,
    mag_cache_row,
    pyramid_attention_row,
    taylorseer_matched_row,
    taylorseer_shipped_row,
)
from .memory import PeakCacheBytes
from .methods import PAPER_SETTING
from .rows import SDK_METHODS, TARGETS, Attached, CompareRow, Target, full_row, sdk_replica_row, sdk_row
from .runner import BenchSettings, Fidelity, fidelity, machine_description, timed, torch_dtype
from .wall import WallSpread, wall_spread

__all__ = [
    "CACHE_DIT_THRESHOLDS",
    "FIRST_BLOCK_THRESHOLDS",
    "MAG_THRESHOLDS",
    "CompareReport",
    "CompareResult",
    "calibrate",
    "default_rows",
    "load_model",
    "run_compare",
]

Progress = Callable[[str], None]


@attrs.frozen
class CompareResult:
    """One row of the compare table (``skipped`` rows carry only their reason)."""

    label: str
    family: str
    setting: str
    skipped: str | None = None
    flops: float = 0.0  # counted FLOPs of one generation
    flops_speedup: float = float("nan")  # counted FLOPs of full compute / this row's
    sdk_flops_speedup: float | None = None  # what this SDK's own summary says
    wall_seconds: tuple[float, ...] = ()
    wall_speedup: float = float("nan")  # median of full / median of this row
    scores: Fidelity | None = None
    cache_bytes: int = 0  # peak, measured by walking the cache's state
    sdk_cache_bytes: int | None = None  # what this SDK's own summary says
    steps: str = "-"  # full/forecast steps, where the library reports them
    wall: WallSpread | None = None  # spread of wall_seconds and its flags (see .wall)


@attrs.frozen
class CompareReport:
    """Results plus what is needed to reproduce them."""

    settings: BenchSettings
    results: tuple[CompareResult, ...]
    machine: str
    full_flops_counts: tuple[float, ...]  # full compute counted more than once: must agree
    deterministic: bool  # repeats of each row gave identical images
    mag_ratios: tuple[float, ...] = ()


#: thresholds of the threshold-driven caches: each library's default, then one that reaches about 2x here
FIRST_BLOCK_THRESHOLDS: tuple[float, ...] = (0.05, 0.2)
MAG_THRESHOLDS: tuple[float, ...] = (0.06, 0.15)
CACHE_DIT_THRESHOLDS: tuple[float, ...] = (0.08, 0.25)
#: which other libraries' rows to run: all of them, or diffusers' matched TaylorSeer (and its replica) only
BASELINES: tuple[str, ...] = ("all", "taylorseer")


def default_rows(
    model: DigitsModel,
    settings: BenchSettings,
    *,
    targets: Sequence[Target] = TARGETS,
    methods: Sequence[str] = SDK_METHODS,
    mag_ratios: Sequence[float] = (),
    first_block_thresholds: Sequence[float] = FIRST_BLOCK_THRESHOLDS,
    mag_thresholds: Sequence[float] = MAG_THRESHOLDS,
    cache_dit_thresholds: Sequence[float] = CACHE_DIT_THRESHOLDS,
    baselines: str = "all",
) -> list[CompareRow]:
    """Full compute, this SDK's methods at every target, and the other libraries' caches.

    With ``baselines="taylorseer"`` the other libraries' rows are diffusers' matched TaylorSeer and
    this SDK's replica of it only. MagCache is left out without calibrated ``mag_ratios`` (see
    :func:`calibrate_mag_ratios`).
    """
    if baselines not in BASELINES:
        raise InvalidParameterError(f"baselines must be one of {BASELINES}, got {baselines!r}")
    max_order = int(PAPER_SETTING["max_order"])
    rows = [full_row()]
    for target in targets:
        rows += [sdk_row(method, target) for method in methods]
        rows += [sdk_replica_row(target), taylorseer_matched_row(target, max_order)]
    if baselines == "taylorseer":
        return rows
    rows += [taylorseer_shipped_row(), pyramid_attention_row()]
    rows += [first_block_cache_row(threshold) for threshold in first_block_thresholds]
    if mag_ratios:
        rows += [mag_cache_row(mag_ratios, settings.steps, threshold) for threshold in mag_thresholds]
    rows += [cache_dit_row(model, settings.steps, threshold) for threshold in cache_dit_thresholds]
    return rows


def calibration_samples(settings: BenchSettings) -> tuple[list[int], list[int]]:
    """One sample per digit on seeds the bench does not use (calibration is not tested on its own data)."""
    digits = list(settings.digits)
    return digits, [settings.seed + 1000 + i for i in range(len(digits))]


def _probe(row: CompareRow, model: DigitsModel, generate: Callable[[DigitsModel], torch.Tensor]) -> CompareResult:
    """One untimed generation: counted FLOPs, peak cache bytes and this SDK's summary."""
    assert row.attach is not None
    attached = row.attach(model)
    summary: RunSummary | None = None
    try:
        with PeakCacheBytes(attached.model.transformer) as peak, flop_counter_mode() as counter:
            with attached.generation():
                generate(attached.model)
        summary = attached.summary()
        steps = attached.steps_note()
    finally:
        attached.remove()
    return CompareResult(
        label=row.label,
        family=row.family,
        setting=row.setting,
        flops=float(counter.get_total_flops()),
        sdk_flops_speedup=summary.flops_speedup if summary is not None else None,
        cache_bytes=peak.peak,
        sdk_cache_bytes=summary.cache_bytes if summary is not None else None,
        steps=steps,
    )


def _timed_run(
    attached: Attached, generate: Callable[[DigitsModel], torch.Tensor], device: str
) -> tuple[torch.Tensor, float]:
    try:
        with attached.generation():
            return timed(lambda: generate(attached.model), device)
    finally:
        attached.remove()


def run_compare(
    settings: BenchSettings,
    rows: Sequence[CompareRow],
    *,
    model: DigitsModel,
    classifier: DigitClassifier | None = None,
    progress: Progress | None = None,
    mag_ratios: Sequence[float] = (),
) -> CompareReport:
    """Probe, time (interleaved) and score every runnable row against the ``full`` row."""
    dtype = torch_dtype(settings.dtype)
    classifier = classifier or load_digit_classifier(device=settings.device)
    digits, seeds = settings.samples()
    guidance = DEFAULT_GUIDANCE if settings.guidance is None else settings.guidance
    runnable = [r for r in rows if r.skipped is None]
    full = next((r for r in runnable if r.is_full), None)
    if full is None:
        raise ValueError("the compare rows need a full-compute row (family 'none')")

    def generate(target: DigitsModel, steps: int = settings.steps) -> torch.Tensor:
        return sample(target, digits, seeds, steps=steps, guidance=guidance, device=settings.device, dtype=dtype)

    generate(model, 2)  # warm-up; then let this SDK measure its FLOP tables outside any count
    for row in runnable:
        if row.family == "hicache":
            assert row.attach is not None
            attached = row.attach(model)
            try:
                generate(attached.model, 1)
            finally:
                attached.remove()
            break

    probes: dict[str, CompareResult] = {}
    full_counts = []
    for row in runnable:
        if progress:
            progress(f"counting FLOPs and memory: {row.label}")
        probes[row.label] = _probe(row, model, generate)
        if row.is_full:
            full_counts.append(probes[row.label].flops)
    full_counts.append(_probe(full, model, generate).flops)

    times: dict[str, list[float]] = {r.label: [] for r in runnable}
    images: dict[str, torch.Tensor] = {}
    deterministic = True
    for repeat in range(settings.repeats):
        shift = repeat % len(runnable)
        for row in runnable[shift:] + runnable[:shift]:
            if progress:
                progress(f"repeat {repeat + 1}/{settings.repeats}: {row.label}")
            assert row.attach is not None
            out, seconds = _timed_run(row.attach(model), generate, settings.device)
            times[row.label].append(seconds)
            if row.label in images:
                deterministic &= torch.equal(images[row.label], out.cpu())
            else:
                images[row.label] = out.cpu()

    reference = images[full.label]
    full_time = statistics.median(times[full.label])
    full_flops = probes[full.label].flops
    results = []
    for row in rows:
        if row.skipped is not None:
            results.append(CompareResult(label=row.label, family=row.family, setting=row.setting, skipped=row.skipped))
            continue
        probe = probes[row.label]
        flops_speedup = full_flops / probe.flops if probe.flops else float("inf")
        wall_speedup = full_time / statistics.median(times[row.label])
        results.append(
            attrs.evolve(
                probe,
                flops_speedup=flops_speedup,
                wall_seconds=tuple(times[row.label]),
                wall_speedup=wall_speedup,
                scores=fidelity(images[row.label], reference, classifier, digits),
                wall=wall_spread(
                    times[row.label], times[full.label], wall_speedup=wall_speedup, flops_speedup=flops_speedup
                ),
            )
        )
    return CompareReport(
        settings=settings,
        results=tuple(results),
        machine=machine_description(settings.device),
        full_flops_counts=tuple(full_counts),
        deterministic=deterministic,
        mag_ratios=tuple(mag_ratios),
    )


def load_model(settings: BenchSettings) -> DigitsModel:
    """The shipped digits model on the settings' device and dtype."""
    return load_digits_model(device=settings.device, dtype=torch_dtype(settings.dtype))


def calibrate(model: DigitsModel, settings: BenchSettings) -> list[float]:
    """diffusers' MagCache ratios for this model and step count, on held-out seeds."""
    digits, seeds = calibration_samples(settings)
    return calibrate_mag_ratios(model, digits, seeds, settings.steps)
