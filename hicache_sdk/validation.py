"""Validators shared by configs and bases: each raises InvalidParameterError naming the field."""

from __future__ import annotations

import math
import numbers
from typing import Any

from .errors import InvalidParameterError

__all__ = ["check_bool", "check_int", "check_real"]


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return ``value`` if it is an integer within ``[minimum, maximum]``; raise otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidParameterError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise InvalidParameterError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidParameterError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a ``bool``; raise otherwise (``1`` and ``"yes"`` are refused)."""
    if not isinstance(value, bool):
        raise InvalidParameterError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as float if it is a finite real in the given interval; raise otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidParameterError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidParameterError(f"{name} must be finite, got {value}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise InvalidParameterError(f"{name} must be in {left}{lo}, {hi}{right}, got {value:g}")
    return value


def attrs_validator(check: Any, **bounds: Any) -> Any:
    """Wrap ``check_int``/``check_real`` as an attrs validator for the field it is attached to."""

    def _validate(instance: Any, attribute: Any, value: Any) -> None:
        check(attribute.name, value, **bounds)

    return _validate
