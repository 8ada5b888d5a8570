"""Rows of ``hicache compare``: something attached to the digits model for one generation at a time.

A :class:`CompareRow` names a method and knows how to attach it; :class:`Attached` is one
attachment: the model to sample with, a context to run each generation in, an optional summary
from this SDK, and ``remove()``. This module defines the interface, full compute and this SDK's
rows at the three speedup targets; :mod:`.baselines` adds diffusers' and cache-dit's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import attrs

from ..accelerator import CacheHandle
from ..models import DigitsModel
from ..summary import RunSummary
from .methods import DEFAULT_METHODS, FULL, PAPER_SETTING, parse_method

__all__ = [
    "SDK_METHODS",
    "TARGETS",
    "Attached",
    "CompareRow",
    "SdkAttached",
    "Target",
    "full_row",
    "sdk_replica_row",
    "sdk_row",
]

#: This SDK's methods on the compare table: the bench's, less full compute and FORA; m and sigma from
#: the paper setting.
SDK_METHODS: tuple[str, ...] = tuple(m for m in DEFAULT_METHODS if m not in (FULL, "fora"))


@attrs.frozen
class Target:
    """A speedup target: interval N and warm-up W of the reference schedule that reach it.

    On 50 steps the reference schedule computes ``W + (50 - W) // N`` full steps (W >= 1).
    """

    name: str
    interval: int
    warmup: int


#: About 2x, 3.5x and 5.5x over 50 steps: 26, 14 and 9 full steps (1.92x, 3.57x, 5.56x of the cached units).
TARGETS: tuple[Target, ...] = (Target("2x", 2, 3), Target("3.5x", 4, 3), Target("5.5x", 7, 3))


class Attached:
    """One attachment of a row's method to a model; the base class is full compute (nothing attached)."""

    def __init__(self, model: DigitsModel) -> None:
        self.model = model

    @contextlib.contextmanager
    def generation(self) -> Iterator[None]:
        """Context for one whole generation (e.g. diffusers' ``cache_context``)."""
        yield

    def summary(self) -> RunSummary | None:
        """This SDK's summary of the last generation (``None`` for other libraries)."""
        return None

    def steps_note(self) -> str:
        """How many steps were computed fully, where the library reports it."""
        summary = self.summary()
        return "-" if summary is None else f"{summary.full_steps}/{summary.forecast_steps}"

    def remove(self) -> None:
        """Detach, restoring the model's forwards."""


@attrs.frozen(kw_only=True)
class CompareRow:
    """A method on the compare table.

    Attributes:
        label: the row's name in the table.
        family: ``"none"``, ``"hicache"``, ``"diffusers"`` or ``"cache-dit"``.
        setting: the exact configuration, readable.
        attach: attaches the method to a model for one generation; ``None`` when ``skipped``.
        skipped: why the row cannot run here (e.g. an optional package missing), else ``None``.
    """

    label: str
    family: str
    setting: str
    attach: Callable[[DigitsModel], Attached] | None
    skipped: str | None = None

    @property
    def is_full(self) -> bool:
        return self.family == "none"


class SdkAttached(Attached):
    """This SDK's accelerator attached to the digits model; its handle gives the run summary."""

    def __init__(self, model: DigitsModel, handle: CacheHandle) -> None:
        super().__init__(model)
        self.handle = handle

    def summary(self) -> RunSummary | None:
        return self.handle.summary()

    def remove(self) -> None:
        self.handle.remove()


def full_row() -> CompareRow:
    """Full compute, no cache: the reference of every other row."""
    return CompareRow(label="full", family="none", setting="no cache", attach=Attached)


def _spec_row(label: str, text: str) -> CompareRow:
    accelerator = parse_method(text).accelerator(PAPER_SETTING)
    assert accelerator is not None

    def attach(model: DigitsModel) -> Attached:
        return SdkAttached(model, accelerator.apply(model.transformer))

    return CompareRow(label=label, family="hicache", setting=accelerator.tag, attach=attach)


def sdk_row(method: str, target: Target, **params: object) -> CompareRow:
    """This SDK's ``method`` (e.g. ``"clusca+hermite"``) at ``target``'s N and W, paper m and sigma."""
    extra = "".join(f",{k}={v!r}" for k, v in params.items())
    return _spec_row(f"{method} @{target.name}", f"{method}:interval={target.interval},warmup={target.warmup}{extra}")


def sdk_replica_row(target: Target) -> CompareRow:
    """This SDK's taylorseer on diffusers' schedule with the same N, W and m as the matched diffusers row."""
    text = f"taylorseer:interval={target.interval},warmup={target.warmup - 1},schedule='diffusers'"
    return _spec_row(f"taylorseer, diffusers schedule @{target.name}", text)
