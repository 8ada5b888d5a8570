"""The memory benchmarks: cache bytes against accuracy (``bench.memory_budget``) and the forecast cost per format
(``bench.forecast_cost``). Their figures are printed by the scripts; here their tables and invariants."""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch

from hicache_sdk.bench.forecast_cost import STORAGES, measure
from hicache_sdk.bench.memory_budget import BUDGET_SHARES, FORMAT_ROWS, main


@pytest.fixture(scope="module")
def quick_table() -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["--quick", "--no-progress"]) == 0
    return printed.getvalue()


def _rows(table: str, first_cell: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("|")]
    return [r for r in rows if r[0] == first_cell or first_cell == "*"]


def test_every_format_row_is_measured(quick_table: str) -> None:
    rows = [r for r in _rows(quick_table, "*") if r[0] in {"modules", "block", "range", "output"}]
    assert [(r[0], r[1]) for r in rows] == [(u, f or "fp32") for u, f in FORMAT_ROWS]
    today = float(rows[0][2])
    for units, storage, mib, share, error, *_ in rows:
        assert 0 < float(mib) and float(error) < 0.5, (units, storage)
        assert abs(float(share.rstrip("%")) - 100 * float(mib) / today) < 0.1  # MiB are printed rounded
    held = {(r[0], r[1]): float(r[2]) for r in rows}
    assert held["modules", "bf16"] == pytest.approx(held["modules", "fp32"] / 2, rel=1e-3)
    assert held["modules", "fp8"] < held["modules", "bf16+fp8"] < held["modules", "bf16"]
    assert held["output", "fp32"] < held["range", "fp32"] < held["block", "fp32"] < held["modules", "fp32"]


def test_every_budget_is_met_or_refused_with_the_smallest(quick_table: str) -> None:
    rows = [r for r in _rows(quick_table, "*") if r[0].endswith("%")]
    assert len(rows) == len(BUDGET_SHARES)
    for share, budget, predicted, peak, *rest in rows:
        if predicted == "-":
            assert "refused: memory_budget" in rest[-1] and "give memory_budget >=" in rest[-1]
            continue
        assert float(peak) <= float(predicted) <= float(budget), share  # measured within predicted within budget


def test_forecast_cost_covers_every_storage() -> None:
    rows = measure(shape=(64, 32), order=2, repeats=3)
    names = [name for name, _, _ in rows]
    assert names[0] == "clone fp32"
    for storage in STORAGES:
        assert sum(f", {storage or 'fp32'} storage" in n for n in names) == 2  # taylor and hermite
    assert all(seconds > 0 and math.isfinite(ratio) for _, seconds, ratio in rows)
    assert torch.get_num_threads() >= 1
