"""Tests of the example plugin: hicache-sdk's contract suite plus the basis's own properties."""

from __future__ import annotations

import math

import pytest
from hicache_plugin_example import DampedTaylorBasis

import hicache_sdk as sdk
from hicache_sdk.testing import BasisContract


class TestDampedTaylorContract(BasisContract):
    contract_max_examples = 20  # hypothesis examples per property and horizon

    @pytest.fixture(params=[0.5, 8.0, 1e6], ids=lambda tau: f"horizon={tau:g}")
    def basis(self, request: pytest.FixtureRequest) -> DampedTaylorBasis:
        return DampedTaylorBasis(horizon=request.param)


def test_discovered_through_its_entry_point() -> None:
    assert sdk.get_basis("damped_taylor") is DampedTaylorBasis


@pytest.mark.parametrize("offset", [0.5, 1, 3, 10, 100])
def test_weights_are_taylor_at_the_effective_offset(offset: float) -> None:
    basis = DampedTaylorBasis(horizon=4.0)
    k_eff = 4.0 * (1 - math.exp(-offset / 4.0))
    assert basis.weights(offset, 3) == pytest.approx([k_eff**i / math.factorial(i) for i in range(4)], rel=1e-12)
    assert 0 < k_eff < min(offset, 4.0)


def test_large_horizon_is_taylor() -> None:
    taylor = sdk.get_basis("taylor")()
    assert DampedTaylorBasis(horizon=1e9).weights(5, 3) == pytest.approx(taylor.weights(5, 3), rel=1e-7)


def test_weights_bounded_by_the_horizon() -> None:
    basis = DampedTaylorBasis(horizon=2.0)
    for i, w in enumerate(basis.weights(1e4, 6)):
        assert abs(w) <= 2.0**i / math.factorial(i)


@pytest.mark.parametrize("horizon", [0, -1.0, math.inf])
def test_bad_horizon_rejected(horizon: float) -> None:
    with pytest.raises(sdk.InvalidParameterError, match="horizon"):
        DampedTaylorBasis(horizon=horizon)
