"""Full-step schedules: METHODS section 3's table, the closed forms, diffusers' convention, real runs."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from diffusers.hooks.hooks import CacheContext, StateManager
from diffusers.hooks.taylorseer_cache import TaylorSeerCacheHook, TaylorSeerState
from helpers import CallCounter, flux_inputs, flux_modules, run_loop, tiny_flux
from hypothesis import given
from hypothesis import strategies as st

import hicache_sdk as sdk
from hicache_sdk.schedule import count_full_steps, is_full_step

# (N, W, full steps of 50, speedup as printed in METHODS section 3)
REFERENCE_TABLE = [(6, 3, 10, "5.00"), (7, 3, 9, "5.56"), (7, 1, 8, "6.25")]

steps_st = st.integers(min_value=0, max_value=200)
interval_st = st.integers(min_value=1, max_value=20)
warmup_st = st.integers(min_value=0, max_value=12)


def full_steps(num_steps: int, interval: int, warmup: int, schedule: Any = "reference") -> list[int]:
    return [s for s in range(num_steps) if is_full_step(s, interval=interval, warmup=warmup, schedule=schedule)]


@pytest.mark.parametrize(("interval", "warmup", "expected", "speedup"), REFERENCE_TABLE)
def test_reference_schedule_matches_methods_table(interval: int, warmup: int, expected: int, speedup: str) -> None:
    assert count_full_steps(50, interval=interval, warmup=warmup) == expected
    assert f"{50 / expected:.2f}" == speedup


def test_reference_schedule_steps_at_hicache_setting() -> None:
    assert full_steps(50, 7, 3) == [0, 1, 2, 9, 16, 23, 30, 37, 44]


def test_diffusers_convention_at_its_defaults() -> None:
    assert count_full_steps(50, interval=5, warmup=3, schedule="diffusers") == 13
    assert full_steps(50, 5, 3, "diffusers") == [0, 1, 2, *range(4, 50, 5)]


@given(num_steps=steps_st, interval=interval_st, warmup=warmup_st)
def test_reference_closed_form(num_steps: int, interval: int, warmup: int) -> None:
    first = max(warmup, 1)
    expected = first + (num_steps - first) // interval if num_steps >= first else num_steps
    assert count_full_steps(num_steps, interval=interval, warmup=warmup) == expected


@given(num_steps=steps_st, interval=st.integers(min_value=2, max_value=20), warmup=warmup_st)
def test_diffusers_closed_form(num_steps: int, interval: int, warmup: int) -> None:
    first = max(warmup, 1)
    if num_steps >= warmup + 2:
        expected = first + (num_steps - warmup - 2) // interval + 1
    else:
        expected = min(num_steps, first)
    assert count_full_steps(num_steps, interval=interval, warmup=warmup, schedule="diffusers") == expected


@given(num_steps=st.integers(min_value=1, max_value=120), interval=interval_st, warmup=warmup_st)
def test_reference_period_is_exactly_interval_after_warmup(num_steps: int, interval: int, warmup: int) -> None:
    steps = full_steps(num_steps, interval, warmup)
    first = max(warmup, 1)
    assert steps[: min(first, num_steps)] == list(range(min(first, num_steps)))
    after = steps[first - 1 :] if num_steps >= first else []
    assert all(b - a == interval for a, b in itertools.pairwise(after))
    # nothing is left uncomputed for N or more steps
    assert num_steps - 1 - steps[-1] < interval


@given(num_steps=st.integers(min_value=1, max_value=60), warmup=warmup_st)
def test_interval_one_computes_every_step(num_steps: int, warmup: int) -> None:
    for schedule in ("reference", "diffusers"):
        assert count_full_steps(num_steps, interval=1, warmup=warmup, schedule=schedule) == num_steps


def diffusers_decisions(num_steps: int, interval: int, warmup: int) -> list[int]:
    """The steps diffusers' own TaylorSeer hook computes (its decision code as the oracle)."""
    manager = StateManager(TaylorSeerState)
    manager.set_context(CacheContext("cond"))
    hook = TaylorSeerCacheHook(
        cache_interval=interval,
        disable_cache_before_step=warmup,
        taylor_factors_dtype=torch.float32,
        state_manager=manager,
    )
    return [s for s in range(num_steps) if hook._measure_should_compute()[0]]


@pytest.mark.parametrize(("interval", "warmup"), [(5, 3), (2, 1), (4, 1), (6, 3), (3, 5), (1, 2)])
def test_diffusers_convention_equals_diffusers_hook(interval: int, warmup: int) -> None:
    assert full_steps(50, interval, warmup, "diffusers") == diffusers_decisions(50, interval, warmup)


@pytest.mark.parametrize(
    ("schedule", "interval", "warmup", "expected"),
    [("reference", 7, 3, 9), ("reference", 6, 3, 10), ("reference", 7, 1, 8), ("diffusers", 5, 3, 13)],
)
def test_real_run_follows_schedule(schedule: str, interval: int, warmup: int, expected: int) -> None:
    model = tiny_flux(num_layers=1, num_single_layers=1)
    counter = CallCounter(flux_modules(model))
    computed: list[int] = []
    seen = [0]

    def on_step(step: int) -> None:
        if step > 0 and counter.calls["transformer_blocks.0.attn"] > seen[0]:
            computed.append(step - 1)
        seen[0] = counter.calls["transformer_blocks.0.attn"]

    acc = sdk.compose("taylorseer", interval=interval, warmup=warmup, schedule=schedule, max_order=1)
    with acc.apply(model) as handle, counter.counting():
        run_loop(model, flux_inputs(side=2, text=2), steps=50, on_step=on_step)
        on_step(50)
    summary = handle.summary()
    assert (summary.steps, summary.full_steps, summary.forecast_steps) == (50, expected, 50 - expected)
    assert computed == full_steps(50, interval, warmup, schedule)
    assert counter.calls["transformer_blocks.0.attn"] == expected
