"""Exceptions raised by hicache-sdk, each saying what was expected and what was given."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "AdapterMismatchError",
    "AlreadyAttachedError",
    "DuplicatePluginError",
    "HicacheError",
    "InvalidParameterError",
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
    """No basis, policy or adapter is registered under the requested name."""

    def __init__(self, kind: str, name: str, registered: Iterable[str]) -> None:
        self.kind = kind
        self.name = name
        self.registered = tuple(sorted(registered))
        listing = ", ".join(repr(n) for n in self.registered) or "none"
        plural = _PLURALS.get(kind, kind + "s")
        self.message = f"unknown {kind} {name!r}; registered {plural}: {listing}.{did_you_mean(name, self.registered)}"
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would print the message quoted
        return self.message


class DuplicatePluginError(HicacheError):
    """Two plugins registered the same name for the same kind."""


class PluginRegistrationError(HicacheError, TypeError):
    """A plugin registered something that is not a basis, policy or adapter."""


class AdapterMismatchError(HicacheError, TypeError):
    """The model does not have the structure the chosen adapter expects."""


class AlreadyAttachedError(HicacheError, RuntimeError):
    """An accelerator is already attached to this model."""
