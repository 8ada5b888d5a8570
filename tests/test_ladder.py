"""The finite-difference ladder: growth, real spacing, restarts, storage dtype, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hicache_sdk.plugins.bases import HermiteBasis, NewtonBasis, TaylorBasis
from hypothesis import given
from hypothesis import strategies as st

from hicache_sdk.basis import Basis
from hicache_sdk.errors import InvalidParameterError
from hicache_sdk.ladder import DifferenceLadder, weighted_sum


def scalar(value: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor([value], dtype=dtype)


def test_grows_one_order_per_anchor_up_to_max_order() -> None:
    ladder = DifferenceLadder(3)
    assert ladder.order == -1
    orders = []
    for step in range(6):
        ladder.update(scalar(step**2), step)
        orders.append(ladder.order)
    assert orders == [0, 1, 2, 3, 3, 3]


def test_order_zero_ladder_keeps_only_the_newest_anchor() -> None:
    ladder = DifferenceLadder(0)
    for step, value in [(0, 1.0), (4, 5.0), (5, -2.0)]:
        ladder.update(scalar(value), step)
    assert ladder.order == 0
    assert ladder.spacing is None
    assert float(ladder.forecast(9, HermiteBasis())) == -2.0


def test_real_spacing_is_used() -> None:
    ladder = DifferenceLadder(2)
    ladder.update(scalar(1.0), 0)
    ladder.update(scalar(7.0), 3)  # D^1 = (7 - 1) / 3
    assert ladder.spacing == 3.0
    assert float(ladder.term(1)) == pytest.approx(2.0)
    ladder.update(scalar(15.0), 7)  # D^1 = (15 - 7) / 4 = 2, D^2 = (2 - 2) / 4
    assert ladder.spacing == 4.0
    assert float(ladder.term(0)) == 15.0
    assert float(ladder.term(1)) == pytest.approx(2.0)
    assert float(ladder.term(2)) == pytest.approx(0.0)
    ladder.update(scalar(17.0), 8)  # D^1 = (17 - 15) / 1 = 2, D^2 = 0
    ladder.update(scalar(27.0), 10)  # a kink: D^1 = (27 - 17) / 2 = 5, D^2 = (5 - 2) / 2
    assert float(ladder.term(1)) == pytest.approx(5.0)
    assert float(ladder.term(2)) == pytest.approx((5.0 - 2.0) / 2)


@given(
    values=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=10),
    max_order=st.integers(0, 6),
    spacing=st.integers(1, 10),
    start=st.integers(-50, 50),
)
def test_terms_equal_backward_differences_over_spacing_powers(
    values: list[float], max_order: int, spacing: int, start: int
) -> None:
    # independent oracle: with equally spaced anchors D^i = nabla^i F / h^i (numpy.diff)
    ladder = DifferenceLadder(max_order)
    for i, value in enumerate(values):
        ladder.update(scalar(value), start + i * spacing)
    assert ladder.order == min(len(values) - 1, max_order)
    for i in range(ladder.order + 1):
        expected = np.diff(np.array(values), n=i)[-1] / spacing**i
        assert float(ladder.term(i)) == pytest.approx(expected, rel=1e-9, abs=1e-9 * max(1.0, *map(abs, values)))


def test_extend_false_restarts_at_order_zero() -> None:
    ladder = DifferenceLadder(2)
    for step in range(3):
        ladder.update(scalar(step * 10.0), step)
    assert ladder.order == 2
    ladder.update(scalar(100.0), 5, extend=False)
    assert (ladder.order, ladder.spacing, ladder.last_step) == (0, None, 5)
    assert float(ladder.forecast(6, TaylorBasis())) == 100.0  # plain reuse
    ladder.update(scalar(106.0), 8)  # grows again from the restart anchor, spacing 3
    assert (ladder.order, ladder.spacing) == (1, 3.0)
    assert float(ladder.term(1)) == pytest.approx(2.0)


def test_anchor_steps_must_increase_and_failed_update_changes_nothing() -> None:
    ladder = DifferenceLadder(1)
    ladder.update(scalar(1.0), 4)
    for step in (4, 3):
        with pytest.raises(InvalidParameterError, match=f"anchor step must increase: got {step} after 4"):
            ladder.update(scalar(2.0), step)
    assert (ladder.order, ladder.last_step, float(ladder.term(0))) == (0, 4, 1.0)


def test_shape_change_without_reset_raises() -> None:
    ladder = DifferenceLadder(1)
    ladder.update(torch.zeros(2, 3), 0)
    with pytest.raises(InvalidParameterError, match=r"shape changed from \(2, 3\) to \(3, 2\) without a reset"):
        ladder.update(torch.zeros(3, 2), 1)
    ladder.reset()
    ladder.update(torch.zeros(3, 2), 0)
    assert ladder.term(0).shape == (3, 2)


def test_forecasting_an_empty_ladder_raises() -> None:
    ladder = DifferenceLadder(2)
    with pytest.raises(RuntimeError, match="empty ladder"):
        ladder.forecast(1, TaylorBasis())
    ladder.update(scalar(1.0), 0)
    ladder.reset()
    with pytest.raises(RuntimeError, match="empty ladder"):
        ladder.forecast(1, TaylorBasis())


def test_forecast_must_be_after_the_newest_anchor() -> None:
    ladder = DifferenceLadder(1)
    ladder.update(scalar(1.0), 5)
    with pytest.raises(InvalidParameterError, match="offset"):
        ladder.forecast(5, TaylorBasis())


def test_term_bounds_and_views() -> None:
    ladder = DifferenceLadder(2)
    with pytest.raises(IndexError, match=r"orders 0..-1, asked for 0"):
        ladder.term(0)
    ladder.update(torch.ones(3), 0)
    with pytest.raises(IndexError, match=r"orders 0..0, asked for 1"):
        ladder.term(1)
    ladder.term(0)[1] = 5.0  # a view: ClusCa writes fresh tokens into D^0
    assert ladder.forecast(1, TaylorBasis()).tolist() == [1.0, 5.0, 1.0]


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
def test_max_order_validated(bad: object) -> None:
    with pytest.raises(InvalidParameterError, match="max_order"):
        DifferenceLadder(bad)  # type: ignore[arg-type]


def test_nbytes() -> None:
    ladder = DifferenceLadder(2)
    assert ladder.nbytes == 0
    ladder.update(torch.zeros(4, 5), 0)  # storage for every order is allocated at the first anchor
    assert ladder.nbytes == 3 * 4 * 5 * 4
    ladder.reset()
    assert ladder.nbytes == 0
    half = DifferenceLadder(2, torch.bfloat16)
    half.update(torch.zeros(4, 5, dtype=torch.float64), 0)
    assert half.nbytes == 3 * 4 * 5 * 2


def test_bf16_storage_halves_memory_and_stays_within_bf16_tolerance() -> None:
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(64, 32, generator=generator)
    features = [torch.sin(0.3 * s + direction) * 4 + 0.01 * torch.randn(64, 32, generator=generator) for s in range(5)]
    full, half = DifferenceLadder(2), DifferenceLadder(2, torch.bfloat16)
    for step, feature in enumerate(features):
        full.update(feature, step)
        half.update(feature, step)
    assert half.nbytes * 2 == full.nbytes
    assert half.term(0).dtype == torch.bfloat16 and full.term(0).dtype == torch.float32
    eps = 2.0**-8  # bf16 keeps 8 significant bits
    size = max(float(f.abs().max()) for f in features)
    for basis in (TaylorBasis(), HermiteBasis(), NewtonBasis()):
        for offset in (1, 2, 3):
            weights = basis.weights(offset, 2, 1.0)
            reference = full.forecast(4 + offset, basis)
            out = half.forecast(4 + offset, basis)
            assert out.dtype == torch.float32
            # each stored D^i is rounded (relative eps); D^{i+1} also inherits the rounding of the old D^i
            # (up to 2^i eps |F| / h^i after i differences)
            allowed = eps * size * sum(abs(w) * 2.0**i for i, w in enumerate(weights))
            error = float((out - reference).abs().max())
            assert error <= allowed, (basis, offset, error, allowed)
            assert error > 0  # it really is stored in bf16
    # order 0 is exactly the bf16 rounding of the newest anchor
    assert torch.equal(half.term(0).float(), features[-1].bfloat16().float())


def bf16_spacing(values: torch.Tensor) -> torch.Tensor:
    """Distance from each bfloat16 value to the next one away from zero (8 significant bits)."""
    _, exponent = torch.frexp(values.double())  # values = m * 2^e with 0.5 <= |m| < 1
    return torch.ldexp(torch.ones_like(values, dtype=torch.float64), exponent - 8)


@pytest.mark.parametrize("basis", [TaylorBasis(), HermiteBasis(), NewtonBasis()], ids=str)
def test_bf16_features_are_forecast_from_a_float32_sum_rounded_once(basis: Basis) -> None:
    # bf16 features, stored as they come (bf16): the forecast sums the stored terms in float32 and
    # rounds to bf16 once, so it is within half a bf16 spacing of the exact sum of the stored terms,
    # plus the float32 sum's own rounding (a few 2^-24 of the terms' size). A sum accumulated in bf16
    # rounds after every order and misses by up to a whole spacing.
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(64, 32, generator=generator)
    ladder = DifferenceLadder(2)
    for step in (0, 3, 6):
        ladder.update((torch.sin(0.3 * step + direction) * 4).bfloat16(), step)
    assert ladder.order == 2 and ladder.term(2).dtype == torch.bfloat16
    terms = [ladder.term(i).double() for i in range(3)]
    for offset in (1, 2):
        weights = basis.weights(offset, 2, 3.0)
        exact = sum(w * t for w, t in zip(weights, terms, strict=True))
        out = ladder.forecast(6 + offset, basis)
        assert out.dtype == torch.bfloat16
        size = sum(abs(w) * t.abs() for w, t in zip(weights, terms, strict=True))
        allowed = 0.5 * bf16_spacing(out) + 4 * 2.0**-24 * size
        excess = (out.double() - exact).abs() - allowed
        assert (excess <= 0).all(), (
            f"{basis} at offset {offset}: {int((excess > 0).sum())} values farther than half a bf16 spacing from "
            f"the exact sum of the stored terms (by up to {float(excess.max()):.3g} more)"
        )


def test_storage_dtype_does_not_change_the_forecast_dtype() -> None:
    ladder = DifferenceLadder(1, torch.float16)
    ladder.update(torch.ones(3, dtype=torch.bfloat16), 0)
    ladder.update(torch.full((3,), 2.0, dtype=torch.bfloat16), 1)
    out = ladder.forecast(2, TaylorBasis())
    assert out.dtype == torch.bfloat16 and ladder.term(0).dtype == torch.float16
    assert out.tolist() == [3.0, 3.0, 3.0]


def test_float64_features_keep_float64_precision() -> None:
    # regression: differences were once taken in float32 whatever the feature dtype
    ladder = DifferenceLadder(2)
    for step in range(3):
        ladder.update(scalar(1.0 + 1e-10 * step**2), step)
    assert float(ladder.term(1)) == pytest.approx(3e-10, rel=1e-5)
    assert float(ladder.term(2)) == pytest.approx(2e-10, rel=1e-4)


def test_weighted_sum() -> None:
    terms = torch.tensor([[1.0, 2.0], [10.0, 20.0], [100.0, 200.0]], dtype=torch.bfloat16)
    out = weighted_sum((2.0, 0.0, 0.5), terms, torch.float16)
    assert out.dtype == torch.float16
    assert out.tolist() == [52.0, 104.0]
    assert weighted_sum((1.0,), terms, torch.float32).tolist() == [1.0, 2.0]
    assert torch.equal(terms[0], torch.tensor([1.0, 2.0], dtype=torch.bfloat16))  # inputs untouched
    # accumulated in float32, rounded once: 256 + 1 + 1 = 258 is a bf16 number; accumulated in bf16,
    # 256 + 1 rounds (to even) back to 256, twice
    ones = torch.tensor([256.0, 1.0, 1.0], dtype=torch.bfloat16)[:, None]
    assert weighted_sum((1.0, 1.0, 1.0), ones, torch.bfloat16).tolist() == [258.0]


def test_weights_beyond_float32_give_a_non_finite_forecast_not_an_error() -> None:
    # regression: add_(alpha=1e60) raised on float32 terms, so the runtime never saw a non-finite
    # forecast to fall back from
    terms = torch.tensor([[1.0, 2.0, 3.0], [1.0, 0.0, -1.0]])
    out = weighted_sum((1.0, 1e60), terms, torch.float32)
    assert out[0].item() == math.inf and math.isnan(out[1].item()) and out[2].item() == -math.inf
    wide = weighted_sum((1.0, 1e60), terms.double(), torch.float64)  # float64 represents the weight
    assert wide.tolist() == [1e60, 2.0, -1e60]
