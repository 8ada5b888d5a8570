"""The basis contract: what every forecaster basis must satisfy, as plain checking functions.

Every ``check_*`` function raises :class:`AssertionError` with a message naming the basis, the rule
and the arguments that broke it, and returns ``None`` otherwise. They do not depend on pytest;
only :func:`check_basis_properties` needs hypothesis (imported when it runs).

The rules (see the docs page "The math of each basis", section "The contract"):

1. identity: a :class:`~hicache_sdk.Basis` with an identifier ``name``, hashable, frozen, equal to
   the basis rebuilt from its own :meth:`~hicache_sdk.Basis.parameters`;
2. weights: ``weights(k, m, h)`` has ``m + 1`` finite floats for orders ``0..6``, offsets ``1..50``
   and spacings ``1..10``, and the same ones on every call;
3. invalid arguments (``k <= 0``, ``m < 0`` or not an integer, ``h <= 0``, non-finite) raise
   :class:`~hicache_sdk.InvalidParameterError` naming the argument;
4. a forecast from a :class:`~hicache_sdk.ladder.DifferenceLadder` keeps the feature's shape,
   dtype and device;
5. finite in, finite out: ladders of moderate random values stored in float32, bfloat16 or
   float16 forecast finite values at every order and offset above;
6. linear in the ladder: the forecast of ``a X + b Y`` equals ``a F(X) + b F(Y)`` when the three
   ladders saw the same anchor steps;
7. reset equals fresh: a ladder reset and refilled forecasts bit for bit like a new one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch

from ..basis import MAX_SUPPORTED_ORDER, Basis
from ..errors import InvalidParameterError
from ..ladder import DifferenceLadder

__all__ = [
    "OFFSETS",
    "ORDERS",
    "SPACINGS",
    "STORAGE_DTYPES",
    "BasisContract",
    "check_basis_contract",
    "check_basis_identity",
    "check_basis_properties",
    "check_finite_forecasts",
    "check_forecast_layout",
    "check_invalid_arguments_rejected",
    "check_linear_in_ladder",
    "check_reset_equals_fresh",
    "check_weights",
]

#: Orders, offsets and anchor spacings the contract covers.
ORDERS: Sequence[int] = range(MAX_SUPPORTED_ORDER + 1)
OFFSETS: Sequence[int] = range(1, 51)
SPACINGS: Sequence[int] = range(1, 11)
#: Ladder storage dtypes that must give finite forecasts.
STORAGE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

_SHAPE = (2, 3, 5)
_MAGNITUDE = 4.0  # random features are uniform in [-_MAGNITUDE, _MAGNITUDE]
_LINEAR_RTOL = 1e-9  # float64 ladders: rounding is ~1e-14 of the bound used below
DeviceLike = str | torch.device


def _require(condition: bool, message: str) -> None:
    # not `assert`: the contract must also hold under `python -O`
    if not condition:
        raise AssertionError(message)


def _devices(devices: Iterable[DeviceLike] | None) -> list[torch.device]:
    if devices is not None:
        return [torch.device(d) for d in devices]
    found = [torch.device("cpu")]
    if torch.cuda.is_available():
        found.append(torch.device("cuda"))
    return found


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _anchor_steps(gaps: Sequence[int]) -> list[int]:
    """Increasing anchor steps, the first at step 0, separated by ``gaps``."""
    steps = [0]
    for gap in gaps:
        steps.append(steps[-1] + int(gap))
    return steps


def _random_gaps(count: int, generator: torch.Generator, largest: int = 10) -> list[int]:
    return [int(g) for g in torch.randint(1, largest + 1, (count,), generator=generator)]


def _random_features(count: int, generator: torch.Generator, shape: Sequence[int] = _SHAPE) -> list[torch.Tensor]:
    """``count`` float64 tensors, uniform in ``[-_MAGNITUDE, _MAGNITUDE]``."""
    return [
        (torch.rand(tuple(shape), generator=generator, dtype=torch.float64) * 2 - 1) * _MAGNITUDE for _ in range(count)
    ]


def _fill(
    max_order: int,
    features: Sequence[torch.Tensor],
    steps: Sequence[int],
    *,
    storage_dtype: torch.dtype | None = None,
    warmup: int = 0,
    ladder: DifferenceLadder | None = None,
) -> DifferenceLadder:
    """A ladder fed ``features`` at ``steps``; the first ``warmup`` anchors restart it (``extend=False``)."""
    ladder = DifferenceLadder(max_order, storage_dtype) if ladder is None else ladder
    for i, (feature, step) in enumerate(zip(features, steps, strict=True)):
        ladder.update(feature, step, extend=i >= warmup)
    return ladder


def _forecast(ladder: DifferenceLadder, step: int, basis: Basis, what: str) -> torch.Tensor:
    """``ladder.forecast(step, basis)``, any exception turned into an AssertionError saying ``what``."""
    try:
        return ladder.forecast(step, basis)
    except Exception as exc:
        raise AssertionError(f"{what}: the forecast raised {exc!r}") from exc


def _ladder_bound(ladder: DifferenceLadder, weights: Sequence[float]) -> float:
    """``sum_i |w_i| max|D^i|``: the size of the terms a forecast adds up."""
    return sum(abs(w) * float(ladder.term(i).double().abs().max()) for i, w in enumerate(weights))


# -- 1. identity ---------------------------------------------------------------------------------
def check_basis_identity(basis: Basis) -> None:
    """The basis is a frozen, hashable :class:`Basis` with an identifier name, rebuilt from its parameters."""
    _require(isinstance(basis, Basis), f"{basis!r} is not an instance of hicache_sdk.Basis")
    name = getattr(type(basis), "name", None)
    _require(
        isinstance(name, str) and name.isidentifier(),
        f"{type(basis).__qualname__}.name must be a Python identifier (the registry key), got {name!r}",
    )
    try:
        hash(basis)
    except TypeError as exc:
        raise AssertionError(f"basis {basis.tag} is not hashable: {exc}") from exc
    params = basis.parameters()
    try:
        rebuilt = type(basis)(**params)
    except Exception as exc:
        raise AssertionError(
            f"{type(basis).__qualname__}(**{params!r}) raised {exc!r}: parameters() must rebuild the basis"
        ) from exc
    _require(
        rebuilt == basis and hash(rebuilt) == hash(basis),
        f"{type(basis).__qualname__}(**{params!r}) is not equal to {basis.tag}: compose() builds bases from their "
        "parameters, so a basis must be determined by them",
    )
    _require(basis.tag.startswith(basis.name), f"tag {basis.tag!r} does not start with the name {basis.name!r}")
    for field in params:
        try:
            setattr(basis, field, params[field])
        except AttributeError:
            continue
        raise AssertionError(f"basis {basis.tag} let its parameter {field!r} be set: bases must be frozen")


# -- 2. weights ----------------------------------------------------------------------------------
def check_weights(
    basis: Basis,
    *,
    orders: Iterable[int] = ORDERS,
    offsets: Iterable[float] = OFFSETS,
    spacings: Iterable[float] = SPACINGS,
) -> None:
    """``weights(k, m, h)`` has ``m + 1`` finite floats, the same on every call, over the whole grid."""
    offsets, spacings = list(offsets), list(spacings)
    for order in orders:
        for offset in offsets:
            for spacing in spacings:
                _check_one_weights(basis, offset, order, spacing)


def _check_one_weights(basis: Basis, offset: float, order: int, spacing: float) -> tuple[float, ...]:
    call = f"{basis.tag}.weights(offset={offset!r}, order={order!r}, spacing={spacing!r})"
    try:
        weights = basis.weights(offset, order, spacing)
    except Exception as exc:
        raise AssertionError(f"{call} raised {exc!r}") from exc
    _require(
        len(weights) == order + 1,
        f"{call} returned {len(weights)} weights, expected order + 1 = {order + 1}",
    )
    _require(
        all(isinstance(w, float) and math.isfinite(w) for w in weights),
        f"{call} returned {weights!r}, expected finite floats",
    )
    again = basis.weights(offset, order, spacing)
    _require(tuple(again) == tuple(weights), f"{call} returned {weights!r}, then {again!r}: weights must be pure")
    return tuple(weights)


# -- 3. invalid arguments ------------------------------------------------------------------------
_INVALID_ARGUMENTS: tuple[tuple[Any, Any, Any, str], ...] = (
    (0, 1, 1.0, "offset"),
    (-2.0, 1, 1.0, "offset"),
    (math.nan, 1, 1.0, "offset"),
    (math.inf, 1, 1.0, "offset"),
    (1, -1, 1.0, "order"),
    (1, 1.5, 1.0, "order"),
    (1, "2", 1.0, "order"),
    (1, 1, 0.0, "spacing"),
    (1, 1, -1.0, "spacing"),
    (1, 1, math.nan, "spacing"),
)


def check_invalid_arguments_rejected(basis: Basis) -> None:
    """Offsets ``<= 0``, negative or non-integer orders, spacings ``<= 0`` and non-finite values raise
    :class:`InvalidParameterError` naming the argument."""
    for offset, order, spacing, argument in _INVALID_ARGUMENTS:
        call = f"{basis.tag}.weights(offset={offset!r}, order={order!r}, spacing={spacing!r})"
        try:
            basis.weights(offset, order, spacing)
        except InvalidParameterError as exc:
            _require(argument in str(exc), f"{call} raised {exc!r}, which does not name {argument!r}")
            continue
        except Exception as exc:
            raise AssertionError(f"{call} raised {exc!r}, expected InvalidParameterError") from exc
        raise AssertionError(f"{call} returned weights, expected InvalidParameterError for {argument}")


# -- 4. shape, dtype, device ---------------------------------------------------------------------
def check_forecast_layout(basis: Basis, *, devices: Iterable[DeviceLike] | None = None, seed: int = 0) -> None:
    """A ladder forecast has the feature's shape, dtype and device (for float32/64, bfloat16, float16
    features, stored as such or in bfloat16), and the same values when asked twice."""
    generator = _generator(seed)
    for device in _devices(devices):
        for feature_dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            for storage_dtype in (None, torch.bfloat16):
                for order in sorted({0, 1, 2, MAX_SUPPORTED_ORDER}):
                    features = [f.to(device, feature_dtype) for f in _random_features(order + 1, generator)]
                    steps = _anchor_steps(_random_gaps(order, generator))
                    ladder = _fill(order, features, steps, storage_dtype=storage_dtype)
                    for offset in (1, 2, 5):
                        what = (
                            f"{basis.tag}: forecast at offset {offset}, order {order}, {feature_dtype} features "
                            f"stored as {storage_dtype or feature_dtype} on {device}"
                        )
                        out = _forecast(ladder, steps[-1] + offset, basis, what)
                        _require(
                            out.shape == features[0].shape,
                            f"{what}: shape {tuple(out.shape)}, expected {tuple(features[0].shape)}",
                        )
                        _require(out.dtype == feature_dtype, f"{what}: dtype {out.dtype}, expected {feature_dtype}")
                        _require(out.device == features[0].device, f"{what}: device {out.device}, expected {device}")
                        again = _forecast(ladder, steps[-1] + offset, basis, what)
                        _require(torch.equal(out, again), f"{what}: two forecasts of the same step differ")


# -- 5. finite in, finite out --------------------------------------------------------------------
def check_finite_forecasts(
    basis: Basis,
    *,
    storage_dtypes: Iterable[torch.dtype] = STORAGE_DTYPES,
    orders: Iterable[int] = ORDERS,
    offsets: Iterable[int] = OFFSETS,
    devices: Iterable[DeviceLike] | None = None,
    seed: int = 1,
) -> None:
    """Ladders of moderate random values (``|x| <= 4``) forecast finite values.

    float32 features are stored in each of ``storage_dtypes`` and forecast at every order and offset,
    with anchors one step apart and with random spacings up to 10. Features in the storage dtype
    itself are forecast at offsets up to 10 and orders up to 2 (a policy's working range), where a
    float16 result must not overflow either.
    """
    generator = _generator(seed)
    offsets, orders, storage_dtypes = list(offsets), list(orders), list(storage_dtypes)
    for device in _devices(devices):
        for storage_dtype in storage_dtypes:
            for order in orders:
                for gaps in ([1] * (order + 1), _random_gaps(order + 1, generator)):
                    features = [f.to(device, torch.float32) for f in _random_features(order + 2, generator)]
                    steps = _anchor_steps(gaps)
                    ladder = _fill(order, features, steps, storage_dtype=storage_dtype)
                    for offset in offsets:
                        what = (
                            f"{basis.tag}: forecast at offset {offset}, order {order}, anchor gaps {gaps}, "
                            f"float32 features stored as {storage_dtype} on {device}"
                        )
                        out = _forecast(ladder, steps[-1] + offset, basis, what)
                        _require(bool(torch.isfinite(out).all()), f"{what}: not finite")
            for order in [m for m in orders if m <= 2]:
                features = [f.to(device, storage_dtype) for f in _random_features(order + 2, generator)]
                steps = _anchor_steps([1] * (order + 1))
                ladder = _fill(order, features, steps)
                for offset in [k for k in offsets if k <= 10]:
                    what = f"{basis.tag}: {storage_dtype} forecast at offset {offset}, order {order} on {device}"
                    out = _forecast(ladder, steps[-1] + offset, basis, what)
                    _require(bool(torch.isfinite(out).all()), f"{what}: not finite")


# -- 6. linearity --------------------------------------------------------------------------------
def _linearity_case(
    basis: Basis, order: int, gaps: Sequence[int], offset: int, a: float, b: float, seed: int, warmup: int
) -> None:
    generator = _generator(seed)
    steps = _anchor_steps(gaps)
    x = _random_features(len(steps), generator)
    y = _random_features(len(steps), generator)
    z = [a * xi + b * yi for xi, yi in zip(x, y, strict=True)]
    lx, ly, lz = (_fill(order, f, steps, warmup=warmup) for f in (x, y, z))
    step = steps[-1] + offset
    what = f"{basis.tag}: linearity at order {order}, anchor gaps {list(gaps)}, offset {offset}"
    fx, fy, fz = (_forecast(ladder, step, basis, what) for ladder in (lx, ly, lz))
    weights = basis.weights(offset, lz.order, lz.spacing or 1.0)
    bound = abs(a) * _ladder_bound(lx, weights) + abs(b) * _ladder_bound(ly, weights)
    error = float((fz - (a * fx + b * fy)).abs().max())
    _require(
        error <= _LINEAR_RTOL * bound + 1e-300,
        f"{basis.tag}: forecast of a*X + b*Y differs from a*F(X) + b*F(Y) by {error:.3g} (allowed "
        f"{_LINEAR_RTOL:g} x {bound:.3g}) with a={a!r}, b={b!r}, order {order}, anchor gaps {list(gaps)}, "
        f"offset {offset}, seed {seed}",
    )


def check_linear_in_ladder(
    basis: Basis,
    *,
    coefficients: Iterable[tuple[float, float]] = ((2.0, -0.5), (0.0, 1.0), (-3.0, 0.25)),
    orders: Iterable[int] = ORDERS,
    offsets: Iterable[int] = (1, 2, 3, 7, 20, 50),
    seed: int = 2,
) -> None:
    """Forecasts are linear in the ladder: ``F(a X + b Y) == a F(X) + b F(Y)`` on float64 features fed at
    the same (random, increasing) anchor steps, the first anchor restarting the ladder as in warm-up."""
    generator = _generator(seed)
    offsets = list(offsets)
    for a, b in coefficients:
        for order in orders:
            gaps = _random_gaps(order + 2, generator)
            for offset in offsets:
                _linearity_case(basis, order, gaps, offset, a, b, seed=seed + order, warmup=1)


# -- 7. reset equals fresh -----------------------------------------------------------------------
def check_reset_equals_fresh(
    basis: Basis,
    *,
    storage_dtypes: Iterable[torch.dtype | None] = (None, torch.bfloat16),
    devices: Iterable[DeviceLike] | None = None,
    seed: int = 3,
) -> None:
    """A ladder that is reset and refilled (with another shape, at earlier steps) forecasts bit for bit
    like a fresh ladder fed the same anchors; a reset ladder is empty and refuses to forecast."""
    generator = _generator(seed)
    order = MAX_SUPPORTED_ORDER
    for device in _devices(devices):
        for storage_dtype in storage_dtypes:
            before = [f.to(device, torch.float32) for f in _random_features(order + 3, generator, (4, 3))]
            after = [f.to(device, torch.float32) for f in _random_features(order + 3, generator, (2, 5))]
            steps_before = _anchor_steps(_random_gaps(order + 2, generator))
            steps_after = _anchor_steps(_random_gaps(order + 2, generator))
            reused = _fill(order, before, [s + 100 for s in steps_before], storage_dtype=storage_dtype)
            reused.reset()
            where = f"{basis.tag}, storage {storage_dtype} on {device}"
            _require(
                reused.order == -1 and reused.last_step is None and reused.spacing is None and reused.nbytes == 0,
                f"{where}: a reset ladder still holds state (order {reused.order}, last step {reused.last_step})",
            )
            try:
                reused.forecast(1, basis)
            except RuntimeError:
                pass
            else:
                raise AssertionError(f"{where}: a reset ladder forecast instead of raising RuntimeError")
            _fill(order, after, steps_after, storage_dtype=storage_dtype, ladder=reused, warmup=2)
            fresh = _fill(order, after, steps_after, storage_dtype=storage_dtype, warmup=2)
            state = (fresh.order, fresh.last_step, fresh.spacing, fresh.nbytes)
            _require(
                (reused.order, reused.last_step, reused.spacing, reused.nbytes) == state,
                f"{where}: reset-and-refilled ladder state "
                f"{(reused.order, reused.last_step, reused.spacing, reused.nbytes)} != fresh {state}",
            )
            for offset in (1, 2, 3, 5, 10):
                step = steps_after[-1] + offset
                what = f"{where}, offset {offset}"
                _require(
                    torch.equal(_forecast(reused, step, basis, what), _forecast(fresh, step, basis, what)),
                    f"{where}: reset-and-refilled ladder forecasts differently from a fresh one at offset {offset}",
                )


# -- properties (hypothesis) ---------------------------------------------------------------------
def check_basis_properties(basis: Basis, *, max_examples: int | None = None) -> None:
    """Rules 2 and 6 at arguments drawn by hypothesis: real-valued offsets in ``[1, 50]`` and spacings in
    ``[1, 10]``; random coefficients, anchor gaps and offsets for linearity.

    Needs hypothesis (imported here, on call). ``max_examples`` overrides the active hypothesis profile.
    """
    try:
        from hypothesis import given, settings
        from hypothesis import strategies as st
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError(
            "check_basis_properties needs hypothesis: pip install 'hicache-sdk[test]', or call "
            "check_basis_contract(basis, properties=False) to run the deterministic checks only"
        ) from exc

    overrides: dict[str, Any] = {"deadline": None}
    if max_examples is not None:
        overrides["max_examples"] = max_examples

    def reals(low: float, high: float) -> Any:
        return st.floats(low, high, allow_nan=False, allow_infinity=False)

    @settings(**overrides)
    @given(
        offset=reals(1.0, 50.0),
        order=st.integers(0, MAX_SUPPORTED_ORDER),
        spacing=reals(1.0, 10.0),
    )
    def weights_at_real_arguments(offset: float, order: int, spacing: float) -> None:
        _check_one_weights(basis, offset, order, spacing)

    @settings(**overrides)
    @given(
        order=st.integers(0, MAX_SUPPORTED_ORDER),
        data=st.data(),
        offset=st.integers(1, 50),
        a=reals(-10.0, 10.0),
        b=reals(-10.0, 10.0),
        seed=st.integers(0, 2**16),
        warmup=st.integers(0, 2),
    )
    def linear_in_ladder(order: int, data: Any, offset: int, a: float, b: float, seed: int, warmup: int) -> None:
        gaps = data.draw(st.lists(st.integers(1, 10), min_size=order, max_size=order + 3), label="gaps")
        _linearity_case(basis, order, gaps, offset, a, b, seed, warmup)

    weights_at_real_arguments()
    linear_in_ladder()


# -- all of it -----------------------------------------------------------------------------------
def check_basis_contract(
    basis: Basis,
    *,
    properties: bool = True,
    max_examples: int | None = None,
    devices: Iterable[DeviceLike] | None = None,
) -> None:
    """Run every check of the basis contract on ``basis``; raise :class:`AssertionError` on the first break.

    Args:
        basis: the basis instance to check (check each parameter setting you ship as a default).
        properties: also run :func:`check_basis_properties` (needs hypothesis).
        max_examples: examples per hypothesis property; ``None`` keeps the active profile's.
        devices: devices to run ladders on; default CPU, plus CUDA when available.
    """
    devices = None if devices is None else list(devices)
    check_basis_identity(basis)
    check_weights(basis)
    check_invalid_arguments_rejected(basis)
    check_forecast_layout(basis, devices=devices)
    check_finite_forecasts(basis, devices=devices)
    check_linear_in_ladder(basis)
    check_reset_equals_fresh(basis, devices=devices)
    if properties:
        check_basis_properties(basis, max_examples=max_examples)


class BasisContract:
    """pytest mixin running the basis contract, one test per rule.

    Subclass it in a class whose name starts with ``Test`` and define a ``basis`` fixture returning
    the basis to check (parametrise the fixture to check several settings). Set
    ``contract_devices`` to choose devices (default CPU, plus CUDA when available) and
    ``contract_max_examples`` to bound the hypothesis examples. The mixin itself does not import
    pytest.
    """

    contract_devices: ClassVar[Sequence[DeviceLike] | None] = None
    contract_max_examples: ClassVar[int | None] = None

    def test_basis_identity(self, basis: Basis) -> None:
        check_basis_identity(basis)

    def test_weights_have_order_plus_one_finite_entries(self, basis: Basis) -> None:
        check_weights(basis)

    def test_invalid_arguments_rejected(self, basis: Basis) -> None:
        check_invalid_arguments_rejected(basis)

    def test_forecast_keeps_shape_dtype_device(self, basis: Basis) -> None:
        check_forecast_layout(basis, devices=self.contract_devices)

    def test_finite_in_finite_out(self, basis: Basis) -> None:
        check_finite_forecasts(basis, devices=self.contract_devices)

    def test_forecast_linear_in_ladder(self, basis: Basis) -> None:
        check_linear_in_ladder(basis)

    def test_reset_equals_fresh(self, basis: Basis) -> None:
        check_reset_equals_fresh(basis, devices=self.contract_devices)

    def test_properties(self, basis: Basis) -> None:
        check_basis_properties(basis, max_examples=self.contract_max_examples)
