"""Built-in forecaster bases: ``taylor``, ``hermite``, ``scaled_taylor`` and ``newton``.

All act on the finite-difference ladder of :mod:`hicache_sdk.ladder`; see the docs page "The
math of each basis" for the formulas, conventions and sources.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs

from hicache_sdk import hookimpl
from hicache_sdk.basis import Basis
from hicache_sdk.validation import attrs_validator, check_real

__all__ = ["HermiteBasis", "NewtonBasis", "ScaledTaylorBasis", "TaylorBasis", "hermite_polynomials"]


@attrs.frozen(kw_only=True)
class TaylorBasis(Basis):
    """TaylorSeer's weights ``w_i = k^i / i!``.

    On the backward-difference ladder this is exact for straight lines only: ``D^1`` estimates the
    slope half a spacing behind the newest anchor. Use ``newton`` for exact polynomial extrapolation.
    """

    name = "taylor"

    def _weights(self, offset: float, order: int, spacing: float) -> tuple[float, ...]:
        return tuple(offset**i / math.factorial(i) for i in range(order + 1))


def hermite_polynomials(x: float, order: int) -> list[float]:
    """Physicists' Hermite polynomials ``H_0(x) .. H_order(x)`` by the three-term recurrence.

    ``H_0 = 1``, ``H_1 = 2x``, ``H_{n+1} = 2x H_n - 2n H_{n-1}`` (numpy's ``hermval`` convention,
    not ``hermeval``'s probabilists' ``He_n``).
    """
    values = [1.0, 2.0 * x][: order + 1]
    for n in range(1, order):
        values.append(2.0 * x * values[n] - 2.0 * n * values[n - 1])
    return values


_sigma_in_unit_interval: Callable[..., None] = attrs_validator(check_real, low=0.0, high=1.0, low_open=True)


@attrs.frozen(kw_only=True)
class HermiteBasis(Basis):
    """HiCache's dual-scaled Hermite weights ``w_i = sigma^i H_i(sigma k) / i!``.

    ``H_i`` are the physicists' Hermite polynomials and ``k > 0`` counts steps since the newest
    anchor (forward differences). ``sigma`` in (0, 1] scales both the input and the coefficients;
    the weights are bounded by ``|w_i| <= exp(sigma^2 (2k + 1))`` for every order.
    """

    name = "hermite"
    sigma: float = attrs.field(default=0.5, validator=_sigma_in_unit_interval)

    def _weights(self, offset: float, order: int, spacing: float) -> tuple[float, ...]:
        h = hermite_polynomials(self.sigma * offset, order)
        return tuple(self.sigma**i * h[i] / math.factorial(i) for i in range(order + 1))


@attrs.frozen(kw_only=True)
class ScaledTaylorBasis(Basis):
    """HiCache's "Hi-Taylor" ablation: ``w_i = (sigma^2 k)^i / i!``."""

    name = "scaled_taylor"
    sigma: float = attrs.field(default=0.5, validator=_sigma_in_unit_interval)

    def _weights(self, offset: float, order: int, spacing: float) -> tuple[float, ...]:
        x = self.sigma**2 * offset
        return tuple(x**i / math.factorial(i) for i in range(order + 1))


@attrs.frozen(kw_only=True)
class NewtonBasis(Basis):
    """Newton's backward-difference weights ``w_i = prod_{j<i} (k + j h) / i!``.

    Exact for polynomials of degree <= order when the anchors are equally spaced ``h`` apart.
    """

    name = "newton"

    def _weights(self, offset: float, order: int, spacing: float) -> tuple[float, ...]:
        weights = [1.0]
        for i in range(1, order + 1):
            weights.append(weights[-1] * (offset + (i - 1) * spacing) / i)
        return tuple(weights)


@hookimpl
def hicache_register_bases(register: Callable[[type[Basis]], None]) -> None:
    for basis in (TaylorBasis, HermiteBasis, ScaledTaylorBasis, NewtonBasis):
        register(basis)
