"""Exceptions raised by hicache-sdk, each saying what was expected and what was given."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "AdapterMismatchError",
    "AlreadyAttachedError",
    "CacheConflictError",
    "DuplicatePluginError",
    "ForecastLayoutError",
    "HicacheError",
    "InvalidParameterError",
    "PluginLoadError",
    "PluginLoadWarning",
    "PluginRegistrationError",
    "UnknownPluginError",
]


class HicacheError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidParameterError(HicacheError, ValueError):
    """A parameter is outside its accepted range or of the wrong type."""


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """A ``" Did you mean 'x'?"`` suffix naming the closest candidate, or ``""``."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


_PLURALS = {"basis": "bases", "policy": "policies"}


class UnknownPluginError(HicacheError, KeyError):
    """No basis, policy or adapter is registered under the requested name.

    ``problems`` lists plugins that failed to load and may have provided it.
    """

    def __init__(self, kind: str, name: str, registered: Iterable[str], problems: Iterable[str] = ()) -> None:
        self.kind = kind
        self.name = name
        self.registered = tuple(sorted(registered))
        self.problems = tuple(problems)
        listing = ", ".join(repr(n) for n in self.registered) or "none"
        plural = _PLURALS.get(kind, kind + "s")
        self.message = f"unknown {kind} {name!r}; registered {plural}: {listing}.{did_you_mean(name, self.registered)}"
        if self.problems:
            self.message += " Plugins that failed to load: " + "; ".join(self.problems)
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would print the message quoted
        return self.message


class DuplicatePluginError(HicacheError):
    """Two plugins registered the same name for the same kind."""


class PluginLoadError(HicacheError):
    """A third-party plugin failed to load while ``HICACHE_STRICT_PLUGINS`` makes that an error."""


class PluginLoadWarning(UserWarning):
    """A third-party plugin failed to load; it was left out and every other plugin loaded."""


class PluginRegistrationError(HicacheError, TypeError):
    """A plugin registered something that is not a basis, policy or adapter."""


class AdapterMismatchError(HicacheError, TypeError):
    """The model does not have the structure the chosen adapter expects."""


class AlreadyAttachedError(HicacheError, RuntimeError):
    """An accelerator is already attached to this model."""


class CacheConflictError(HicacheError, RuntimeError):
    """Another feature cache (diffusers' or cache-dit's) acts on the model this SDK is attached to."""


class ForecastLayoutError(HicacheError, RuntimeError):
    """A policy's forecast does not have the shape, dtype, device or count of the unit's outputs."""
