"""The built-in bases: reference tables, independent oracles and exactness properties on the ladder."""

from __future__ import annotations

import math
from typing import Any

import attrs
import numpy as np
import pytest
import torch
from hicache_sdk.plugins.bases import HermiteBasis, NewtonBasis, ScaledTaylorBasis, TaylorBasis, hermite_polynomials
from hypothesis import given
from hypothesis import strategies as st
from numpy.polynomial import hermite, hermite_e

import hicache_sdk as sdk
from hicache_sdk.basis import MAX_SUPPORTED_ORDER, Basis
from hicache_sdk.errors import InvalidParameterError
from hicache_sdk.ladder import DifferenceLadder


def reals(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(low, high, allow_nan=False, allow_infinity=False)


sigmas = reals(1e-3, 1.0)
offsets = reals(1e-3, 50.0)
orders = st.integers(0, MAX_SUPPORTED_ORDER)
gap_lists = st.lists(st.integers(1, 10), min_size=1, max_size=8)


def feed(ladder: DifferenceLadder, values: list[torch.Tensor], steps: list[int]) -> DifferenceLadder:
    for value, step in zip(values, steps, strict=True):
        ladder.update(value, step)
    return ladder


def rounding_bound(values: list[torch.Tensor], weights: tuple[float, ...], spacing: float = 1.0) -> float:
    """A float64 rounding allowance: D^i carries errors ~ eps * max|F| * (2/h)^i, weighted by |w_i|."""
    size = 1.0 + max(float(v.abs().max()) for v in values)
    return 1e-13 * size * sum(abs(w) * (2.0 / spacing) ** i for i, w in enumerate(weights))


def steps_from(start: int, gaps: list[int]) -> list[int]:
    steps = [start]
    for gap in gaps:
        steps.append(steps[-1] + gap)
    return steps


# -- reference tables (worked by hand) -------------------------------------------------------------
REFERENCE = [
    # basis, offset k, order, spacing h, expected (w_0, ..., w_order)
    (TaylorBasis(), 2, 3, 1.0, (1.0, 2.0, 2.0, 4 / 3)),
    (TaylorBasis(), 3, 2, 5.0, (1.0, 3.0, 4.5)),  # taylor ignores the spacing
    (HermiteBasis(sigma=0.5), 2, 3, 1.0, (1.0, 1.0, 0.25, -1 / 12)),  # x = 1: H = 1, 2, 2, -4
    (HermiteBasis(sigma=0.5), 4, 2, 1.0, (1.0, 2.0, 1.75)),
    (HermiteBasis(sigma=1.0), 1, 3, 1.0, (1.0, 2.0, 1.0, -2 / 3)),
    (HermiteBasis(sigma=0.5), 1, 0, 1.0, (1.0,)),
    (ScaledTaylorBasis(sigma=0.5), 4, 3, 1.0, (1.0, 1.0, 0.5, 1 / 6)),
    (ScaledTaylorBasis(sigma=1.0), 2, 3, 1.0, (1.0, 2.0, 2.0, 4 / 3)),
    (NewtonBasis(), 1, 3, 1.0, (1.0, 1.0, 1.0, 1.0)),  # binomial(k/h + i - 1, i) h^i
    (NewtonBasis(), 2, 3, 1.0, (1.0, 2.0, 3.0, 4.0)),
    (NewtonBasis(), 2, 2, 2.0, (1.0, 2.0, 4.0)),
    (NewtonBasis(), 3, 2, 2.0, (1.0, 3.0, 7.5)),
]


@pytest.mark.parametrize(("basis", "offset", "order", "spacing", "expected"), REFERENCE, ids=lambda v: str(v))
def test_reference_table(basis: Basis, offset: int, order: int, spacing: float, expected: tuple[float, ...]) -> None:
    assert basis.weights(offset, order, spacing) == pytest.approx(expected, rel=1e-14, abs=1e-15)


def test_builtins_are_registered_under_their_names() -> None:
    classes = {TaylorBasis, HermiteBasis, ScaledTaylorBasis, NewtonBasis}
    assert set(sdk.list_bases()) >= {cls.name for cls in classes}
    for cls in classes:
        assert sdk.get_basis(cls.name) is cls


def test_defaults_and_tags() -> None:
    assert HermiteBasis().sigma == 0.5
    assert ScaledTaylorBasis().sigma == 0.5
    assert HermiteBasis(sigma=0.4).tag == "hermite(sigma=0.4)"
    assert TaylorBasis().tag == "taylor"
    assert NewtonBasis().parameters() == {}
    assert HermiteBasis(sigma=0.4) == HermiteBasis(sigma=0.4) != HermiteBasis(sigma=0.5)


def test_parameters_are_the_init_keywords() -> None:
    @attrs.frozen(kw_only=True)
    class Aliased(TaylorBasis):
        name = "aliased"
        _scale: float = 2.0  # the keyword is `scale`
        cache: float = attrs.field(init=False, default=0.0)  # not a parameter

    assert Aliased.parameter_names() == ("scale",)
    basis = Aliased(scale=3.0)
    assert basis.parameters() == {"scale": 3.0}
    assert Aliased(**basis.parameters()) == basis
    assert basis.tag == "aliased(scale=3.0)"


# -- taylor ------------------------------------------------------------------------------------------
@given(
    intercept=reals(-100, 100),
    slope=reals(-10, 10),
    start=st.integers(-20, 20),
    gaps=gap_lists,
    order=st.integers(1, MAX_SUPPORTED_ORDER),
    offset=st.integers(1, 20),
)
def test_taylor_exact_on_lines_at_any_anchor_steps(
    intercept: float, slope: float, start: int, gaps: list[int], order: int, offset: int
) -> None:
    direction = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    steps = steps_from(start, gaps)
    line = [(intercept + slope * s) * direction for s in steps]
    ladder = feed(DifferenceLadder(order), line, steps)
    out = ladder.forecast(steps[-1] + offset, TaylorBasis())
    expected = (intercept + slope * (steps[-1] + offset)) * direction
    torch.testing.assert_close(out, expected, rtol=0, atol=rounding_bound(line, TaylorBasis().weights(offset, order)))


@pytest.mark.parametrize("spacing", [1, 2, 5])
@pytest.mark.parametrize("offset", [1, 2, 3, 6])
def test_taylor_on_this_ladder_misses_quadratics_by_k_times_h(spacing: int, offset: int) -> None:
    # The documented caveat: D^1 = 2s - h is the slope half a spacing behind the anchor, so the order-2
    # Taylor forecast of s^2 is (s + k)^2 - k h, while Newton's weights give the parabola exactly.
    steps = [10, 10 + spacing, 10 + 2 * spacing]
    values = [torch.tensor([float(s * s)], dtype=torch.float64) for s in steps]
    ladder = feed(DifferenceLadder(2), values, steps)
    target = float((steps[-1] + offset) ** 2)
    taylor = float(ladder.forecast(steps[-1] + offset, TaylorBasis()))
    newton = float(ladder.forecast(steps[-1] + offset, NewtonBasis()))
    assert taylor == pytest.approx(target - offset * spacing, rel=1e-12)
    assert newton == pytest.approx(target, rel=1e-12)


# -- newton ------------------------------------------------------------------------------------------
@given(
    order=st.integers(0, 4),
    data=st.data(),
    spacing=st.integers(1, 5),
    start=st.integers(-10, 10),
    extra=st.integers(0, 3),
    offset=st.integers(1, 12),
)
def test_newton_exact_on_polynomials_of_degree_up_to_order(
    order: int, data: st.DataObject, spacing: int, start: int, extra: int, offset: int
) -> None:
    degree = data.draw(st.integers(0, order), label="degree")
    coefficients = data.draw(st.lists(reals(-2, 2), min_size=degree + 1, max_size=degree + 1))
    direction = torch.tensor([1.0, 0.25, -3.0], dtype=torch.float64)
    steps = [start + i * spacing for i in range(order + 1 + extra)]  # enough anchors to fill the ladder
    values = [float(np.polynomial.polynomial.polyval(s, coefficients)) * direction for s in steps]
    ladder = feed(DifferenceLadder(order), values, steps)
    assert ladder.order == order
    target_step = steps[-1] + offset
    out = ladder.forecast(target_step, NewtonBasis())
    expected = float(np.polynomial.polynomial.polyval(target_step, coefficients)) * direction
    weights = NewtonBasis().weights(offset, order, spacing)
    torch.testing.assert_close(out, expected, rtol=0, atol=rounding_bound(values, weights, spacing))


def test_newton_not_exact_beyond_its_order() -> None:
    # degree order + 1 is out of reach: the test above can fail
    steps = [0, 1, 2]
    ladder = feed(DifferenceLadder(1), [torch.tensor([float(s**2)], dtype=torch.float64) for s in steps], steps)
    assert float(ladder.forecast(3, NewtonBasis())) == pytest.approx(7.0)  # line through (1, 1), (2, 4); 3^2 = 9


@given(offset=offsets, order=orders, spacing=reals(0.1, 10.0))
def test_newton_weights_are_shifted_products(offset: float, order: int, spacing: float) -> None:
    weights = NewtonBasis().weights(offset, order, spacing)
    for i, w in enumerate(weights):
        expected = math.prod(offset + j * spacing for j in range(i)) / math.factorial(i)
        assert w == pytest.approx(expected, rel=1e-12)


# -- hermite -----------------------------------------------------------------------------------------
@given(x=reals(-20, 20), order=st.integers(0, 12))
def test_hermite_polynomials_match_numpy_hermval(x: float, order: int) -> None:
    ours = hermite_polynomials(x, order)
    assert len(ours) == order + 1
    for n, value in enumerate(ours):
        oracle = hermite.hermval(x, [0.0] * n + [1.0])
        assert value == pytest.approx(oracle, rel=1e-10, abs=1e-9)


def test_hermite_is_the_physicists_convention_not_hermite_e() -> None:
    assert hermite_polynomials(1.0, 3) == [1.0, 2.0, 2.0, -4.0]
    assert [hermite_e.hermeval(1.0, [0] * n + [1]) for n in range(4)] == [1.0, 1.0, 0.0, -2.0]


@given(sigma=sigmas, offset=offsets, order=orders)
def test_hermite_weights_match_independent_oracle(sigma: float, offset: float, order: int) -> None:
    weights = HermiteBasis(sigma=sigma).weights(offset, order)
    for i, w in enumerate(weights):
        oracle = hermite.hermval(sigma * offset, [0.0] * i + [1.0]) * sigma**i / math.factorial(i)
        assert w == pytest.approx(oracle, rel=1e-10, abs=1e-12)


@given(
    intercept=reals(-100, 100),
    slope=reals(-10, 10),
    gaps=gap_lists,
    offset=st.integers(1, 20),
)
def test_hermite_at_inverse_sqrt2_continues_a_line(
    intercept: float, slope: float, gaps: list[int], offset: int
) -> None:
    # order 1, sigma = 1/sqrt(2): w_1 = 2 sigma^2 k = k, the Taylor forecast, so the line goes on forwards
    steps = steps_from(0, gaps)
    ladder = feed(
        DifferenceLadder(1), [torch.tensor([intercept + slope * s], dtype=torch.float64) for s in steps], steps
    )
    out = float(ladder.forecast(steps[-1] + offset, HermiteBasis(sigma=1 / math.sqrt(2))))
    expected = intercept + slope * (steps[-1] + offset)
    assert out == pytest.approx(expected, rel=1e-12, abs=1e-9)


@pytest.mark.parametrize("slope", [3.0, -3.0])
def test_hermite_extrapolates_forwards(slope: float) -> None:
    # the sign check: on a line, the order-1 forecast moves from the anchor in the slope's direction
    # (a port evaluating H(-k) on forward differences would move backwards)
    ladder = feed(DifferenceLadder(1), [torch.tensor([0.0]), torch.tensor([slope])], [0, 1])
    out = float(ladder.forecast(3, HermiteBasis(sigma=0.5)))
    assert out == pytest.approx(slope + 0.5 * 2 * slope)  # w_1 = 0.5 k at sigma 0.5


@pytest.mark.parametrize("offset", [*range(1, 11), 2.5, 37.0])
def test_hermite_half_sigma_table(offset: float) -> None:
    w = HermiteBasis(sigma=0.5).weights(offset, 2)
    assert w[0] == 1.0
    assert w[1] == pytest.approx(0.5 * offset, rel=1e-15)
    assert w[2] == pytest.approx(offset**2 / 8 - 0.25, rel=1e-14, abs=1e-15)


@given(sigma=sigmas, offset=offsets, order=st.integers(0, 24))
def test_hermite_weight_bound(sigma: float, offset: float, order: int) -> None:
    # |w_i(k)| <= exp(sigma^2 (2k + 1)) for every order (Cauchy's estimate on exp(2xt + t^2) at t = sigma)
    bound = math.exp(sigma**2 * (2 * offset + 1))
    for i, w in enumerate(HermiteBasis(sigma=sigma).weights(offset, order)):
        assert abs(w) <= bound * (1 + 1e-12), (i, w, bound)


# -- scaled taylor -----------------------------------------------------------------------------------
@given(sigma=sigmas, offset=offsets, order=orders)
def test_scaled_taylor_is_taylor_at_sigma_squared_k(sigma: float, offset: float, order: int) -> None:
    weights = ScaledTaylorBasis(sigma=sigma).weights(offset, order)
    x = sigma**2 * offset
    assert weights == pytest.approx([x**i / math.factorial(i) for i in range(order + 1)], rel=1e-12)
    assert weights == pytest.approx(TaylorBasis().weights(x, order), rel=1e-12)


@given(offset=offsets, order=orders)
def test_scaled_taylor_at_sigma_one_is_taylor(offset: float, order: int) -> None:
    assert ScaledTaylorBasis(sigma=1.0).weights(offset, order) == TaylorBasis().weights(offset, order)


@given(offset=offsets, order=orders, spacing=reals(0.5, 10))
def test_taylor_weights(offset: float, order: int, spacing: float) -> None:
    weights = TaylorBasis().weights(offset, order, spacing)
    assert weights == pytest.approx([offset**i / math.factorial(i) for i in range(order + 1)], rel=1e-14)


# -- parameters and arguments ------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [HermiteBasis, ScaledTaylorBasis])
@pytest.mark.parametrize(
    ("sigma", "expected"),
    [
        (0, r"sigma must be in \(0, 1\], got 0"),
        (-0.5, r"sigma must be in \(0, 1\], got -0.5"),
        (1.5, r"sigma must be in \(0, 1\], got 1.5"),
        (math.nan, "sigma must be finite, got nan"),
        ("0.5", r"sigma must be a real number, got '0.5' \(str\)"),
        (True, r"sigma must be a real number, got True \(bool\)"),
    ],
)
def test_sigma_outside_unit_interval_rejected(cls: Any, sigma: object, expected: str) -> None:
    with pytest.raises(InvalidParameterError, match=expected):
        cls(sigma=sigma)


@pytest.mark.parametrize("cls", [HermiteBasis, ScaledTaylorBasis])
def test_sigma_is_keyword_only_and_frozen(cls: Any) -> None:
    with pytest.raises(TypeError):
        cls(0.5)
    basis = cls(sigma=1.0)
    with pytest.raises(AttributeError):
        basis.sigma = 0.5


@pytest.mark.parametrize(
    ("offset", "order", "spacing", "expected"),
    [
        (0, 1, 1.0, r"offset must be in \(0, inf\), got 0"),
        (-1, 1, 1.0, r"offset must be in \(0, inf\), got -1"),
        (1, -1, 1.0, "order must be >= 0, got -1"),
        (1, 1.5, 1.0, r"order must be an integer, got 1.5 \(float\)"),
        (1, 1, 0, r"spacing must be in \(0, inf\), got 0"),
        (1, 1, -3, r"spacing must be in \(0, inf\), got -3"),
    ],
)
@pytest.mark.parametrize("basis", [TaylorBasis(), HermiteBasis(), ScaledTaylorBasis(), NewtonBasis()], ids=str)
def test_bad_weight_arguments_say_expected_and_given(
    basis: Basis, offset: object, order: object, spacing: object, expected: str
) -> None:
    with pytest.raises(InvalidParameterError, match=expected):
        basis.weights(offset, order, spacing)  # type: ignore[arg-type]


def test_weights_of_a_basis_returning_the_wrong_count_are_refused() -> None:
    class Short(TaylorBasis):
        name = "short"

        def _weights(self, offset: float, order: int, spacing: float) -> tuple[float, ...]:
            return super()._weights(offset, order, spacing)[:-1]

    with pytest.raises(InvalidParameterError, match=r"returned 2 weights for order 2, expected 3"):
        Short().weights(1, 2)
