"""When a denoising step is *full* (every unit computed) rather than forecast.

Two conventions, with warm-up ``W`` and interval ``N``, for step ``s = 0, 1, ...``:

- ``"reference"`` (TaylorSeer, HiCache, ClusCa code): with ``W' = max(W, 1)`` (step 0 is always
  full), full if ``s < W'`` or ``N - 1`` forecast steps have passed since the last full step, i.e.
  ``(s - (W' - 1)) % N == 0``. Over ``T >= W'`` steps: ``W' + (T - W') // N`` full steps (N=7, W=3,
  T=50: 9, the 5.56x of HiCache's tables).
- ``"diffusers"`` (``TaylorSeerCacheConfig(cache_interval=N, disable_cache_before_step=W)``): full if
  ``s < W'`` or ``(s - W - 1) % N == 0``; the first forecast comes right after warm-up. Over
  ``T >= W + 2`` steps with ``N >= 2``: ``W' + (T - W - 2) // N + 1`` full steps (its defaults N=5,
  W=3, T=50: 13). Step 0 is full here too (diffusers itself predicts from nothing at ``W = 0``).
"""

from __future__ import annotations

from typing import Literal

__all__ = ["SCHEDULES", "Schedule", "count_full_steps", "is_full_step"]

Schedule = Literal["reference", "diffusers"]
SCHEDULES: tuple[str, ...] = ("reference", "diffusers")


def is_full_step(step: int, *, interval: int, warmup: int, schedule: Schedule = "reference") -> bool:
    """Whether ``step`` is a full step under ``schedule``."""
    if schedule == "reference":
        first = max(warmup, 1)
        return step < first or (step - (first - 1)) % interval == 0
    if schedule == "diffusers":
        return step < max(warmup, 1) or (step - warmup - 1) % interval == 0
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def count_full_steps(num_steps: int, *, interval: int, warmup: int, schedule: Schedule = "reference") -> int:
    """Number of full steps among ``num_steps`` steps."""
    return sum(is_full_step(s, interval=interval, warmup=warmup, schedule=schedule) for s in range(num_steps))
