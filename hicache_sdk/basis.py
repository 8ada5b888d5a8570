"""The forecaster-basis interface: the rule for the scalar weights of a forecast.

A forecast at offset ``k`` steps after the newest anchor is ``sum_i w_i(k, h) * D^i`` over the
finite-difference ladder (see :mod:`hicache_sdk.ladder`); a basis supplies the weights ``w_i``.
"""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar

import attrs

from .errors import InvalidParameterError
from .validation import check_int, check_real

__all__ = ["MAX_SUPPORTED_ORDER", "Basis"]

#: Highest ladder order any policy accepts (the contract suite checks bases up to it).
MAX_SUPPORTED_ORDER = 6


class Basis(abc.ABC):
    """Base class of forecaster bases.

    Subclasses are frozen, keyword-only attrs classes whose fields are the basis parameters, set a
    unique ``name`` and implement :meth:`_weights`. Register them through the
    ``hicache_register_bases`` hook. Instances are immutable and hashable.
    """

    name: ClassVar[str]

    def weights(self, offset: float, order: int, spacing: float = 1.0) -> tuple[float, ...]:
        """Weights ``(w_0, ..., w_order)`` for a forecast ``offset`` steps after the newest anchor.

        Args:
            offset: steps since the newest anchor, ``k > 0``.
            order: highest ladder order used, ``>= 0``.
            spacing: steps between the two newest anchors, ``h > 0``.
        """
        offset = check_real("offset", offset, low=0.0, low_open=True)
        order = check_int("order", order, minimum=0)
        spacing = check_real("spacing", spacing, low=0.0, low_open=True)
        values = tuple(float(w) for w in self._weights(offset, order, spacing))
        if len(values) != order + 1:
            raise InvalidParameterError(
                f"basis {self.tag} returned {len(values)} weights for order {order}, expected {order + 1}"
            )
        if not all(math.isfinite(w) for w in values):
            raise InvalidParameterError(
                f"basis {self.tag} returned non-finite weights {values} at offset={offset:g}, order={order}"
            )
        return values

    @abc.abstractmethod
    def _weights(self, offset: float, order: int, spacing: float) -> tuple[float, ...]:
        """Compute the weights; arguments are already validated."""

    @classmethod
    def parameter_names(cls) -> tuple[str, ...]:
        """Names of the keyword parameters this basis takes (its attrs fields set by ``__init__``)."""
        return tuple(a.alias for a in attrs.fields(cls) if a.init) if attrs.has(cls) else ()

    def parameters(self) -> dict[str, Any]:
        """This instance's parameters by name: ``type(self)(**self.parameters())`` rebuilds it."""
        cls: Any = type(self)
        if not attrs.has(cls):
            return {}
        return {a.alias: getattr(self, a.name) for a in attrs.fields(cls) if a.init}

    @property
    def tag(self) -> str:
        """Readable identity, e.g. ``hermite(sigma=0.5)``."""
        params = ", ".join(f"{k}={v!r}" for k, v in self.parameters().items())
        return f"{self.name}({params})" if params else self.name

    def __str__(self) -> str:
        return self.tag
