"""The bench report's figures and JSON, on a synthetic report (no model run)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import attrs
import pytest
import torch

from hicache_sdk.bench.methods import MethodSpec
from hicache_sdk.bench.report import grid_columns, sample_grid, speed_error_plot, strict_json
from hicache_sdk.bench.runner import BenchReport, BenchSettings, MethodResult


def _refuse(token: str) -> float:
    raise ValueError(f"non-standard JSON token {token}")


def _result(label: str, rel_l2: float, flops: float, wall: float) -> MethodResult:
    return MethodResult(
        label=label,
        tag=label,
        flops_speedup=flops,
        wall_speedup=wall,
        wall_seconds=(1.0,),
        rel_l2=rel_l2,
        psnr=math.inf if rel_l2 == 0 else 30.0,
        ssim=1.0,
        accuracy=1.0,
        frechet=math.nan,
        full_steps=6,
        forecast_steps=0,
        cache_bytes=0,
        fallbacks=0,
    )


@pytest.fixture
def report() -> BenchReport:
    settings = BenchSettings(methods=(MethodSpec("full", None),), steps=6, digits=(1, 7), seeds_per_digit=3)
    results = (
        _result("full", 0.0, 1.0, 1.0),
        _result("fora", 0.08, 2.0, 1.7),
        _result("taylorseer+hermite", 0.05, 2.0, 2.0),  # both points at the same place
    )
    images = {
        r.label: torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(i)) for i, r in enumerate(results)
    }
    return BenchReport(settings=settings, results=results, images=images, machine="test", deterministic=True)


def test_samples_grid_labels_every_column_and_shows_every_seed(report: BenchReport) -> None:
    fig = sample_grid(report)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    # samples are seed-major (digits 1, 7 for seed 0, then seed 1, ...); columns go by digit, then seed
    assert titles == [f"digit {d}\nseed {s}" for d in (1, 7) for s in (0, 1, 2)]
    assert len(fig.axes) == 3 * 6  # every method's row shows every sample
    row_labels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert row_labels == ["full", "fora", "taylorseer+hermite"]
    caption = fig.get_suptitle()
    assert "every sample" in caption and "seeds 0-2" in caption.replace("\n", " ")
    # each column shows the sample its label names: digit 7 seed 1 is sample index 3 (seed 1 x 2 digits + 1)
    index = titles.index("digit 7\nseed 1")
    shown = fig.axes[index].get_images()[0].get_array()
    assert torch.equal(torch.as_tensor(shown.data), report.images["full"][3, 0])


def test_grid_states_which_seeds_it_shows_when_not_all_fit() -> None:
    digits = [d for _ in range(10) for d in range(10)]  # 10 seeds per digit, seed-major
    seeds = [s for s in range(10) for _ in range(10)]
    shown, labels, caption = grid_columns(digits, seeds, max_columns=40)
    assert len(shown) == 40 and {seeds[i] for i in shown} == {0, 1, 2, 3}
    assert labels[:4] == ["digit 0\nseed 0", "digit 0\nseed 1", "digit 0\nseed 2", "digit 0\nseed 3"]
    assert "40 of 100 samples" in caption and "seeds 0-3 shown of 0-9" in caption
    for index, label in zip(shown, labels, strict=True):
        assert label == f"digit {digits[index]}\nseed {seeds[index]}"


def test_speed_error_plot_labels_every_point(report: BenchReport) -> None:
    fig = speed_error_plot(report)
    (ax,) = fig.axes
    annotations = [(t.get_text(), t.xy) for t in ax.texts]
    # one label per point: the FLOPs point and the wall point of every method with an error
    assert sorted(annotations) == sorted(
        [
            ("fora", (2.0, 0.08)),
            ("fora", (1.7, 0.08)),
            ("taylorseer+hermite", (2.0, 0.05)),
            ("taylorseer+hermite", (2.0, 0.05)),
        ]
    )
    assert "full" in ax.get_title()  # the zero-error reference is named, not silently dropped


def test_speed_error_plot_of_exact_rows_only(report: BenchReport, tmp_path: Path) -> None:
    # `hicache bench --methods full` (or only interval-1 methods): nothing has an error to put on a log axis
    only_full = attrs.evolve(report, results=report.results[:1])
    fig = speed_error_plot(only_full)
    fig.savefig(tmp_path / "plot.png")
    assert "full" in fig.axes[0].get_title() and not fig.axes[0].texts


def test_strict_json_writes_non_finite_numbers_as_null() -> None:
    payload = {"psnr": math.inf, "frechet": math.nan, "low": -math.inf, "rows": [(1.5, math.nan)], "ok": 2}
    text = strict_json(payload)
    assert json.loads(text, parse_constant=_refuse) == {
        "psnr": None,
        "frechet": None,
        "low": None,
        "rows": [[1.5, None]],
        "ok": 2,
    }
