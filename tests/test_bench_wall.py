"""The wall-clock check of the bench and compare tables, on synthetic timings."""

from __future__ import annotations

import attrs
import pytest

from hicache_sdk.bench.compare import CompareResult
from hicache_sdk.bench.compare_report import compare_table, compare_wall_check
from hicache_sdk.bench.report import markdown_table, wall_check
from hicache_sdk.bench.runner import MethodResult
from hicache_sdk.bench.wall import ABOVE_FLOPS, NOISY, WALL_SPREAD_TOLERANCE, WallSpread, wall_spread

# The issue's run: full compute about 110 s a repeat; taylorseer+newton timed 45 s, 11.48 s and 6.9 s
# on a loaded machine, so its median gives 9.58x wall against 5.47x FLOPs.
FULL_SECONDS = (100.0, 110.0, 120.0)
NEWTON_SECONDS = (45.0, 11.48, 6.9)
QUIET_SECONDS = (30.0, 31.0, 29.5)


def _first_repeat_only(row: MethodResult) -> MethodResult:
    wall = wall_spread(
        row.wall_seconds[:1], FULL_SECONDS[:1], wall_speedup=row.wall_speedup, flops_speedup=row.flops_speedup
    )
    return attrs.evolve(row, wall_seconds=row.wall_seconds[:1], wall=wall)


def _row(label: str, seconds: tuple[float, ...], flops_speedup: float) -> MethodResult:
    wall = sorted(FULL_SECONDS)[1] / sorted(seconds)[len(seconds) // 2]
    return MethodResult(
        label=label,
        tag=label,
        flops_speedup=flops_speedup,
        wall_speedup=wall,
        wall_seconds=seconds,
        rel_l2=0.05,
        psnr=30.0,
        ssim=0.95,
        accuracy=1.0,
        frechet=1.0,
        full_steps=9,
        forecast_steps=41,
        cache_bytes=0,
        fallbacks=0,
        wall=wall_spread(seconds, FULL_SECONDS, wall_speedup=wall, flops_speedup=flops_speedup),
    )


def test_the_issues_run_is_flagged_noisy_and_above_its_flops() -> None:
    row = _row("taylorseer+newton", NEWTON_SECONDS, 5.47)
    assert row.wall_speedup == pytest.approx(9.58, abs=0.01)
    assert row.wall is not None
    assert row.wall.spread == pytest.approx(45.0 / 6.9)
    # paired per-repeat speedups: 100/45, 110/11.48, 120/6.9
    assert (row.wall.speedup_min, row.wall.speedup_max) == pytest.approx((100 / 45, 120 / 6.9))
    assert row.wall.flags == (NOISY, ABOVE_FLOPS)


def test_a_quiet_row_within_its_flops_is_not_flagged() -> None:
    row = _row("taylorseer", QUIET_SECONDS, 5.47)
    assert row.wall is not None and row.wall.flags == ()
    assert row.wall.spread == pytest.approx(31.0 / 29.5)
    assert row.wall_speedup == pytest.approx(110 / 30.0)


@pytest.mark.parametrize(
    ("seconds", "noisy"),
    [
        ((1.0, 1.25), False),  # exactly the tolerance: accepted
        ((1.0, 1.26), True),
        ((1.26, 1.0, 1.1), True),  # the order of the repeats does not matter
    ],
)
def test_spread_tolerance_boundary(seconds: tuple[float, ...], noisy: bool) -> None:
    assert WALL_SPREAD_TOLERANCE == 1.25
    wall = wall_spread(seconds, [2.0] * len(seconds), wall_speedup=1.0, flops_speedup=4.0)
    assert wall.noisy is noisy and not wall.above_flops


def test_wall_above_flops_is_strict() -> None:
    at = wall_spread([1.0, 1.0], [2.0, 2.0], wall_speedup=2.0, flops_speedup=2.0)
    above = wall_spread([1.0, 1.0], [2.0, 2.0], wall_speedup=2.0, flops_speedup=1.999)
    assert at.flags == () and above.flags == (ABOVE_FLOPS,)


def test_one_repeat_measures_no_spread() -> None:
    wall = wall_spread([1.0], [2.0], wall_speedup=2.0, flops_speedup=3.0)
    assert wall.spread is None and wall.flags == ()
    assert (wall.speedup_min, wall.speedup_max) == (2.0, 2.0)


def test_wall_spread_rejects_mismatched_timings() -> None:
    with pytest.raises(ValueError, match="as many"):
        wall_spread([1.0, 2.0], [1.0], wall_speedup=1.0, flops_speedup=1.0)


def test_bench_table_and_verdict_flag_the_noisy_row() -> None:
    rows = [_row("full", FULL_SECONDS, 1.0), _row("taylorseer", QUIET_SECONDS, 5.47)]
    rows.append(_row("taylorseer+newton", NEWTON_SECONDS, 5.47))
    table = markdown_table(rows)
    header = table.splitlines()[0]
    assert "| wall speedup | wall range | time spread | wall check |" in header
    newton = next(line for line in table.splitlines() if line.startswith("| taylorseer+newton |"))
    assert "| 5.47x | 9.58x | 2.22-17.39x | 6.52x | noisy, wall > FLOPs |" in newton
    quiet = next(line for line in table.splitlines() if line.startswith("| taylorseer |"))
    assert "| 1.05x | ok |" in quiet
    full = next(line for line in table.splitlines() if line.startswith("| full |"))
    assert "| 1.00-1.00x | 1.20x | ok |" in full
    trusted, note = wall_check(rows)
    assert trusted is False
    assert "too noisy to trust the wall column" in note
    assert "tolerance 1.25x" in note
    assert "`taylorseer+newton` 6.52x" in note and "9.582x > 5.470x" in note
    assert "`taylorseer` " not in note  # the quiet row is not named


def test_bench_verdict_on_a_quiet_machine_and_with_one_repeat() -> None:
    quiet = [_row("full", FULL_SECONDS, 1.0), _row("taylorseer", QUIET_SECONDS, 5.47)]
    trusted, note = wall_check(quiet)
    assert trusted is True and "consistent" in note and "too noisy" not in note
    single = [_first_repeat_only(_row("full", FULL_SECONDS, 1.0)), _first_repeat_only(_row("t", QUIET_SECONDS, 5.47))]
    trusted, note = wall_check(single)
    assert trusted is None and "one repeat" in note
    assert "| 1 repeat |" in markdown_table(single)


def test_compare_table_and_verdict() -> None:
    def result(label: str, seconds: tuple[float, ...], flops_speedup: float) -> CompareResult:
        wall = 110.0 / sorted(seconds)[1]
        return CompareResult(
            label=label,
            family="hicache",
            setting=label,
            flops_speedup=flops_speedup,
            wall_seconds=seconds,
            wall_speedup=wall,
            wall=wall_spread(seconds, FULL_SECONDS, wall_speedup=wall, flops_speedup=flops_speedup),
        )

    skipped = CompareResult(label="cache-dit", family="cache-dit", setting="-", skipped="not installed")
    rows = [result("full", FULL_SECONDS, 1.0), result("quiet", QUIET_SECONDS, 5.47), skipped]
    assert compare_wall_check(rows)[0] is True
    rows.append(result("loaded", NEWTON_SECONDS, 5.47))
    trusted, note = compare_wall_check(rows)
    assert trusted is False and "too noisy to trust the wall column" in note and "`loaded`" in note
    table = compare_table(rows)
    assert "| wall speedup | wall range | time spread | wall check |" in table
    loaded = next(line for line in table.splitlines() if line.startswith("| loaded |"))
    assert "| 9.58x | 2.22-17.39x | 6.52x | noisy, wall > FLOPs |" in loaded
    assert isinstance(rows[0].wall, WallSpread)
