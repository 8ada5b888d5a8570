"""Ladders held in a storage format: :class:`CompactLadder` against the plain :class:`DifferenceLadder`.

The plain ladder is the reference semantics. A compact ladder in fp32 (the offload path, here on
CPU) must forecast like it up to float32 rounding; one in fp8 or bf16+fp8 must stay within an error
bound that follows the ladder's recurrence with the rounding of each stored order (see
:class:`ErrorBound`), and must really be less accurate than fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hicache_sdk.basis import Basis
from hicache_sdk.compact_ladder import CompactLadder, convert_ladder, make_ladder
from hicache_sdk.errors import InvalidParameterError
from hicache_sdk.ladder import DifferenceLadder
from hicache_sdk.registry import get_registry
from hicache_sdk.storage import LadderStorage, parse_format, parse_ladder_format

CPU = torch.device("cpu")
BASIS_NAMES = ("taylor", "hermite", "newton")
SHAPES = ((6,), (3, 5), (2, 3, 4))
#: unit roundoff of each storage dtype: 2^-p for p significant bits
UNIT = {
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
    torch.float8_e4m3fn: 2.0**-4,
    torch.float8_e5m2: 2.0**-3,
}
F32_SLOP = 2.0**-20  # a few float32 roundings per operation, generously


def basis(name: str) -> Basis:
    entry = get_registry().get("basis", name).obj
    return entry(sigma=0.5) if name == "hermite" else entry()


def storage(fmt: str | None, offload: torch.device | None = CPU) -> LadderStorage:
    return LadderStorage(None if fmt is None else parse_ladder_format(fmt), offload)


def feature(step: int, shape: tuple[int, ...], seed: int, kind: str = "random") -> torch.Tensor:
    """Float32 features: independent random values per step, or a smooth curve in the step."""
    generator = torch.Generator().manual_seed(seed * 1000 + (0 if kind == "smooth" else step))
    if kind == "smooth":
        phase = torch.rand(shape, generator=generator, dtype=torch.float64) * 6
        size = torch.exp2(torch.randint(-3, 4, (*shape[:-1], 1), generator=generator))
        return (torch.sin(0.2 * step + phase) * 3 * size.double()).float()
    return torch.randn(shape, generator=generator) * 3


def row_max(t: torch.Tensor) -> torch.Tensor:
    """Per-row (last dimension) largest magnitude, in float64, keeping the dimension."""
    return t.double().abs().amax(dim=-1, keepdim=True)


@st.composite
def schedules(draw: st.DrawFn, max_anchors: int = 7) -> list[tuple[int, bool]]:
    """Anchor steps with irregular spacing and the extend flag of each (False: a warm-up restart)."""
    step = draw(st.integers(-5, 20))
    gaps = draw(st.lists(st.integers(1, 4), min_size=0, max_size=max_anchors - 1))
    extends = draw(st.lists(st.sampled_from([True, True, True, False]), min_size=len(gaps), max_size=len(gaps)))
    anchors = [(step, True)]
    for gap, extend in zip(gaps, extends, strict=True):
        step += gap
        anchors.append((step, extend))
    return anchors


def forecast_budget(weights: tuple[float, ...], sizes: list[torch.Tensor], errors: list[torch.Tensor]) -> torch.Tensor:
    """Error of ``sum w_i D^i`` when each ``D^i`` is off by ``errors[i]``, plus the float32 sum's rounding."""
    stored = sum(abs(w) * e for w, e in zip(weights, errors, strict=False))
    rounding = (
        (len(weights) + 4) * 2.0**-24 * sum(abs(w) * (s + e) for w, s, e in zip(weights, sizes, errors, strict=False))
    )
    return stored + rounding  # type: ignore[return-value]


class ErrorBound:
    """Per-row bounds on how far each stored ``D^i`` of a ladder in ``fmt`` is from the exact (float64) one.

    Mirrors the update: ``c_0 = 0`` (the feature itself), the stored ``D^i`` is off by ``c_i`` plus its
    rounding ``u_i * max|computed D^i|`` (``u_i``: unit roundoff of the format of order ``i``; fp8
    rounds relative to the row's largest value), and ``c_{i+1} = (c_i + E_i^old) / h`` because the
    next difference uses the decoded old ``D^i``.
    """

    def __init__(self, max_order: int, units: list[float]) -> None:
        self.max_order, self.units = max_order, units
        self.errors: list[torch.Tensor] = []

    def anchor(self, exact: DifferenceLadder, grow: bool, spacing: float | None) -> None:
        sizes = [row_max(exact.term(i)) for i in range(exact.order + 1)]
        old = self.errors
        carried = torch.zeros_like(sizes[0])
        errors = []
        for i, size in enumerate(sizes):
            u = self.units[min(i, len(self.units) - 1)]
            errors.append(carried + (u + F32_SLOP) * (size + carried))
            if i + 1 < len(sizes):
                assert grow and spacing is not None
                carried = (carried + old[i]) / spacing * (1 + F32_SLOP) + F32_SLOP * sizes[i + 1]
        self.errors = errors


def units_of(fmt: str) -> list[float]:
    return [UNIT[f.dtype] for f in parse_ladder_format(fmt).formats]


def assert_same_bookkeeping(ladder: DifferenceLadder, reference: DifferenceLadder) -> None:
    assert (ladder.order, ladder.last_step, ladder.spacing) == (reference.order, reference.last_step, reference.spacing)


# -- make_ladder ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("chosen", "storage_dtype"),
    [
        (None, None),
        (LadderStorage(), None),
        (LadderStorage(parse_ladder_format("bf16")), torch.bfloat16),
        (LadderStorage(parse_ladder_format("fp32")), torch.float32),
        (LadderStorage(parse_ladder_format("fp16+float16")), torch.float16),
        (LadderStorage(parse_ladder_format(torch.bfloat16)), torch.bfloat16),
    ],
)
def test_make_ladder_keeps_the_plain_ladder_for_plain_storage(
    chosen: LadderStorage | None, storage_dtype: torch.dtype | None
) -> None:
    ladder = make_ladder(3, chosen)
    assert type(ladder) is DifferenceLadder
    assert (ladder.max_order, ladder.storage_dtype) == (3, storage_dtype)
    # and it computes bit for bit as the plain ladder always did
    reference = DifferenceLadder(3, storage_dtype)
    for step in (0, 1, 3, 4):
        x = feature(step, (3, 5), seed=1)
        ladder.update(x, step)
        reference.update(x, step)
    assert torch.equal(ladder.forecast(6, basis("taylor")), reference.forecast(6, basis("taylor")))


@pytest.mark.parametrize(
    "chosen",
    [
        storage("fp8", None),
        storage("bf16+fp8", None),
        storage("fp8_e5m2:tensor", None),
        storage("fp32+bf16", None),  # mixed plain formats
        storage(None, CPU),  # any offload
        storage("fp32", CPU),
        storage("bf16", CPU),
    ],
    ids=str,
)
def test_make_ladder_gives_a_compact_ladder_otherwise(chosen: LadderStorage) -> None:
    ladder = make_ladder(2, chosen)
    assert isinstance(ladder, CompactLadder)
    assert ladder.max_order == 2 and ladder.storage == chosen
    assert (ladder.order, ladder.last_step, ladder.spacing, ladder.nbytes) == (-1, None, None, 0)


# -- the same forecasts as the plain ladder ---------------------------------------------------------
def equivalence_tolerance(weights: tuple[float, ...], largest: float) -> float:
    # the plain ladder updates in place from the top order down, the compact one order by order: both
    # round in float32 (unit roundoff 2^-24) a few times per order, on values up to 2^i max|F| / h^i (h >= 1)
    return 8 * 2.0**-24 * largest * sum(abs(w) * 2.0**i for i, w in enumerate(weights))


@settings(max_examples=40, deadline=None)
@given(
    max_order=st.integers(0, 3),
    basis_name=st.sampled_from(BASIS_NAMES),
    anchors=schedules(),
    native=st.booleans(),
    shape=st.sampled_from(SHAPES),
    kind=st.sampled_from(["random", "smooth"]),
    seed=st.integers(0, 10_000),
)
def test_fp32_offloaded_ladder_forecasts_like_the_plain_ladder(
    max_order: int,
    basis_name: str,
    anchors: list[tuple[int, bool]],
    native: bool,
    shape: tuple[int, ...],
    kind: str,
    seed: int,
) -> None:
    b = basis(basis_name)
    compact = make_ladder(max_order, storage(None if native else "fp32", CPU))
    assert isinstance(compact, CompactLadder)
    plain = DifferenceLadder(max_order)
    largest = 0.0
    for step, extend in anchors:
        x = feature(step, shape, seed, kind)
        largest = max(largest, float(x.abs().max()))
        compact.update(x, step, extend=extend)
        plain.update(x, step, extend=extend)
        assert_same_bookkeeping(compact, plain)
        for i in range(plain.order + 1):
            torch.testing.assert_close(compact.term(i), plain.term(i), rtol=1e-5, atol=8 * 2.0**-24 * largest * 2.0**i)
        for offset in (1, 2, 5):
            weights = b.weights(offset, plain.order, plain.spacing or 1.0)
            expected = plain.forecast(step + offset, b)
            out = compact.forecast(step + offset, b)
            assert out.dtype == expected.dtype == torch.float32 and out.shape == shape
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=equivalence_tolerance(weights, largest))


def test_compact_ladder_grows_restarts_and_uses_the_real_spacing() -> None:
    # the documented recurrence on scalars (as in test_ladder.test_real_spacing_is_used), stored in fp32 offloaded
    ladder = make_ladder(2, storage("fp32"))
    ladder.update(torch.tensor([1.0]), 0)
    ladder.update(torch.tensor([7.0]), 3)  # D^1 = (7 - 1) / 3
    assert (ladder.order, ladder.spacing) == (1, 3.0) and ladder.term(1).item() == pytest.approx(2.0)
    ladder.update(torch.tensor([15.0]), 7)  # D^1 = 2, D^2 = 0
    assert [ladder.term(i).item() for i in range(3)] == pytest.approx([15.0, 2.0, 0.0])
    ladder.update(torch.tensor([27.0]), 10)  # D^1 = 4, D^2 = (4 - 2) / 3
    assert [ladder.term(i).item() for i in range(3)] == pytest.approx([27.0, 4.0, 2.0 / 3])
    ladder.update(torch.tensor([100.0]), 12, extend=False)
    assert (ladder.order, ladder.spacing, ladder.last_step) == (0, None, 12)
    assert ladder.forecast(13, basis("taylor")).item() == 100.0
    with pytest.raises(IndexError):
        ladder.term(1)
    ladder.update(torch.tensor([106.0]), 15)
    assert (ladder.order, ladder.spacing) == (1, 3.0) and ladder.term(1).item() == pytest.approx(2.0)


# -- low-precision formats --------------------------------------------------------------------------
LOW = ("fp8", "bf16+fp8", "fp8_e5m2", "bf16", "fp32+fp8")


@settings(max_examples=40, deadline=None)
@given(
    fmt=st.sampled_from(LOW),
    max_order=st.integers(0, 3),
    basis_name=st.sampled_from(BASIS_NAMES),
    anchors=schedules(),
    shape=st.sampled_from(SHAPES),
    kind=st.sampled_from(["random", "smooth"]),
    seed=st.integers(0, 10_000),
)
def test_low_precision_ladder_stays_within_the_format_error(
    fmt: str,
    max_order: int,
    basis_name: str,
    anchors: list[tuple[int, bool]],
    shape: tuple[int, ...],
    kind: str,
    seed: int,
) -> None:
    b = basis(basis_name)
    ladder = make_ladder(max_order, storage(fmt, None))
    exact = DifferenceLadder(max_order)  # float64 features: the exact ladder
    bound = ErrorBound(max_order, units_of(fmt))
    for step, extend in anchors:
        grow = extend and exact.order >= 0 and max_order > 0
        spacing = None if exact.last_step is None else float(step - exact.last_step)
        x = feature(step, shape, seed, kind)
        ladder.update(x, step, extend=extend)
        exact.update(x.double(), step, extend=extend)
        bound.anchor(exact, grow, spacing)
        assert_same_bookkeeping(ladder, exact)
        for i in range(exact.order + 1):
            error = (ladder.term(i).double() - exact.term(i)).abs()
            assert (error <= bound.errors[i]).all(), (i, float((error - bound.errors[i]).max()))
        sizes = [row_max(exact.term(i)) for i in range(exact.order + 1)]
        for offset in (1, 3):
            weights = b.weights(offset, exact.order, exact.spacing or 1.0)
            error = (ladder.forecast(step + offset, b).double() - exact.forecast(step + offset, b)).abs()
            allowed = forecast_budget(weights, sizes, bound.errors)
            assert (error <= allowed).all(), (offset, float((error - allowed).max()))


@pytest.mark.parametrize("fmt", ["fp8", "bf16+fp8", "fp8_e5m2"])
def test_low_precision_is_really_stored_less_accurately_than_fp32(fmt: str) -> None:
    b = basis("newton")
    shape = (16, 32)
    ladders = {name: make_ladder(2, storage(name, CPU)) for name in (fmt, "fp32")}
    exact = DifferenceLadder(2)
    for step in (0, 2, 3, 5):
        x = feature(step, shape, seed=7)
        exact.update(x.double(), step)
        for ladder in ladders.values():
            ladder.update(x, step)
    reference = exact.forecast(7, b)
    errors = {name: float((ladder.forecast(7, b).double() - reference).abs().max()) for name, ladder in ladders.items()}
    scale = float(reference.abs().max())
    assert errors["fp32"] < 1e-5 * scale
    assert errors[fmt] > 1e-3 * scale > errors["fp32"], errors  # fp8 rounds at 2^-4 or 2^-3: far above fp32


@pytest.mark.parametrize(("fmt", "max_order"), [("fp8", 1), ("fp8", 2), ("fp8_e5m2", 1), ("bf16+fp8", 3), ("bf16", 3)])
def test_low_precision_forecasts_of_smooth_features_stay_close(fmt: str, max_order: int) -> None:
    # relative L2 error of the forecast against the exact one: within what the format's rounding
    # allows (the L2 norm of the per-element bound of ErrorBound) and, for these usable
    # configurations, below 10%. Pure fp8 rounds D^0 to 2^-4 of each row, and the differences of
    # smooth features amplify that with the order, so it is checked up to order 2; bf16 + fp8
    # (D^0 in bf16) up to order 3.
    shape = (32, 64)
    compact, exact = make_ladder(max_order, storage(fmt, CPU)), DifferenceLadder(max_order)
    bound = ErrorBound(max_order, units_of(fmt))
    for step in range(0, 10, 2):
        x = feature(step, shape, seed=3, kind="smooth")
        compact.update(x, step)
        exact.update(x.double(), step)
        bound.anchor(exact, step > 0, 2.0)
    sizes = [row_max(exact.term(i)) for i in range(max_order + 1)]
    for name in BASIS_NAMES:
        for offset in (1, 2):
            expected = exact.forecast(8 + offset, basis(name))
            norm = torch.linalg.vector_norm(expected)
            relative = float(torch.linalg.vector_norm(compact.forecast(8 + offset, basis(name)) - expected) / norm)
            weights = basis(name).weights(offset, max_order, 2.0)
            budget = forecast_budget(weights, sizes, bound.errors).expand(shape)
            allowed = float(torch.linalg.vector_norm(budget) / norm)
            assert 0 < relative <= allowed, (name, offset, relative, allowed)
            assert relative < 0.1, (name, offset, relative)


# -- bytes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["fp8", "bf16+fp8", "fp8_e5m2:tensor", "fp32", "bf16", None])
def test_nbytes_of_a_full_ladder_is_that_of_its_format(fmt: str | None) -> None:
    shape, m = (2, 3, 8), 3
    chosen = storage(fmt, CPU)
    ladder = make_ladder(m, chosen)
    assert ladder.nbytes == 0
    for step in range(m + 1):
        ladder.update(feature(step, shape, seed=2), step)
        if step == 0:
            assert ladder.nbytes == chosen.nbytes(shape, torch.float32, 0)  # orders are held as they are made
    assert ladder.order == m
    assert ladder.nbytes == chosen.nbytes(shape, torch.float32, m)
    if chosen.format is not None:
        assert ladder.nbytes == chosen.format.nbytes(shape, m)
    ladder.update(feature(9, shape, seed=2), 9, extend=False)
    assert ladder.nbytes == chosen.nbytes(shape, torch.float32, m)  # a restart keeps the memory
    ladder.reset()
    assert ladder.nbytes == 0


def test_fp8_ladder_takes_a_quarter_of_fp32_plus_its_scales() -> None:
    shape, m = (4, 16, 64), 2
    fp8, fp32 = make_ladder(m, storage("fp8", None)), make_ladder(m, storage("fp32", CPU))
    for step in range(m + 1):
        for ladder in (fp8, fp32):
            ladder.update(feature(step, shape, seed=4), step)
    rows = 4 * 16
    assert fp32.nbytes == 4 * math.prod(shape) * (m + 1)
    assert fp8.nbytes == fp32.nbytes // 4 + 4 * rows * (m + 1)


# -- term and set_term ------------------------------------------------------------------------------
def filled(ladder: DifferenceLadder, shape: tuple[int, ...] = (3, 5), steps: tuple[int, ...] = (0, 1, 3)) -> None:
    for step in steps:
        ladder.update(feature(step, shape, seed=11), step)


@pytest.mark.parametrize("fmt", ["fp8", "bf16+fp8", "fp32", "fp8_e5m2:tensor"])
def test_compact_term_is_a_decoded_copy_and_set_term_writes_back(fmt: str) -> None:
    ladder = make_ladder(2, storage(fmt, CPU))
    filled(ladder)
    b = basis("taylor")
    before = [ladder.term(i) for i in range(3)]
    forecast = ladder.forecast(4, b)
    copy = ladder.term(1)
    assert copy.dtype == torch.float32 and copy.shape == (3, 5)
    copy.fill_(1e3)  # editing the copy changes nothing stored
    assert torch.equal(ladder.term(1), before[1]) and torch.equal(ladder.forecast(4, b), forecast)
    value = feature(20, (3, 5), seed=12)
    ladder.set_term(1, value)
    held = parse_ladder_format(fmt).of(1)
    error = (ladder.term(1).double() - value.double()).abs()
    assert (error <= (UNIT[held.dtype] + F32_SLOP) * (row_max(value) if held.scaled else value.double().abs())).all()
    if held.dtype == torch.float32:
        assert torch.equal(ladder.term(1), value)
    assert torch.equal(ladder.term(0), before[0]) and torch.equal(ladder.term(2), before[2])
    # the forecast uses the new term: sum_i w_i D^i of the terms held now
    weights = b.weights(1, 2, ladder.spacing or 1.0)
    expected = sum(w * ladder.term(i).double() for i, w in enumerate(weights))
    torch.testing.assert_close(ladder.forecast(4, b).double(), expected, rtol=1e-6, atol=1e-6)  # type: ignore[arg-type]


def test_plain_term_is_a_view_and_set_term_of_it_keeps_the_edit() -> None:
    ladder = DifferenceLadder(2)
    filled(ladder)
    view = ladder.term(0)
    view[1, 2] = 42.0
    ladder.set_term(0, view)  # the view itself: nothing to copy, the edit stays
    assert ladder.term(0)[1, 2].item() == 42.0 and ladder.term(0).data_ptr() == view.data_ptr()
    other = torch.full((3, 5), -1.5)
    ladder.set_term(0, other)  # another tensor: copied in
    other.fill_(9.0)
    assert torch.equal(ladder.term(0), torch.full((3, 5), -1.5))
    assert ladder.term(0).data_ptr() == view.data_ptr()
    assert ladder.forecast(4, basis("taylor")).shape == (3, 5)
    half = torch.full((3, 5), 0.25, dtype=torch.float64)
    ladder.set_term(2, half)  # another dtype: converted into the storage
    assert torch.equal(ladder.term(2), torch.full((3, 5), 0.25))


@pytest.mark.parametrize("factory", [lambda: DifferenceLadder(2), lambda: make_ladder(2, storage("fp8", CPU))])
def test_terms_beyond_the_held_orders_are_refused(factory: Callable[[], DifferenceLadder]) -> None:
    ladder = factory()
    with pytest.raises(IndexError):
        ladder.term(0)
    with pytest.raises(IndexError):
        ladder.set_term(0, torch.zeros(3, 5))
    ladder.update(torch.ones(3, 5), 0)
    for i in (1, -1):
        with pytest.raises(IndexError, match=r"ladder holds orders 0\.\.0"):
            ladder.term(i)
        with pytest.raises(IndexError):
            ladder.set_term(i, torch.zeros(3, 5))


def test_set_term_after_a_restart_refuses_orders_no_longer_held() -> None:
    plain, compact = DifferenceLadder(2), make_ladder(2, storage("fp8", CPU))
    for ladder in (plain, compact):
        filled(ladder)
        ladder.update(torch.ones(3, 5), 9, extend=False)
        assert ladder.order == 0
        with pytest.raises(IndexError):
            ladder.term(1)
    with pytest.raises(IndexError):
        plain.set_term(1, torch.zeros(3, 5))
    with pytest.raises(IndexError):
        compact.set_term(1, torch.zeros(3, 5))


# -- samples anchored apart -------------------------------------------------------------------------
@st.composite
def row_schedules(draw: st.DrawFn, batch: int = 4) -> list[tuple[int, list[int] | None, bool]]:
    """A full first anchor, then anchors of some samples (or all: None), each with its extend flag."""
    step = draw(st.integers(0, 5))
    plan: list[tuple[int, list[int] | None, bool]] = [(step, None, True)]
    subsets = st.one_of(st.none(), st.lists(st.integers(0, batch - 1), min_size=1, max_size=batch, unique=True))
    for _ in range(draw(st.integers(1, 6))):
        step += draw(st.integers(1, 3))
        plan.append((step, draw(subsets), draw(st.sampled_from([True, True, True, False]))))
    return plan


def row_update(ladder: DifferenceLadder, x: torch.Tensor, step: int, rows: list[int] | None, extend: bool) -> None:
    if rows is None:
        ladder.update(x, step, extend=extend)
    else:
        ladder.update(x[torch.tensor(rows)], step, extend=extend, rows=torch.tensor(rows))


@settings(max_examples=30, deadline=None)
@given(
    plan=row_schedules(),
    max_order=st.integers(0, 3),
    basis_name=st.sampled_from(BASIS_NAMES),
    seed=st.integers(0, 1000),
)
def test_per_sample_anchors_forecast_like_the_plain_ladder(
    plan: list[tuple[int, list[int] | None, bool]], max_order: int, basis_name: str, seed: int
) -> None:
    b = basis(basis_name)
    shape = (4, 3, 5)
    compact, plain = make_ladder(max_order, storage("fp32", CPU)), DifferenceLadder(max_order)
    largest = 0.0
    for step, rows, extend in plan:
        x = feature(step, shape, seed)
        largest = max(largest, float(x.abs().max()))
        for ladder in (compact, plain):
            row_update(ladder, x, step, rows, extend)
        assert_same_bookkeeping(compact, plain)
        last = plain.last_step
        assert last is not None
        for offset in (1, 3):
            expected = plain.forecast(last + offset, b)
            weights = b.weights(last + offset - plan[0][0], max_order, 1.0)  # the largest weights any row may get
            torch.testing.assert_close(
                compact.forecast(last + offset, b), expected, rtol=1e-5, atol=equivalence_tolerance(weights, largest)
            )


def test_per_sample_anchors_move_only_their_rows() -> None:
    b = basis("newton")
    compact, plain = make_ladder(1, storage("fp32", CPU)), DifferenceLadder(1)
    x0, x2 = torch.zeros(3, 4), torch.arange(12.0).reshape(3, 4)
    for ladder in (compact, plain):
        ladder.update(x0, 0)
        ladder.update(x2[torch.tensor([1])], 2, rows=torch.tensor([1]))
        assert (ladder.order, ladder.last_step) == (0, 2)  # samples 0 and 2 hold one anchor, sample 1 two
        out = ladder.forecast(4, b)
        assert torch.equal(out[0], torch.zeros(4)) and torch.equal(out[2], torch.zeros(4))
        # sample 1: D^1 = (x2 - 0) / 2, forecast 2 steps ahead: x2 + 2 * D^1
        assert torch.allclose(out[1], 2 * x2[1])
        ladder.update(x2, 4)  # every sample again: shared bookkeeping (sample 1 by 2 steps, the others by 4)
        assert (ladder.order, ladder.last_step) == (1, 4)


@pytest.mark.parametrize("factory", [lambda: DifferenceLadder(2), lambda: make_ladder(2, storage("fp32", CPU))])
def test_the_first_anchor_must_hold_every_sample(factory: Callable[[], DifferenceLadder]) -> None:
    ladder = factory()
    with pytest.raises(RuntimeError, match="first anchor must hold every sample"):
        ladder.update(torch.zeros(1, 5), 0, rows=torch.tensor([0]))
    assert ladder.order == -1
    ladder.update(torch.zeros(2, 5), 0)  # then a full anchor works
    assert ladder.order == 0


# -- conversion -------------------------------------------------------------------------------------
def test_convert_a_filled_ladder_to_fp8_and_back() -> None:
    shape = (6, 8)
    plain = DifferenceLadder(2)
    for step in (0, 2, 3, 7):
        plain.update(feature(step, shape, seed=21, kind="smooth"), step)
    compact = convert_ladder(plain, 2, storage("fp8", None))
    assert isinstance(compact, CompactLadder)
    assert_same_bookkeeping(compact, plain)
    assert compact.nbytes == parse_ladder_format("fp8").nbytes(shape, 2)
    # each order re-encoded once: off by at most 2^-4 of its row's largest value
    errors = [(2.0**-4 + F32_SLOP) * row_max(plain.term(i)) for i in range(3)]
    for i in range(3):
        assert ((compact.term(i).double() - plain.term(i).double()).abs() <= errors[i]).all()
    sizes = [row_max(plain.term(i)) for i in range(3)]
    for name in BASIS_NAMES:
        for offset in (1, 4):
            weights = basis(name).weights(offset, 2, plain.spacing or 1.0)
            error = (compact.forecast(7 + offset, basis(name)).double() - plain.forecast(7 + offset, basis(name))).abs()
            assert (error <= forecast_budget(weights, sizes, errors)).all()
    back = convert_ladder(compact, 2, None)
    assert type(back) is DifferenceLadder and back.storage_dtype is None
    assert_same_bookkeeping(back, plain)
    for i in range(3):
        assert torch.equal(back.term(i), compact.term(i))  # the decoded values, held as they are
    for name in BASIS_NAMES:
        torch.testing.assert_close(back.forecast(9, basis(name)), compact.forecast(9, basis(name)))
    # both go on from there alike
    for ladder in (back, compact, plain):
        ladder.update(feature(8, shape, seed=21, kind="smooth"), 8)
        assert (ladder.order, ladder.last_step, ladder.spacing) == (2, 8, 1.0)


@pytest.mark.parametrize("target", [None, storage("fp8", None), storage("fp32", CPU), storage("bf16", None)], ids=str)
@pytest.mark.parametrize("source", [None, storage("fp8", None)], ids=str)
def test_convert_an_empty_ladder_gives_an_empty_one(source: LadderStorage | None, target: LadderStorage | None) -> None:
    empty = make_ladder(2, source)
    converted = convert_ladder(empty, 2, target)
    assert type(converted) is type(make_ladder(2, target))
    assert (converted.order, converted.last_step, converted.spacing, converted.nbytes) == (-1, None, None, 0)
    with pytest.raises(RuntimeError, match="empty ladder"):
        converted.forecast(1, basis("taylor"))
    converted.update(torch.ones(2, 3), 0)  # and it fills like a fresh one
    assert converted.forecast(1, basis("taylor")).tolist() == [[1.0] * 3] * 2


@pytest.mark.parametrize("target", [storage("fp32", CPU), None, storage(None, CPU)], ids=str)
def test_convert_keeps_the_anchors_of_samples_anchored_apart(target: LadderStorage | None) -> None:
    b = basis("hermite")
    shape = (4, 3, 5)
    plain = DifferenceLadder(2)
    plain.update(feature(0, shape, seed=5), 0)
    plain.update(feature(1, shape, seed=5), 1)
    plain.update(feature(3, shape, seed=5)[torch.tensor([0, 2])], 3, rows=torch.tensor([0, 2]))
    plain.update(feature(4, shape, seed=5)[torch.tensor([2])], 4, rows=torch.tensor([2]))
    assert (plain.order, plain.last_step) == (1, 4)  # rows 1, 3: order 1 at step 1; row 0: 2 at 3; row 2: 2 at 4
    converted = convert_ladder(plain, 2, target)
    assert type(converted) is type(make_ladder(2, target))
    assert_same_bookkeeping(converted, plain)
    for step in (5, 7):
        torch.testing.assert_close(converted.forecast(step, b), plain.forecast(step, b), rtol=1e-6, atol=1e-6)
    for step, rows in ((6, [1, 3]), (8, None)):  # and both go on alike
        x = feature(step, shape, seed=5)
        for ladder in (plain, converted):
            row_update(ladder, x, step, rows, True)
        assert_same_bookkeeping(converted, plain)
        torch.testing.assert_close(converted.forecast(step + 1, b), plain.forecast(step + 1, b), rtol=1e-5, atol=1e-4)
    again = convert_ladder(convert_ladder(plain, 2, storage("fp32", CPU)), 2, None)  # compact with rows -> plain
    torch.testing.assert_close(again.forecast(10, b), plain.forecast(10, b), rtol=1e-6, atol=1e-6)


def test_convert_a_compact_ladder_with_rows_anchored_apart() -> None:
    b = basis("taylor")
    shape = (3, 4)
    compact = make_ladder(1, storage("fp32", CPU))
    compact.update(feature(0, shape, seed=8), 0)
    compact.update(feature(2, shape, seed=8)[torch.tensor([1])], 2, rows=torch.tensor([1]))
    plain = convert_ladder(compact, 1, None)
    assert type(plain) is DifferenceLadder
    assert_same_bookkeeping(plain, compact)
    torch.testing.assert_close(plain.forecast(3, b), compact.forecast(3, b), rtol=1e-6, atol=1e-6)


# -- offload bookkeeping (on CPU the offload device is the compute device) ---------------------------
def test_offload_to_the_same_device_counts_bytes_and_reads() -> None:
    b = basis("taylor")
    shape = (3, 5)
    ladder = make_ladder(2, storage("fp8", CPU))
    twin = make_ladder(2, storage("fp8", CPU))  # never prefetched
    assert isinstance(ladder, CompactLadder) and isinstance(twin, CompactLadder)
    ladder.prefetch()  # nothing held yet: a no-op
    assert (ladder.prefetched, ladder.fetched, ladder.device_nbytes) == (0, 0, 0)
    for step in (0, 1):
        for each in (ladder, twin):
            each.update(feature(step, shape, seed=9), step)
    assert not ladder.offloaded  # the offload device is the features' device
    assert ladder.device_nbytes == ladder.nbytes > 0
    # reads without a prefetch copy on demand: the second update read the old terms
    assert (ladder.prefetched, ladder.fetched) == (0, 1)
    assert torch.equal(ladder.forecast(2, b), twin.forecast(2, b))
    assert (ladder.prefetched, ladder.fetched) == (0, 2)
    ladder.prefetch()
    ladder.prefetch()  # already staged: a no-op
    assert ladder.device_nbytes == 2 * ladder.nbytes  # the stored terms and the staged copies
    assert torch.equal(ladder.forecast(2, b), twin.forecast(2, b))  # a prefetch does not change results
    assert (ladder.prefetched, ladder.fetched) == (1, 2)
    assert ladder.device_nbytes == ladder.nbytes  # the staged copies were taken
    ladder.prefetch()
    for each in (ladder, twin):
        each.update(feature(3, shape, seed=9), 3)  # an update takes a prefetch too
    assert (ladder.prefetched, ladder.fetched) == (2, 2)
    assert torch.equal(ladder.forecast(5, b), twin.forecast(5, b))
    assert [torch.equal(ladder.term(i), twin.term(i)) for i in range(3)] == [True] * 3
    ladder.prefetch()
    for each in (ladder, twin):
        each.update(feature(4, shape, seed=9), 4, extend=False)  # a restart reads nothing: the staging is dropped
    assert ladder.device_nbytes == ladder.nbytes
    assert torch.equal(ladder.forecast(5, b), twin.forecast(5, b))


def test_ladders_without_offload_never_fetch() -> None:
    for ladder in (make_ladder(1, storage("fp8", None)), DifferenceLadder(1)):
        filled(ladder, steps=(0, 1))
        ladder.prefetch()  # a no-op
        assert ladder.device_nbytes == ladder.nbytes > 0
        ladder.forecast(2, basis("taylor"))
        assert (getattr(ladder, "prefetched", 0), getattr(ladder, "fetched", 0)) == (0, 0)


def test_set_term_after_a_prefetch_is_seen_by_the_next_forecast() -> None:
    b = basis("taylor")
    ladder, plain = make_ladder(1, storage("fp32", CPU)), DifferenceLadder(1)
    for each in (ladder, plain):
        filled(each, steps=(0, 1))
    ladder.prefetch()
    value = torch.full((3, 5), 7.0)
    ladder.set_term(0, value)
    plain.set_term(0, value)
    assert torch.equal(ladder.forecast(2, b), plain.forecast(2, b))


# -- reset and errors -------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["fp8", "bf16+fp8", "fp32", None])
def test_reset_then_refill_forecasts_bit_for_bit_like_a_fresh_ladder(fmt: str | None) -> None:
    b = basis("hermite")
    used, fresh = make_ladder(2, storage(fmt, CPU)), make_ladder(2, storage(fmt, CPU))
    for step in (0, 1, 2, 5):
        used.update(feature(step, (3, 5), seed=31), step)
    used.prefetch()
    used.reset()
    assert (used.order, used.last_step, used.spacing, used.nbytes, used.device_nbytes) == (-1, None, None, 0, 0)
    with pytest.raises(RuntimeError, match="empty ladder"):
        used.forecast(1, b)
    for step in (-3, 0, 4):  # other steps, another shape
        x = feature(step, (2, 7), seed=32)
        used.update(x, step)
        fresh.update(x, step)
    assert_same_bookkeeping(used, fresh)
    assert used.nbytes == fresh.nbytes
    for step in (5, 8):
        assert torch.equal(used.forecast(step, b), fresh.forecast(step, b))


LADDERS: dict[str, Callable[[], DifferenceLadder]] = {
    "plain": lambda: DifferenceLadder(2),
    "fp8": lambda: make_ladder(2, storage("fp8", None)),
    "fp32-offload": lambda: make_ladder(2, storage("fp32", CPU)),
    "bf16+fp8-offload": lambda: make_ladder(2, storage("bf16+fp8", CPU)),
    "native-offload": lambda: make_ladder(2, storage(None, CPU)),
}


def outcome(action: Callable[[], object]) -> tuple[type[BaseException], str] | None:
    try:
        action()
    except Exception as error:
        return type(error), str(error)
    return None


@pytest.mark.parametrize("name", [n for n in LADDERS if n != "plain"])
def test_errors_are_those_of_the_plain_ladder(name: str) -> None:
    b = basis("taylor")

    def scenario(make: Callable[[], DifferenceLadder]) -> list[object]:
        ladder = make()
        seen: list[object] = [outcome(lambda: ladder.forecast(1, b))]  # empty
        ladder.update(torch.ones(2, 3), 4)
        before = ladder.forecast(5, b)
        seen.append(outcome(lambda: ladder.update(torch.ones(2, 3), 4)))  # step not increasing
        seen.append(outcome(lambda: ladder.update(torch.ones(2, 3), 3)))
        seen.append(outcome(lambda: ladder.update(torch.ones(3, 2), 5)))  # shape changed
        seen.append(outcome(lambda: ladder.forecast(4, b)))  # not after the newest anchor
        seen.append((ladder.order, ladder.last_step, torch.equal(ladder.forecast(5, b), before)))  # nothing changed
        ladder.reset()
        seen.append(outcome(lambda: ladder.forecast(1, b)))
        ladder.update(torch.ones(3, 2), 0)  # another shape after a reset
        seen.append(ladder.order)
        return seen

    expected = scenario(LADDERS["plain"])
    kinds = [item[0] if isinstance(item, tuple) and isinstance(item[0], type) else item for item in expected]
    assert kinds == [
        RuntimeError,  # forecast from an empty ladder
        InvalidParameterError,  # the same step again
        InvalidParameterError,  # an earlier step
        InvalidParameterError,  # another shape without a reset
        InvalidParameterError,  # a forecast at the newest anchor's step
        (0, 4, True),  # the failed calls changed nothing
        RuntimeError,  # empty again after a reset
        0,  # which allows another shape
    ]
    assert scenario(LADDERS[name]) == expected  # same types, same messages


def test_native_offloaded_storage_holds_float64_features_like_the_plain_ladder() -> None:
    compact, plain = make_ladder(1, storage(None, CPU)), DifferenceLadder(1)
    for step in (0, 1):
        x = feature(step, (3, 5), seed=6).double()
        compact.update(x, step)
        plain.update(x, step)
    assert torch.equal(compact.forecast(2, basis("taylor")), plain.forecast(2, basis("taylor")))


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
def test_compact_max_order_validated(bad: object) -> None:
    with pytest.raises(InvalidParameterError, match="max_order"):
        CompactLadder(bad, storage("fp8", None))  # type: ignore[arg-type]


def test_bf16_features_come_back_in_bf16() -> None:
    ladder = make_ladder(1, storage("fp8", None))
    for step in (0, 1):
        ladder.update(feature(step, (3, 5), seed=1).bfloat16(), step)
    assert ladder.forecast(2, basis("taylor")).dtype == torch.bfloat16
    assert ladder.term(0).dtype == torch.bfloat16
    assert parse_format("fp8").dtype == torch.float8_e4m3fn


def test_converting_bf16_ladders_anchored_apart_keeps_bf16() -> None:
    ladder = DifferenceLadder(2)
    features = [torch.randn(3, 5, 4).to(torch.bfloat16) for _ in range(3)]
    ladder.update(features[0], 0)
    ladder.update(features[1][:1], 2, rows=torch.tensor([0]))  # sample 0 anchored apart
    back = convert_ladder(convert_ladder(ladder, 2, storage("fp8", CPU)), 2, None)
    assert back._terms is not None and back._terms.dtype == torch.bfloat16
    assert back.nbytes == ladder.nbytes
