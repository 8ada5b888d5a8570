"""The adapters benchmark (``python -m hicache_sdk.bench.adapters``): its quick run's tables and their invariants,
the equal-FLOPs interpolation, the leaf-call count at interval 1, and its option checking."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import refuse_json_token

from hicache_sdk.bench.adapters import (
    ADAPTERS,
    ADAPTERS_FILES,
    POLICIES,
    QUICK_INTERVALS,
    RANDOM_WEIGHTS_NOTE,
    family_row,
    interpolate_log_error,
    leaf_calls,
    main,
)
from hicache_sdk.testing.families import FAMILY_CASES

QUICK_STEPS = 20
#: the family whose model no family adapter claims: the generic adapter serves it automatically
GENERIC_FAMILIES = {"cogview4"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str, str]:
    """One ``--quick`` run into a temporary folder: the folder, the JSON, the Markdown file and what was printed."""
    out = tmp_path_factory.mktemp("adapters")
    printed = io.StringIO()
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(printed):
        assert main(["--quick", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # restored
    payload = json.loads((out / "adapters.json").read_text(), parse_constant=refuse_json_token)  # strict JSON
    return out, payload, (out / "adapters.md").read_text(), printed.getvalue()


def test_quick_run_writes_and_prints_the_report(quick_run: tuple[Path, dict[str, Any], str, str]) -> None:
    out, payload, markdown, printed = quick_run
    assert sorted(p.name for p in out.iterdir()) == sorted(ADAPTERS_FILES)  # no staging folder left behind
    assert printed.strip() == markdown.strip()
    assert payload["command"] in markdown and "--quick" in payload["command"]
    assert payload["digits"]["settings"]["steps"] == QUICK_STEPS and payload["families"]["settings"]["steps"] == 20
    assert RANDOM_WEIGHTS_NOTE in markdown and payload["families"]["note"] == RANDOM_WEIGHTS_NOTE
    assert set(payload["seconds"]) == {"A", "B"}


def test_digits_points_cover_both_adapters_and_policies(quick_run: tuple[Path, dict[str, Any], str, str]) -> None:
    _, payload, markdown, _ = quick_run
    points = payload["digits"]["points"]
    keys = [(p["adapter"], p["policy"], p["interval"]) for p in points]
    assert sorted(keys) == sorted(itertools.product(ADAPTERS, POLICIES, QUICK_INTERVALS))
    for p in points:
        assert p["full_steps"] + p["forecast_steps"] == QUICK_STEPS
        assert p["forecast_steps"] > 0 and p["flops_speedup"] > 1.0, p
        assert 0.0 < p["rel_l2"] < 1.0, p  # forecasts change the images, a little
        assert f"| {p['adapter']} | {p['policy']} | {p['interval']} |" in markdown
    by_key = {(p["adapter"], p["policy"], p["interval"]): p for p in points}
    for adapter, n in itertools.product(ADAPTERS, QUICK_INTERVALS):
        fora, taylorseer = by_key[(adapter, "fora", n)], by_key[(adapter, "taylorseer", n)]
        assert fora["forecast_steps"] == taylorseer["forecast_steps"]  # one schedule: the same units skipped
        assert fora["flops_speedup"] == pytest.approx(taylorseer["flops_speedup"], rel=1e-2)
    for adapter, policy in itertools.product(ADAPTERS, POLICIES):
        speedups = [by_key[(adapter, policy, n)]["flops_speedup"] for n in sorted(QUICK_INTERVALS)]
        assert speedups == sorted(speedups) and len(set(speedups)) == len(speedups)  # a larger N saves more


def test_equal_flops_rows_compare_generic_with_flux(quick_run: tuple[Path, dict[str, Any], str, str]) -> None:
    _, payload, markdown, _ = quick_run
    points = {(p["adapter"], p["policy"], p["interval"]): p for p in payload["digits"]["points"]}
    rows = payload["digits"]["equal_flops"]
    assert sorted((r["policy"], r["interval"]) for r in rows) == sorted(itertools.product(POLICIES, QUICK_INTERVALS))
    for r in rows:
        flux, generic = points[("flux", r["policy"], r["interval"])], points[("generic", r["policy"], r["interval"])]
        assert (r["flux_speedup"], r["flux_error"]) == (flux["flops_speedup"], flux["rel_l2"])
        assert (r["generic_speedup"], r["generic_error"]) == (generic["flops_speedup"], generic["rel_l2"])
        assert r["ratio"] == pytest.approx(generic["rel_l2"] / flux["rel_l2"])
        curve = [(p["flops_speedup"], p["rel_l2"]) for k, p in points.items() if k[:2] == ("generic", r["policy"])]
        inside = min(s for s, _ in curve) <= r["flux_speedup"] <= max(s for s, _ in curve)
        assert (r["generic_at_flux"] is not None) == inside
        if r["generic_at_flux"] is None:
            assert r["ratio_at_flux"] is None
        else:
            errors = [e for _, e in curve]
            assert min(errors) <= r["generic_at_flux"] <= max(errors)
            assert r["ratio_at_flux"] == pytest.approx(r["generic_at_flux"] / flux["rel_l2"])
    assert ("not bracketed" in markdown) == any(r["generic_at_flux"] is None for r in rows)


def test_families_table_has_every_family_and_counts_work(quick_run: tuple[Path, dict[str, Any], str, str]) -> None:
    _, payload, markdown, _ = quick_run
    rows = payload["families"]["rows"]
    assert list(dict.fromkeys(r["family"] for r in rows)) == list(FAMILY_CASES)
    for family in FAMILY_CASES:
        mine = [r for r in rows if r["family"] == family]
        auto = [r for r in mine if r["automatic"]]
        assert len(auto) == 1 and auto[0]["error"] is None, mine
        expected = "generic" if family in GENERIC_FAMILIES else family
        assert auto[0]["adapter"] == expected
        forced = [r for r in mine if not r["automatic"]]
        assert [r["adapter"] for r in forced] == ([] if expected == "generic" else ["generic"])
        assert f"| {family} |" in markdown
    for r in rows:
        if r["error"] is not None:
            assert r["adapter"] == "generic" and not r["automatic"]
            assert f"`{r['family']}` with `generic`: {r['error']}" in markdown
            continue
        assert r["full_steps"] + r["forecast_steps"] == 20 and r["forecast_steps"] > 0
        assert r["flops_speedup"] > 1.0, r
        assert 0.0 <= r["calls_skipped"] <= 1.0 and r["calls_cached"] < r["calls_uncached"], r
        assert r["calls_skipped"] == pytest.approx(1 - r["calls_cached"] / r["calls_uncached"])
        assert r["units_per_block"] and r["units"] == sum(r["units_per_block"])
        if r["adapter"] == "generic":
            assert set(r["units_per_block"]) == {1} and r["token_paths"] is False  # one unit per whole block
    family_units = {r["family"]: r for r in rows if r["automatic"] and r["adapter"] != "generic"}
    assert any(r["token_paths"] for r in family_units.values())
    assert any(max(r["units_per_block"]) > 1 for r in family_units.values())  # finer units than whole blocks


def test_interpolation_is_linear_in_log_error() -> None:
    curve = [(4.0, 0.04), (2.0, 0.01)]
    assert interpolate_log_error(curve, 3.0) == pytest.approx(0.02)  # the geometric mean, halfway
    assert interpolate_log_error(curve, 2.0) == pytest.approx(0.01)
    assert interpolate_log_error(curve, 4.0) == pytest.approx(0.04)
    assert interpolate_log_error(curve, 1.9) is None and interpolate_log_error(curve, 4.1) is None
    assert interpolate_log_error([(2.0, 0.0), (4.0, 0.04)], 3.0) is None  # no log of zero error
    assert interpolate_log_error([(2.0, 0.01)], 2.0) == pytest.approx(0.01)
    assert interpolate_log_error([], 2.0) is None
    steep = interpolate_log_error([(1.0, 0.5), (5.0, 1e-6)], 2.5)
    assert steep is not None and 1e-6 < steep < 0.5 and math.isfinite(steep)


@pytest.mark.parametrize("adapter", [None, "generic"])
def test_interval_one_skips_no_call_and_saves_no_flops(adapter: str | None) -> None:
    setting = {"interval": 1, "warmup": 1, "max_order": 2}
    row = family_row("flux", FAMILY_CASES["flux"], adapter, steps=4, setting=setting)
    assert row.error is None and row.forecast_steps == 0
    assert row.calls_uncached > 0 and row.calls_cached == row.calls_uncached and row.calls_skipped == 0.0
    assert row.flops_speedup == pytest.approx(1.0)
    assert row.adapter == (adapter or "flux") and row.automatic == (adapter is None)


def test_leaf_calls_counts_every_leaf_and_removes_its_hooks() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(2, 1)))
    with leaf_calls(model) as counted:
        model(torch.zeros(1, 2))
        model(torch.zeros(1, 2))
    assert counted == [6]
    assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "--steps"),
        (["--family-steps", "0"], "--family-steps"),
        (["--quick", "--intervals", "21"], "--intervals"),
        (["--intervals", "3", "3"], "--intervals"),
        (["--part", "nothing"], "--part"),
    ],
)
def test_options_are_checked(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
