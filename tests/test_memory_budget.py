"""``compose(..., memory_budget=...)``: the planner fits forecast state into a budget, measured on the trained model.

Every budgeted run here checks the measured peak of forecast-state bytes against its budget.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from helpers import flux_inputs, run_loop, tiny_flux

import hicache_sdk as sdk
from hicache_sdk.errors import InvalidParameterError
from hicache_sdk.models import DigitsModel, load_digits_model, sample
from hicache_sdk.planner import LEVELS, MemoryPlanner, format_bytes, parse_bytes
from hicache_sdk.state import ContextState, UnitState
from hicache_sdk.summary import RunSummary

DIGITS, SEEDS, STEPS = [2, 7], [0, 1], 20
POLICIES: dict[str, tuple[str, dict[str, Any]]] = {
    "taylorseer m=2": ("taylorseer", {"interval": 5, "warmup": 2, "max_order": 2}),
    "hicache m=1": ("taylorseer", {"basis": "hermite", "interval": 4, "max_order": 1}),
    "fora": ("fora", {"interval": 4}),
    "first_block": ("first_block", {"warmup": 2}),
    "easycache": ("easycache", {"warmup": 2}),
    "clusca": ("clusca", {"interval": 5, "max_order": 1}),
}
SHARES = (0.8, 0.45, 0.3, 0.15)


@pytest.fixture(scope="module")
def digits() -> DigitsModel:
    return load_digits_model()


def _run(model: DigitsModel, policy: str, params: dict[str, Any], **memory: Any) -> tuple[torch.Tensor, RunSummary]:
    params = dict(params)
    basis = params.pop("basis", "taylor")
    with sdk.compose(policy, basis=basis, **params, **memory).apply(model.transformer) as handle:
        out = sample(model, DIGITS, SEEDS, steps=STEPS)
        return out, handle.summary()


def _smallest(error: InvalidParameterError) -> int:
    found = re.search(r"give memory_budget >= (\d+)", str(error))
    assert found is not None, str(error)
    return int(found.group(1))


# -- sizes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, 1),
        (4096, 4096),
        ("2GiB", 2 * 2**30),
        ("2 GiB", 2 * 2**30),
        ("1.5G", int(1.5 * 2**30)),
        ("512MB", 512 * 10**6),
        ("64 kib", 64 * 1024),
        ("1e6", 10**6),
        ("100 B", 100),
    ],
)
def test_budgets_parse_as_bytes(value: Any, expected: int) -> None:
    assert parse_bytes(value) == expected


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (0, r"memory_budget must be at least one byte, got 0"),
        (-5, r"memory_budget must be at least one byte, got -5"),
        ("0MiB", r"at least one byte, got '0MiB'"),
        ("-2GiB", r"'-2GiB' is not a size.*KiB, MiB, GiB"),
        ("lots", r"'lots' is not a size"),
        ("12 parsecs", r"'12 parsecs' is not a size"),
        (float("nan"), r"at least one byte, got nan"),
        (True, r"a number of bytes or a string such as '2GiB', got True"),
        ([1], r"a number of bytes or a string"),
    ],
)
def test_bad_budgets_are_clear_errors(value: Any, match: str) -> None:
    with pytest.raises(InvalidParameterError, match=match):
        sdk.compose("taylorseer", memory_budget=value)


def test_budget_and_format_are_exclusive() -> None:
    with pytest.raises(
        InvalidParameterError, match=r"give memory_budget \('1GiB'\) or cache_dtype \('bf16'\), not both"
    ):
        sdk.compose("taylorseer", memory_budget="1GiB", cache_dtype="bf16")


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("nowhere", r"offload='nowhere' is not a device name"),
        (42, r"offload must be a device name such as 'cpu' or a torch.device, got 42"),
    ],
)
def test_bad_offload_devices_are_clear_errors(value: Any, match: str) -> None:
    with pytest.raises(InvalidParameterError, match=match):
        sdk.compose("taylorseer", offload=value)


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has a cuda:7")
def test_offload_to_a_missing_device_names_it() -> None:
    with pytest.raises(InvalidParameterError, match=r"offload='cuda:7': no such device on this machine"):
        sdk.compose("taylorseer", offload="cuda:7")


def test_a_format_this_torch_lacks_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(InvalidParameterError, match=r"cache_dtype: storage format 'fp8'.*needs torch\.float8_e4m3fn"):
        sdk.compose("taylorseer", cache_dtype="fp8")


def test_format_bytes_reads_well() -> None:
    assert [format_bytes(n) for n in (12, 2048, 3 * 2**20, 5 * 2**30)] == ["12 B", "2.00 KiB", "3.00 MiB", "5.00 GiB"]


# -- the planner on the trained model --------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_measured_peak_stays_within_every_budget(digits: DigitsModel, name: str) -> None:
    policy, params = POLICIES[name]
    _, free = _run(digits, policy, params)
    assert free.peak_cache_bytes > 0
    for share in SHARES:
        budget = int(free.peak_cache_bytes * share)
        try:
            out, summary = _run(digits, policy, params, memory_budget=budget)
        except InvalidParameterError as error:
            smallest = _smallest(error)
            assert smallest > budget, (name, share)
            out, summary = _run(digits, policy, params, memory_budget=smallest)  # the named budget does fit
            budget = smallest
        assert torch.isfinite(out).all()
        assert summary.memory_budget == budget and summary.predicted_bytes is not None
        assert 0 < summary.peak_cache_bytes <= summary.predicted_bytes <= budget, (name, share, summary.memory_plan)


def test_a_generous_budget_changes_nothing(digits: DigitsModel) -> None:
    policy, params = POLICIES["taylorseer m=2"]
    reference, free = _run(digits, policy, params)
    out, summary = _run(digits, policy, params, memory_budget=free.peak_cache_bytes)
    assert torch.equal(out, reference)
    assert summary.memory_plan is not None and re.fullmatch(r"\d+ x native", summary.memory_plan.split(";")[0])
    assert summary.peak_cache_bytes == free.peak_cache_bytes


def test_a_tight_budget_coarsens_blocks_and_keeps_accuracy(digits: DigitsModel) -> None:
    policy, params = POLICIES["taylorseer m=2"]
    full = sample(digits, DIGITS, SEEDS, steps=STEPS)
    cached, free = _run(digits, policy, params)
    planned, summary = _run(digits, policy, params, memory_budget=int(free.peak_cache_bytes * 0.25))
    assert summary.memory_plan is not None and "block" in summary.memory_plan
    keys = [u.key for u in summary.units]
    coarse = [k for k in keys if k.count(".") == 1]  # a block's own residual unit, e.g. "transformer_blocks.0"
    assert coarse and not any(k.startswith(block + ".") for block in coarse for k in keys)
    error = float((planned - full).norm() / full.norm())
    baseline = float((cached - full).norm() / full.norm())
    assert error < 1.5 * baseline  # a quarter of the bytes, about the same error (figures in the benchmarks)


@pytest.mark.parametrize("units", ["block", "range", "output"])
def test_budgets_plan_the_formats_of_coarser_units(digits: DigitsModel, units: str) -> None:
    policy, params = POLICIES["taylorseer m=2"]
    _, free = _run(digits, policy, params, units=units)
    budget = int(free.peak_cache_bytes * 0.4)
    _, summary = _run(digits, policy, params, units=units, memory_budget=budget)
    assert summary.granularity == units and summary.memory_plan is not None and "block" not in summary.memory_plan
    assert 0 < summary.peak_cache_bytes <= budget


def test_policies_that_need_module_units_are_not_coarsened(digits: DigitsModel) -> None:
    policy, params = POLICIES["clusca"]
    _, free = _run(digits, policy, params)
    _, summary = _run(digits, policy, params, memory_budget=int(free.peak_cache_bytes * 0.3))
    assert summary.memory_plan is not None and "block" not in summary.memory_plan
    assert summary.peak_cache_bytes <= int(free.peak_cache_bytes * 0.3)


def test_the_plan_is_kept_per_input_shape(digits: DigitsModel) -> None:
    policy, params = POLICIES["taylorseer m=2"]
    _, free = _run(digits, policy, params)
    budget = int(free.peak_cache_bytes * 0.3)
    with sdk.compose(policy, **params, memory_budget=budget).apply(digits.transformer) as handle:
        first = sample(digits, DIGITS, SEEDS, steps=STEPS)
        plan = handle.summary().memory_plan
        again = sample(digits, DIGITS, SEEDS, steps=STEPS)  # the plan is in force from the first step
        assert handle.summary().memory_plan == plan and handle.summary().peak_cache_bytes <= budget
        sample(digits, [1], [0], steps=STEPS)  # half the batch: a plan of its own
        smaller = handle.summary()
    assert smaller.memory_plan != plan and smaller.peak_cache_bytes <= budget
    assert torch.equal(first, again) is False or plan is not None  # both ran under the budget
    assert torch.isfinite(first).all() and torch.isfinite(again).all()


def test_an_unmeetable_budget_fails_the_generation_and_leaves_nothing_behind(digits: DigitsModel) -> None:
    model, inputs = tiny_flux(), flux_inputs(batch=2)
    reference = run_loop(model, inputs, steps=6)
    with sdk.compose("taylorseer", interval=3, max_order=2, memory_budget=64).apply(model) as handle:
        for _ in range(2):  # each attempt fails the same way, at the start of its second step
            with pytest.raises(InvalidParameterError, match=r"memory_budget 64 B \(64 bytes\) cannot hold.*>= \d+"):
                run_loop(model, inputs, steps=6)
        assert handle.runtime.current is None
    assert torch.equal(run_loop(model, inputs, steps=6), reference)


# -- offload --------------------------------------------------------------------------------------------
def test_offloaded_ladders_are_prefetched_and_change_nothing(digits: DigitsModel) -> None:
    policy, params = POLICIES["taylorseer m=2"]
    kept, _ = _run(digits, policy, params, cache_dtype="fp8")
    moved, summary = _run(digits, policy, params, cache_dtype="fp8", offload="cpu")
    assert torch.equal(moved, kept)
    assert summary.prefetched > 0 and summary.fetched == 0  # every read was fetched ahead of use
    assert summary.offloaded_bytes == 0  # the offload device is the model's own: nothing left it


def _context(units: dict[str, tuple[int, ...]]) -> ContextState:
    ctx = ContextState("default")
    for i, (key, shape) in enumerate(units.items()):
        state = UnitState(key, ("",), 2, block=i)
        state.layout = ((shape, torch.float32, torch.device("cuda")),)
        ctx.units[key] = state
    return ctx


def test_an_accelerator_run_may_offload_and_pays_only_the_prefetch_window() -> None:
    shape = (1, 1024, 64)
    units = {f"blocks.{i}.attn": shape for i in range(32)}
    one = 3 * 4 * 1024 * 64  # a full float32 ladder of m = 2
    bf16_all = 32 * one // 2
    planner = MemoryPlanner(bf16_all - 1, 2, offload=torch.device("cpu"), prefetch_units=8)
    plan = planner.plan([_context(units)], {})
    assert plan.offloads and "bf16, offloaded" in plan.describe()
    assert plan.predicted_bytes <= bf16_all - 1
    on_cpu = MemoryPlanner(bf16_all - 1, 2)
    assert "offloaded" not in on_cpu.plan([_context(units)], {}).describe()
    assert {level.name for level in on_cpu.levels} == {
        level.name for level in LEVELS if not level.offload and not level.coarse
    }


# -- found in review: each of these failed before its fix ---------------------------------------------
def test_a_second_denoiser_is_planned_and_the_first_ones_ladders_are_freed() -> None:
    from tiny_pipelines import wan22_call, wan22_pipeline

    pipe = wan22_pipeline()
    params = {"interval": 3, "warmup": 1, "max_order": 1}
    with sdk.compose("taylorseer", **params).apply(pipe) as handle:
        wan22_call(pipe, steps=12)
        free = handle.summary().peak_cache_bytes
    budget = int(free * 0.6)
    with sdk.compose("taylorseer", **params, memory_budget=budget).apply(pipe) as handle:
        wan22_call(pipe, steps=12)
        summary = handle.summary()
        held = {key for ctx in handle.runtime.contexts.values() for key, unit in ctx.units.items() if unit.nbytes}
    assert 0 < summary.peak_cache_bytes <= summary.predicted_bytes <= budget  # was 98304 bytes against 58982
    assert held and all(key.startswith("transformer_2.") for key in held)  # the high-noise expert's are freed
    assert any(not u.key.startswith("transformer_2.") and u.computed for u in summary.units)  # still counted


def test_new_shapes_in_a_bare_loop_start_from_a_fresh_plan() -> None:
    model = tiny_flux()
    params = {"interval": 3, "warmup": 1, "max_order": 1}
    with sdk.compose("taylorseer", **params).apply(model) as handle:
        run_loop(model, flux_inputs(side=8), steps=4)
        budget = int(handle.runtime.peak_cache_bytes * 0.6)
    with sdk.compose("taylorseer", **params, memory_budget=budget).apply(model) as handle:
        run_loop(model, flux_inputs(side=4), steps=4)
        small = handle.runtime.peak_cache_bytes
        run_loop(model, flux_inputs(side=8), steps=4)  # a new generation by its noise level, at new shapes
        summary = handle.summary()  # used to raise: the old plan's formats held the new first anchors
    assert 0 < small < summary.peak_cache_bytes <= summary.predicted_bytes <= budget


def test_the_peak_is_the_current_generations_in_a_bare_loop() -> None:
    model = tiny_flux()
    with sdk.compose("taylorseer", interval=3, max_order=1).apply(model) as handle:
        run_loop(model, flux_inputs(side=8), steps=4)
        large = handle.summary().peak_cache_bytes
        run_loop(model, flux_inputs(side=4), steps=4)  # restarted by its noise level, no reset()
        small = handle.summary().peak_cache_bytes
    assert 0 < small < large


def test_a_device_without_fp8_plans_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from hicache_sdk.storage import StorageFormat

    def check_device(self: StorageFormat, device: torch.device) -> None:
        if self.scaled:
            raise InvalidParameterError(f"storage format {self.name!r} is not available on {device}")

    monkeypatch.setattr(StorageFormat, "check_device", check_device)
    planner = MemoryPlanner(10**9, 2, coarse=True, device=torch.device("cpu"))
    assert [level.name for level in planner.levels] == ["native", "bf16"]
    assert planner.provisional.format is not None and planner.provisional.format.name == "bf16"
