"""The exported basis contract, run over every registered basis, and shown to catch broken bases."""

from __future__ import annotations

import itertools
import math
from typing import Any

import attrs
import pytest

import hicache_sdk as sdk
from hicache_sdk.basis import Basis
from hicache_sdk.testing import (
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


def registered_bases() -> list[Basis]:
    """Every registered basis at its defaults, and the sigma bases at the ends and middle of (0, 1]."""
    bases: list[Basis] = []
    for name in sdk.list_bases():
        cls: Any = sdk.get_basis(name)
        bases.append(cls())
        if "sigma" in cls.parameter_names():
            bases += [cls(sigma=s) for s in (0.1, 1 / math.sqrt(2), 1.0)]
    return bases


@pytest.mark.parametrize("name", sdk.list_bases())
def test_contract_function_passes_for_every_registered_basis(name: str) -> None:
    check_basis_contract(sdk.get_basis(name)(), properties=False)


class TestRegisteredBasisContract(BasisContract):
    @pytest.fixture(params=registered_bases(), ids=str)
    def basis(self, request: pytest.FixtureRequest) -> Basis:
        return request.param


# -- the contract catches what it claims to catch --------------------------------------------------
@attrs.frozen(kw_only=True)
class Good(Basis):
    name = "good"
    gain: float = 1.0

    def _weights(self, offset: float, order: int, spacing: float) -> tuple[float, ...]:
        return tuple(self.gain * offset**i / math.factorial(i) for i in range(order + 1))


def test_a_good_basis_passes() -> None:
    check_basis_contract(Good(gain=0.5), max_examples=10)


@attrs.frozen(kw_only=True)
class Exploding(Good):
    name = "exploding"

    def _weights(self, offset: float, order: int, spacing: float) -> tuple[float, ...]:
        return (1.0,) + (1e37,) * order  # finite float32 weights, but the float32 forecast overflows


@attrs.frozen(kw_only=True)
class Huge(Good):
    name = "huge"

    def _weights(self, offset: float, order: int, spacing: float) -> tuple[float, ...]:
        return (1.0,) + (1e60,) * order  # finite floats beyond float32: the forecast is not finite


@attrs.frozen(kw_only=True)
class Overflowing(Good):
    name = "overflowing"

    def _weights(self, offset: float, order: int, spacing: float) -> tuple[float, ...]:
        return tuple(1e300 * offset ** (3 * i) for i in range(order + 1))  # inf from offset 2 on


class Impure(Good):
    name = "impure"
    calls = itertools.count()

    def _weights(self, offset: float, order: int, spacing: float) -> tuple[float, ...]:
        return (1.0 + next(self.calls) * 1e-3,) + (0.0,) * order


@attrs.frozen(kw_only=True)
class Lenient(Good):
    """Overrides ``weights`` and so skips the argument validation."""

    name = "lenient"

    def weights(self, offset: float, order: int, spacing: float = 1.0) -> tuple[float, ...]:
        return (1.0,) + (0.0,) * max(int(order), 0)


@attrs.define(kw_only=True, unsafe_hash=True)  # hashable and equal by value: only mutability is wrong
class Mutable(Basis):
    name = "mutable"
    gain: float = 1.0

    def _weights(self, offset: float, order: int, spacing: float) -> tuple[float, ...]:
        return (self.gain,) + (0.0,) * order


_serial = itertools.count()


@attrs.frozen(kw_only=True)
class Forgetful(Good):
    """Its parameters do not determine it: a hidden field is not a constructor parameter."""

    name = "forgetful"
    serial: int = attrs.field(init=False, factory=lambda: next(_serial))


@attrs.frozen(kw_only=True)
class BadName(Good):
    name = "bad-name"


@pytest.mark.parametrize(
    ("basis", "check", "message"),
    [
        (Exploding(), check_finite_forecasts, r"forecast at offset \d+, order [1-6], .* not finite"),
        (Huge(), check_finite_forecasts, r"forecast at offset \d+, order [1-6], .* not finite"),
        (Overflowing(), check_weights, r"weights\(offset=\d+, order=\d, spacing=\d+\) raised InvalidParameterError"),
        (Impure(), check_weights, "weights must be pure"),
        (Impure(), check_reset_equals_fresh, "forecasts differently from a fresh one"),
        (Impure(), check_linear_in_ladder, r"forecast of a\*X \+ b\*Y differs"),
        (Impure(), check_forecast_layout, "two forecasts of the same step differ"),
        (Lenient(), check_invalid_arguments_rejected, "returned weights, expected InvalidParameterError for offset"),
        (Mutable(), check_basis_identity, "let its parameter 'gain' be set"),
        (Forgetful(), check_basis_identity, r"Forgetful\(\*\*\{'gain': 1.0\}\) is not equal to forgetful\(gain=1.0\)"),
        (BadName(), check_basis_identity, "must be a Python identifier"),
    ],
    ids=lambda v: v.__name__ if callable(v) and not isinstance(v, Basis) else None,
)
def test_contract_catches_broken_bases(basis: Basis, check: Any, message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        check(basis)


def test_properties_catch_a_basis_broken_only_between_grid_points() -> None:
    @attrs.frozen(kw_only=True)
    class Fractional(Good):
        name = "fractional"

        def _weights(self, offset: float, order: int, spacing: float) -> tuple[float, ...]:
            if offset != int(offset):  # the integer grid never sees this
                return (1.0,) * order
            return super()._weights(offset, order, spacing)

    check_weights(Fractional())
    with pytest.raises(AssertionError, match="raised InvalidParameterError"):
        check_basis_properties(Fractional(), max_examples=50)
