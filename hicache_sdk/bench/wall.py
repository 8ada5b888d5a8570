"""How far to trust a wall-clock speedup: the spread of each row's timed repeats, and its flags.

The bench and ``hicache compare`` time every row ``repeats`` times, interleaved, and report the
median. On a loaded machine the repeats of one row can differ several-fold, and the median then
says little. For each row this module measures

- the **spread**: the largest of its repeat times over the smallest (1.00x on a quiet machine);
- the **range** of its per-repeat speedups: full compute's time over the row's time in the same
  repeat (the interleaving puts both in one round, so a machine-wide slowdown cancels in a pair);

and flags the row ``noisy`` when its spread exceeds :data:`WALL_SPREAD_TOLERANCE`, and
``wall > FLOPs`` when its wall speedup exceeds its counted FLOPs speedup (caching cannot save more
time than the work it skips, so that is noise, not speed). :func:`wall_verdict` turns the flags of
a table into one sentence: whether the wall column can be trusted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs

__all__ = [
    "ABOVE_FLOPS",
    "NOISY",
    "WALL_SPREAD_TOLERANCE",
    "WallSpread",
    "format_flags",
    "format_range",
    "format_spread",
    "wall_spread",
    "wall_verdict",
]

#: Largest accepted ratio of a row's slowest repeat time to its fastest.
WALL_SPREAD_TOLERANCE = 1.25
NOISY = "noisy"
ABOVE_FLOPS = "wall > FLOPs"


@attrs.frozen
class WallSpread:
    """The spread of one row's timed repeats and its flags.

    Attributes:
        spread: max / min of the row's repeat times; ``None`` with a single repeat.
        speedup_min: smallest per-repeat speedup (full compute's time / the row's, same repeat).
        speedup_max: largest per-repeat speedup.
        flags: :data:`NOISY` (spread beyond the tolerance) and/or :data:`ABOVE_FLOPS`.
    """

    spread: float | None
    speedup_min: float
    speedup_max: float
    flags: tuple[str, ...] = ()

    @property
    def noisy(self) -> bool:
        return NOISY in self.flags

    @property
    def above_flops(self) -> bool:
        return ABOVE_FLOPS in self.flags


def wall_spread(
    seconds: Sequence[float],
    full_seconds: Sequence[float],
    *,
    wall_speedup: float,
    flops_speedup: float,
    tolerance: float = WALL_SPREAD_TOLERANCE,
) -> WallSpread:
    """Spread and flags of a row timed ``seconds`` against full compute's ``full_seconds``.

    ``seconds[r]`` and ``full_seconds[r]`` are the same repeat (round) ``r``.
    """
    if not seconds or len(seconds) != len(full_seconds):
        raise ValueError(f"expected as many row as full-compute times, got {len(seconds)} and {len(full_seconds)}")
    if min(seconds) <= 0 or min(full_seconds) <= 0:
        raise ValueError("wall times must be > 0")
    ratios = [f / s for f, s in zip(full_seconds, seconds, strict=True)]
    spread = max(seconds) / min(seconds) if len(seconds) > 1 else None
    flags = []
    if spread is not None and spread > tolerance:
        flags.append(NOISY)
    if math.isfinite(flops_speedup) and wall_speedup > flops_speedup:
        flags.append(ABOVE_FLOPS)
    return WallSpread(spread=spread, speedup_min=min(ratios), speedup_max=max(ratios), flags=tuple(flags))


def format_spread(wall: WallSpread | None) -> str:
    """``1.04x`` (``-`` with one repeat)."""
    return "-" if wall is None or wall.spread is None else f"{wall.spread:.2f}x"


def format_range(wall: WallSpread | None) -> str:
    """The per-repeat speedups, ``3.80-4.10x``."""
    return "-" if wall is None else f"{wall.speedup_min:.2f}-{wall.speedup_max:.2f}x"


def format_flags(wall: WallSpread | None) -> str:
    """``ok``, ``noisy``, ``wall > FLOPs`` or both; ``-`` when there is nothing to check."""
    if wall is None:
        return "-"
    if wall.flags:
        return ", ".join(wall.flags)
    return "ok" if wall.spread is not None else "1 repeat"


def wall_verdict(
    rows: Sequence[tuple[str, WallSpread | None, float, float]], tolerance: float = WALL_SPREAD_TOLERANCE
) -> tuple[bool | None, str]:
    """Whether the wall column can be trusted, and one sentence saying why.

    ``rows`` are ``(label, wall, wall_speedup, flops_speedup)``; rows without a ``wall`` (skipped)
    are ignored. Returns ``(False, ...)`` when any row is flagged, ``(None, ...)`` when nothing is
    flagged but the spread was not measured (one repeat), ``(True, ...)`` otherwise.
    """
    measured = [(label, w, ws, fs) for label, w, ws, fs in rows if w is not None]
    noisy = [f"`{label}` {w.spread:.2f}x" for label, w, _, _ in measured if w.noisy and w.spread is not None]
    above = [f"`{label}` {ws:.3f}x > {fs:.3f}x" for label, w, ws, fs in measured if w.above_flops]
    rule = (
        f"tolerance {tolerance:.2f}x on the spread of a row's repeat times (slowest / fastest); "
        "no wall speedup may exceed its FLOPs speedup"
    )
    if noisy or above:
        parts = []
        if noisy:
            parts.append("rows beyond the spread tolerance: " + ", ".join(noisy))
        if above:
            parts.append("rows whose wall speedup exceeds their FLOPs speedup: " + ", ".join(above))
        return False, (
            f"Wall check ({rule}): the machine was too noisy to trust the wall column; "
            + "; ".join(parts)
            + ". Re-run on an idle machine (fewer threads, more repeats)."
        )
    if any(w.spread is None for _, w, _, _ in measured):
        return None, (
            f"Wall check ({rule}): one repeat, so the spread of the wall times is not measured and the wall "
            "column is a single sample; run at least 2 repeats to check it."
        )
    return True, (
        f"Wall check ({rule}): every row is within the tolerance; the wall column is consistent across repeats."
    )
