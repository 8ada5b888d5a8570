"""The bench of methods on an embedded model (digits or video): speed and fidelity against full compute."""

from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import nn

from ..errors import InvalidParameterError
from ..models.classifier import DigitClassifier
from .methods import FULL, PAPER_SETTING, MethodSpec
from .tasks import Fidelity, fidelity, get_task
from .wall import WallSpread, wall_spread

__all__ = [
    "BenchReport",
    "BenchSettings",
    "Fidelity",
    "MethodResult",
    "check_settings",
    "fidelity",
    "format_number",
    "machine_description",
    "result_rows",
    "run_bench",
    "timed",
    "torch_dtype",
]


def _task_seeds(name: str) -> int:
    return get_task(name).seeds_per_digit


@attrs.frozen(kw_only=True)
class BenchSettings:
    """What to run. Samples are ``digits x seeds_per_digit``, seeds ``seed, seed + 1, ...`` per digit.

    ``task`` names the embedded model (:data:`~hicache_sdk.bench.tasks.TASKS`: ``digits`` or
    ``video``); its samples are images or clips.
    """

    methods: tuple[MethodSpec, ...]
    task: str = "digits"
    shared: Mapping[str, Any] = attrs.field(factory=lambda: dict(PAPER_SETTING))
    steps: int = 50
    digits: tuple[int, ...] = tuple(range(10))
    seeds_per_digit: int = attrs.field(
        default=attrs.Factory(lambda self: _task_seeds(self.task), takes_self=True)
    )  # the task's default: 2 images, 1 clip per digit
    seed: int = 0
    repeats: int = 3
    guidance: float | None = None
    device: str = "cpu"
    dtype: str = "float32"

    def samples(self) -> tuple[list[int], list[int]]:
        """The (digit, seed) pairs, as two aligned lists."""
        pairs = [(d, self.seed + j) for j in range(self.seeds_per_digit) for d in self.digits]
        return [d for d, _ in pairs], [s for _, s in pairs]


@attrs.frozen
class MethodResult:
    """One row of the bench."""

    label: str
    tag: str
    flops_speedup: float
    wall_speedup: float
    wall_seconds: tuple[float, ...]
    rel_l2: float
    psnr: float
    ssim: float
    accuracy: float
    frechet: float
    full_steps: int
    forecast_steps: int
    cache_bytes: int
    fallbacks: int
    wall: WallSpread | None = None  # spread of wall_seconds and its flags (see .wall)
    peak_cache_bytes: int = 0  # the most forecast-state bytes on the device at the end of a step
    temporal: float = math.nan  # video: temporal-consistency error (see .metrics.temporal_error); nan for images


@attrs.frozen
class BenchReport:
    """Results plus everything needed to reproduce and to draw the report."""

    settings: BenchSettings
    results: tuple[MethodResult, ...]
    images: Mapping[str, torch.Tensor]
    machine: str
    deterministic: bool


def machine_description(device: str) -> str:
    """E.g. ``cpu: x86_64, 2 threads, torch 2.13.0``."""
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = f"{platform.machine()}, {torch.get_num_threads()} threads"
    return f"{device}: {name}, torch {torch.__version__}"


def torch_dtype(name: str) -> torch.dtype:
    """The model dtype named ``float32``, ``bfloat16`` or ``float16``."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise InvalidParameterError(f"dtype must be one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]


def check_settings(settings: BenchSettings) -> None:
    """Fail early, with a clear message, on settings that cannot run."""
    get_task(settings.task)
    if settings.steps < 1:
        raise InvalidParameterError(f"steps must be >= 1, got {settings.steps}")
    if settings.repeats < 1:
        raise InvalidParameterError(f"repeats must be >= 1, got {settings.repeats}")
    if settings.seeds_per_digit < 1:
        raise InvalidParameterError(f"seeds_per_digit must be >= 1, got {settings.seeds_per_digit}")
    bad = [d for d in settings.digits if not 0 <= d <= 9]
    if bad or not settings.digits:
        raise InvalidParameterError(f"digits must be in 0..9 (and at least one), got {list(settings.digits)}")
    for spec in settings.methods:
        acc = spec.accelerator(settings.shared)
        interval = getattr(acc.config, "interval", 1) if acc is not None else 1
        if interval > settings.steps:
            raise InvalidParameterError(
                f"method {spec.label!r}: interval N={interval} is larger than the {settings.steps} steps"
            )


def timed(fn: Callable[[], torch.Tensor], device: str) -> tuple[torch.Tensor, float]:
    """``fn()`` and its wall-clock seconds (synchronising the GPU around it)."""
    _synchronize(device)
    start = time.perf_counter()
    out = fn()
    _synchronize(device)
    return out, time.perf_counter() - start


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device.startswith("mps"):
        torch.mps.synchronize()


def run_bench(
    settings: BenchSettings,
    *,
    model: nn.Module | None = None,
    classifier: DigitClassifier | None = None,
    progress: Callable[[str], None] | None = None,
) -> BenchReport:
    """Run every method ``repeats`` times, interleaved, and measure it against full compute.

    ``model`` and ``classifier`` default to the shipped ones of ``settings.task``; a model of
    another task is refused (:class:`~hicache_sdk.errors.InvalidParameterError`) before any work.
    """
    check_settings(settings)
    task = get_task(settings.task)
    dtype = torch_dtype(settings.dtype)
    model = model or task.load_model(device=settings.device, dtype=dtype)
    task.check_model(model)
    classifier = classifier or task.load_classifier(device=settings.device)
    digits, seeds = settings.samples()
    methods = list(settings.methods)
    if not any(m.is_full for m in methods):
        methods.insert(0, MethodSpec(label=FULL, policy=None))
    guidance = task.guidance if settings.guidance is None else settings.guidance

    def generate(steps: int) -> torch.Tensor:
        return task.generate(model, digits, seeds, steps=steps, guidance=guidance, device=settings.device, dtype=dtype)

    accelerators = {m.label: m.accelerator(settings.shared) for m in methods}
    generate(2)  # warm-up; then measure FLOPs once so no timed run pays for counting
    for acc in accelerators.values():
        if acc is not None:
            with acc.apply(model.transformer):
                generate(1)
            break

    times: dict[str, list[float]] = {m.label: [] for m in methods}
    images: dict[str, torch.Tensor] = {}
    summaries: dict[str, Any] = {}
    deterministic = True
    for repeat in range(settings.repeats):
        for spec in methods:
            if progress:
                progress(f"repeat {repeat + 1}/{settings.repeats}: {spec.label}")
            acc = accelerators[spec.label]
            handle = acc.apply(model.transformer) if acc is not None else None
            try:
                out, seconds = timed(lambda: generate(settings.steps), settings.device)
                if handle is not None:
                    summaries[spec.label] = handle.summary()
            finally:
                if handle is not None:
                    handle.remove()
            times[spec.label].append(seconds)
            if spec.label in images:
                deterministic &= torch.equal(images[spec.label], out)
            else:
                images[spec.label] = out.cpu()

    reference = images[FULL]
    full_time = statistics.median(times[FULL])
    results = []
    for spec in methods:
        out = images[spec.label]
        summary = summaries.get(spec.label)
        acc = accelerators[spec.label]
        scores = task.score(out, reference, classifier, digits)
        flops_speedup = summary.flops_speedup if summary is not None else 1.0
        wall_speedup = full_time / statistics.median(times[spec.label])
        results.append(
            MethodResult(
                label=spec.label,
                tag=acc.tag if acc is not None else "no cache",
                flops_speedup=flops_speedup,
                wall_speedup=wall_speedup,
                wall_seconds=tuple(times[spec.label]),
                rel_l2=scores.rel_l2,
                psnr=scores.psnr,
                ssim=scores.ssim,
                accuracy=scores.accuracy,
                frechet=scores.frechet,
                full_steps=summary.full_steps if summary is not None else settings.steps,
                forecast_steps=summary.forecast_steps if summary is not None else 0,
                cache_bytes=summary.cache_bytes if summary is not None else 0,
                peak_cache_bytes=summary.peak_cache_bytes if summary is not None else 0,
                temporal=scores.temporal,
                fallbacks=summary.fallbacks if summary is not None else 0,
                wall=wall_spread(
                    times[spec.label], times[FULL], wall_speedup=wall_speedup, flops_speedup=flops_speedup
                ),
            )
        )
    return BenchReport(
        settings=settings,
        results=tuple(results),
        images=images,
        machine=machine_description(settings.device),
        deterministic=deterministic,
    )


def format_number(value: float, digits: int = 3) -> str:
    """Compact formatting with ``inf``/``nan`` spelled out."""
    if math.isinf(value):
        return "inf"
    if math.isnan(value):
        return "nan"
    return f"{value:.{digits}f}"


def result_rows(results: Sequence[MethodResult]) -> list[dict[str, Any]]:
    """Rows as plain dicts (for JSON)."""
    return [attrs.asdict(r) for r in results]
