"""Contract tests for plugin authors: the checks hicache-sdk runs on every registered basis.

Run them on your own basis as a plain function, with or without pytest::

    from hicache_sdk.testing import check_basis_contract

    check_basis_contract(MyBasis(alpha=0.3))  # raises AssertionError naming the broken rule

or mix :class:`BasisContract` into a pytest test class and provide a ``basis`` fixture::

    import pytest
    from hicache_sdk.testing import BasisContract

    class TestMyBasis(BasisContract):
        @pytest.fixture
        def basis(self):
            return MyBasis(alpha=0.3)

The deterministic checks need only torch. The property-based check
(:func:`check_basis_properties`, part of :func:`check_basis_contract` unless
``properties=False``) uses `hypothesis <https://hypothesis.readthedocs.io>`_, which is imported
lazily, only when that check runs: it is a dependency of the ``test`` extra
(``pip install "hicache-sdk[test]"``), not of the package.
"""

from __future__ import annotations

from .basis_contract import (
    BasisContract,
    check_basis_contract,
    check_basis_identity,
    check_basis_properties,
    check_finite_forecasts,
    check_forecast_layout,
    check_invalid_arguments_rejected,
    check_linear_in_ladder,
    check_reset_equals_fresh,
    check_weights,
)

__all__ = [
    "BasisContract",
    "check_basis_contract",
    "check_basis_identity",
    "check_basis_properties",
    "check_finite_forecasts",
    "check_forecast_layout",
    "check_invalid_arguments_rejected",
    "check_linear_in_ladder",
    "check_reset_equals_fresh",
    "check_weights",
]
