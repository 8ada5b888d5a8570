"""``hicache compare`` on a reduced setting: the embedded model, few steps and samples, two repeats (so that
"repeats bit-identical" compares two runs of each row)."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

from hicache_sdk.bench.baselines import cache_dit_row, first_block_cache_row, taylorseer_matched_row
from hicache_sdk.bench.compare import CompareReport, default_rows, run_compare
from hicache_sdk.bench.compare_extras import sampler
from hicache_sdk.bench.compare_report import overhead_tables
from hicache_sdk.bench.compiled import measure_compile
from hicache_sdk.bench.memory import cache_bytes
from hicache_sdk.bench.overhead import FullRunOverhead, all_full_overhead, step_shares
from hicache_sdk.bench.rows import Target, full_row, sdk_replica_row, sdk_row
from hicache_sdk.bench.runner import BenchSettings
from hicache_sdk.cli import main
from hicache_sdk.errors import InvalidParameterError
from hicache_sdk.models import DigitsModel, load_digits_model

SETTINGS = BenchSettings(methods=(), steps=6, digits=(1, 7), seeds_per_digit=1, repeats=2)
TARGET = Target("test", interval=2, warmup=2)


def _refuse(token: str) -> float:
    raise ValueError(f"non-standard JSON token {token}")


@pytest.fixture(scope="module")
def model() -> DigitsModel:
    return load_digits_model()


@pytest.fixture(scope="module")
def report(model: DigitsModel) -> CompareReport:
    rows = [
        full_row(),
        sdk_row("taylorseer", TARGET),
        sdk_row("clusca+hermite", TARGET, num_clusters=4),
        sdk_replica_row(TARGET),
        taylorseer_matched_row(TARGET, max_order=2),
        first_block_cache_row(),
    ]
    return run_compare(SETTINGS, rows, model=model)


def test_every_row_is_present_and_scored(report: CompareReport) -> None:
    labels = [r.label for r in report.results]
    assert labels == [
        "full",
        "taylorseer @test",
        "clusca+hermite @test",
        "taylorseer, diffusers schedule @test",
        "diffusers taylorseer, paper units @test",
        "diffusers first-block-cache (threshold 0.05)",
    ]
    assert report.deterministic  # the second repeat of every row drew the same images as the first
    full_seconds = report.results[0].wall_seconds
    for r in report.results:
        assert r.skipped is None and r.scores is not None
        assert len(r.wall_seconds) == 2 and r.wall_speedup > 0
        assert r.wall is not None and r.wall.spread == pytest.approx(max(r.wall_seconds) / min(r.wall_seconds))
        paired = sorted(f / s for f, s in zip(full_seconds, r.wall_seconds, strict=True))
        assert (r.wall.speedup_min, r.wall.speedup_max) == pytest.approx(tuple(paired))
    full = report.results[0]
    assert full.scores is not None and full.scores.rel_l2 == 0.0 and full.flops_speedup == 1.0


def test_counted_flops_agree_with_the_sdk_summaries(report: CompareReport) -> None:
    counts = report.full_flops_counts
    assert len(counts) == 2 and counts[0] == counts[1] > 0
    sdk = [r for r in report.results if r.family == "hicache"]
    assert len(sdk) == 3
    for r in sdk:
        assert r.sdk_flops_speedup is not None
        assert r.flops_speedup > 1.2
        assert r.flops_speedup == pytest.approx(r.sdk_flops_speedup, rel=2e-3), r.label


def test_memory_is_measured_and_matches_the_sdk_summaries(report: CompareReport, model: DigitsModel) -> None:
    rows = {r.label: r for r in report.results}
    assert rows["full"].cache_bytes == 0
    assert cache_bytes(model.transformer) == 0  # every row detached cleanly
    for r in report.results[1:]:
        assert r.cache_bytes > 0, r.label
        if r.family == "hicache":
            assert r.cache_bytes == r.sdk_cache_bytes, r.label


def test_sdk_replica_reproduces_diffusers_taylorseer(report: CompareReport) -> None:
    rows = {r.label: r for r in report.results}
    ours, theirs = rows["taylorseer, diffusers schedule @test"], rows["diffusers taylorseer, paper units @test"]
    assert ours.scores is not None and theirs.scores is not None
    assert ours.flops == theirs.flops
    assert ours.scores.rel_l2 == pytest.approx(theirs.scores.rel_l2, rel=1e-3)
    assert ours.cache_bytes == theirs.cache_bytes


def test_missing_cache_dit_is_skipped_with_a_message(model: DigitsModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cache_dit", None)  # import fails as if not installed
    row = cache_dit_row(model, steps=6)
    assert row.attach is None and row.skipped is not None
    assert "cache-dit is not installed" in row.skipped and "hicache-sdk[compare]" in row.skipped
    report = run_compare(SETTINGS, [full_row(), row], model=model)
    skipped = report.results[1]
    assert skipped.skipped == row.skipped and skipped.scores is None


def test_all_full_run_equals_no_sdk(model: DigitsModel) -> None:
    generate = sampler(SETTINGS)
    run = all_full_overhead(model, generate, repeats=1)
    assert run.identical
    assert run.clocked_seconds > 0 and len(run.sdk_seconds) == len(run.none_seconds) == 1
    tag, shares = step_shares(model, generate, "taylorseer:interval=2,warmup=2")
    assert tag.startswith("taylorseer") and {s.kind for s in shares} == {"full", "forecast"}
    assert all(0 < s.share < 1 for s in shares)


def test_overhead_is_the_median_of_paired_ratios() -> None:
    # pair 2 ran while the machine was slow for both: paired ratios cancel that, medians of each side would not
    run = FullRunOverhead(
        method="m", none_seconds=(1.0, 2.0, 1.0), sdk_seconds=(1.01, 2.04, 1.03), identical=True, clocked_seconds=0.0
    )
    assert run.pair_ratios == pytest.approx((1.01, 1.02, 1.03))
    assert run.overhead == pytest.approx(0.02)
    assert statistics.median(run.sdk_seconds) / statistics.median(run.none_seconds) - 1 == pytest.approx(0.03)
    table = overhead_tables([run], [])
    assert "| `m` | 3 | 1.000 | 1.030 | +2.0% | +1.0% to +3.0% | 0.0% | True |" in table


def test_forecast_path_compiles_once(model: DigitsModel) -> None:
    generate = sampler(SETTINGS, steps=4, seeds_per_digit=1)
    bare, cached = measure_compile(
        model, generate, method="taylorseer:interval=2,warmup=1", backend="aot_eager", repeats=1
    )
    for phase in (bare, cached):
        assert phase.compiles_first >= 1 and phase.compiles_later == 0
        assert phase.max_abs_diff == 0.0
    assert cached.graph_breaks > 0  # the runtime's decisions stay out of the graphs


def test_cli_compare_writes_the_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["compare", "--steps", "4", "--digits", "3", "--seeds-per-digit", "1", "--repeats", "2"]
    args += ["--targets", "2x", "--methods", "taylorseer", "--no-overhead", "--no-compile", "--no-progress"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "compare.json").read_text(), parse_constant=_refuse)  # strict JSON
    assert payload["deterministic"] is True
    assert payload["wall_check"]["tolerance"] == 1.25
    full = payload["results"][0]
    assert full["label"] == "full" and full["scores"]["psnr"] is None  # +inf, written as null
    families = {r["family"] for r in payload["results"]}
    assert {"none", "hicache", "diffusers"} <= families
    assert any(r["label"].startswith("diffusers magcache") for r in payload["results"])  # calibrated first
    assert len(payload["mag_ratios"]) == 4
    for r in payload["results"]:
        assert r["skipped"] or not math.isnan(r["flops_speedup"])
        if r["family"] == "cache-dit" and not r["skipped"]:  # installed: it ran, and its cache was measured
            assert r["cache_bytes"] > 0
        if not r["skipped"]:
            assert len(r["wall_seconds"]) == 2 and r["wall"]["spread"] >= 1.0
    markdown = (tmp_path / "compare.md").read_text()
    assert "| taylorseer @2x | hicache |" in markdown
    assert "| time spread |" in markdown and payload["wall_check"]["note"] in markdown
    command = "hicache compare --steps 4 --digits 3 --seeds-per-digit 1 --repeats 2 --seed 0 --targets 2x"
    assert command + " --methods taylorseer --no-overhead --no-compile" in capsys.readouterr().out


def test_cli_compare_against_diffusers_taylorseer_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["compare", "--steps", "4", "--digits", "3", "--seeds-per-digit", "1", "--repeats", "2"]
    args += ["--targets", "2x", "--methods", "taylorseer", "--baselines", "taylorseer"]
    args += ["--no-overhead", "--no-compile", "--no-progress", "--out", str(tmp_path)]
    assert main(args) == 0
    payload = json.loads((tmp_path / "compare.json").read_text(), parse_constant=_refuse)
    assert payload["deterministic"] is True
    assert [r["label"] for r in payload["results"]] == [
        "full",
        "taylorseer @2x",
        "taylorseer, diffusers schedule @2x",
        "diffusers taylorseer, paper units @2x",
    ]
    assert payload["mag_ratios"] == []  # no MagCache row, so no calibration run
    assert "--methods taylorseer --baselines taylorseer --no-overhead" in capsys.readouterr().out


def test_unknown_baselines_are_a_clear_error(model: DigitsModel) -> None:
    with pytest.raises(InvalidParameterError, match=r"baselines must be one of \('all', 'taylorseer'\), got 'none'"):
        default_rows(model, SETTINGS, baselines="none")


def test_cli_compare_rejects_an_unknown_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--targets", "9x", "--no-progress"]) == 2
    assert "unknown targets ['9x']" in capsys.readouterr().err


def test_cache_bytes_ignores_parameters() -> None:
    layer = torch.nn.Linear(4, 4)
    assert cache_bytes(layer) == 0
    base = torch.zeros(8)
    layer.held = {"cached": [base, base[:4]], "other": (torch.zeros(2, dtype=torch.float64),)}
    assert cache_bytes(layer) == 8 * 4 + 2 * 8  # a view of a held storage adds nothing
