"""An example hicache-sdk plugin: the ``damped_taylor`` forecaster basis.

Installed, it is found through its entry point in the ``hicache`` group (see ``pyproject.toml``);
``hicache_sdk.compose("taylorseer", basis="damped_taylor")`` then works like a built-in.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs

from hicache_sdk import Basis, hookimpl
from hicache_sdk.validation import attrs_validator, check_real

__all__ = ["DampedTaylorBasis", "hicache_register_bases"]
__version__ = "0.1.0"


@attrs.frozen(kw_only=True)
class DampedTaylorBasis(Basis):
    """Taylor's weights at a saturating offset: ``w_i = k_eff^i / i!``, ``k_eff = tau (1 - exp(-k / tau))``.

    ``tau`` (``horizon``, in steps) is how far the forecast is trusted: for ``k << tau`` the weights
    are Taylor's, for ``k >> tau`` they stop growing (``|w_i| <= tau^i / i!``). As ``tau -> inf``
    this is the ``taylor`` basis. A damping heuristic, not exact even for straight lines.

    Example:
        >>> DampedTaylorBasis(horizon=8.0).weights(2, 2)  # doctest: +ELLIPSIS
        (1.0, 1.769..., 1.565...)
    """

    name = "damped_taylor"
    horizon: float = attrs.field(default=8.0, validator=attrs_validator(check_real, low=0.0, low_open=True))

    def effective_offset(self, offset: float) -> float:
        """``k_eff = tau (1 - exp(-k / tau))``: below ``k``, and below ``tau``."""
        return -self.horizon * math.expm1(-offset / self.horizon)

    def _weights(self, offset: float, order: int, spacing: float) -> tuple[float, ...]:
        k_eff = self.effective_offset(offset)
        return tuple(k_eff**i / math.factorial(i) for i in range(order + 1))


@hookimpl
def hicache_register_bases(register: Callable[[type[Basis]], None]) -> None:
    """Register this distribution's basis with hicache-sdk."""
    register(DampedTaylorBasis)
