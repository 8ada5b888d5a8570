"""Storage formats of forecast state: names, round-trip error, fp8 decoding, weighted decoding, byte counts.

The error bounds are derived from the storage dtypes themselves (significant bits, largest value,
smallest subnormal), not from :mod:`hicache_sdk.storage`: rounding to nearest with ``p`` significant
bits moves a value ``v`` by at most ``max(2^-p |v|, tiny / 2)``; an fp8 format stores ``x / scale``
with ``scale = amax / largest`` (``amax`` of the row or of the tensor), so the error in ``x`` is at
most ``max(2^-p |x|, scale * tiny / 2)`` plus the float32 rounding of the division and of the decoding.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hicache_sdk.errors import InvalidParameterError
from hicache_sdk.ladder import DifferenceLadder, weighted_sum
from hicache_sdk.storage import (
    FORMAT_NAMES,
    EncodedTerm,
    LadderFormat,
    LadderStorage,
    StorageFormat,
    parse_format,
    parse_ladder_format,
    weighted_decode,
)

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2

#: dtype -> (significant bits p, largest finite value, smallest positive subnormal), from the IEEE-style specs
SPEC: dict[torch.dtype, tuple[int, float, float]] = {
    torch.float32: (24, 3.4028234663852886e38, 2.0**-149),
    torch.bfloat16: (8, 3.3895313892515355e38, 2.0**-133),
    torch.float16: (11, 65504.0, 2.0**-24),
    E4M3: (4, 448.0, 2.0**-9),
    E5M2: (3, 57344.0, 2.0**-16),
}
ALL_FORMATS = ("fp32", "bf16", "fp16", "fp8_e4m3:row", "fp8_e4m3:tensor", "fp8_e5m2:row", "fp8_e5m2:tensor")
SHAPES = ((7,), (1, 5), (4, 9), (2, 3, 8), (3, 1, 16))
F32_SLOP = 2.0**-20  # generous for the two or three float32 roundings around an fp8 encode/decode


# -- helpers ----------------------------------------------------------------------------------------
def amax_of(fmt: StorageFormat, x: torch.Tensor) -> torch.Tensor:
    """The magnitude a scaled format divides by: of the row (last dimension) or of the whole tensor."""
    magnitude = x.double().abs()
    if fmt.scaling == "tensor":
        return magnitude.amax()
    return magnitude.amax(dim=-1, keepdim=True) if x.dim() else magnitude


def roundtrip_bound(fmt: StorageFormat, x: torch.Tensor) -> torch.Tensor:
    """Largest error of ``decode(encode(x))`` per element (float64), from the storage dtype's spec."""
    p, largest, tiny = SPEC[fmt.dtype]
    magnitude = x.double().abs()
    if not fmt.scaled:  # one rounding of a float32 value, then an exact widening
        return torch.clamp(magnitude * 2.0**-p, min=tiny / 2)
    scale = amax_of(fmt, x) / largest
    rounding = torch.maximum(magnitude * 2.0**-p, scale * tiny / 2)
    return rounding * (1 + F32_SLOP) + F32_SLOP * (magnitude + scale * tiny)


def exact_value(term: EncodedTerm) -> torch.Tensor:
    """The value a term holds, by torch's own conversion, in float64."""
    value = term.data.to(torch.float64)
    return value if term.scale is None else value * term.scale.double()


def sample(shape: tuple[int, ...], seed: int, exponents: list[int], zero_rows: list[bool]) -> torch.Tensor:
    """Rows of magnitude 2^exponent (or exactly zero); within a row values span 2^-12..1 of its size, some are 0."""
    generator = torch.Generator().manual_seed(seed)
    rows, width = math.prod(shape[:-1]), shape[-1]
    base = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    spread = torch.exp2(-torch.randint(0, 13, (rows, width), generator=generator).double())
    holes = torch.rand(rows, width, generator=generator) < 0.1
    size = torch.tensor([0.0 if zero else 2.0**e for e, zero in zip(exponents, zero_rows, strict=True)])
    x = (base * spread * size.double()[:, None]).masked_fill(holes, 0.0)
    return x.float().reshape(shape)


@st.composite
def features(draw: st.DrawFn, max_exponent: int = 20) -> torch.Tensor:
    shape = draw(st.sampled_from(SHAPES))
    rows = math.prod(shape[:-1])
    exponents = draw(st.lists(st.integers(-max_exponent, max_exponent), min_size=rows, max_size=rows))
    # about one row in eight is all zeros
    zero_rows = draw(st.lists(st.integers(0, 7).map(lambda k: k == 0), min_size=rows, max_size=rows))
    return sample(shape, draw(st.integers(0, 2**31 - 1)), exponents, zero_rows)


# -- names ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("given_", "name", "dtype", "scaling"),
    [
        ("fp32", "fp32", torch.float32, None),
        ("float32", "fp32", torch.float32, None),
        ("bf16", "bf16", torch.bfloat16, None),
        ("bfloat16", "bf16", torch.bfloat16, None),
        ("fp16", "fp16", torch.float16, None),
        ("float16", "fp16", torch.float16, None),
        ("fp8", "fp8_e4m3:row", E4M3, "row"),
        ("e4m3", "fp8_e4m3:row", E4M3, "row"),
        ("fp8:tensor", "fp8_e4m3:tensor", E4M3, "tensor"),
        ("fp8:row", "fp8_e4m3:row", E4M3, "row"),
        ("fp8_e5m2", "fp8_e5m2:row", E5M2, "row"),
        ("fp8_e5m2:", "fp8_e5m2:row", E5M2, "row"),  # an empty scaling is the default
        ("e5m2:tensor", "fp8_e5m2:tensor", E5M2, "tensor"),
        (" FP8_E4M3:Tensor ", "fp8_e4m3:tensor", E4M3, "tensor"),
        (torch.float32, "fp32", torch.float32, None),
        (torch.bfloat16, "bf16", torch.bfloat16, None),
        (torch.float16, "fp16", torch.float16, None),
    ],
)
def test_parse_format_accepts_names_aliases_and_dtypes(
    given_: str | torch.dtype, name: str, dtype: torch.dtype, scaling: str | None
) -> None:
    fmt = parse_format(given_)
    assert (fmt.name, fmt.dtype, fmt.scaling, fmt.scaled) == (name, dtype, scaling, scaling is not None)
    assert parse_format(fmt) is fmt  # a format passes through
    assert parse_format(fmt.name) == fmt  # the canonical name parses back to the same format


def test_format_names_lists_every_accepted_name() -> None:
    for name in FORMAT_NAMES:
        parse_format(name)
    assert {"fp32", "bf16", "fp16", "fp8", "fp8_e4m3", "fp8_e5m2"} <= set(FORMAT_NAMES)


@pytest.mark.parametrize(
    ("bad", "patterns"),
    [
        ("bf61", [r"unknown storage format 'bf61'", r"accepted: \[.*'bf16'.*'fp8'", r"Did you mean 'bf16'\?"]),
        ("int8", [r"unknown storage format 'int8'", r"accepted: \["]),
        ("", [r"unknown storage format ''"]),
        ("bf16:row", [r"'bf16:row'", r"only fp8 formats take a scaling", r":row", r":tensor"]),
        ("fp32:tensor", [r"'fp32:tensor'", r"only fp8 formats take a scaling"]),
        ("fp8:col", [r"'fp8:col'", r"scaling must be one of \['row', 'tensor'\]"]),
        (torch.int8, [r"storage dtype must be one of", r"torch\.float32", r"got torch\.int8"]),
        (torch.complex64, [r"storage dtype must be one of", r"got torch\.complex64"]),
        (torch.bool, [r"got torch\.bool"]),
        (3, [r"a storage format is a name such as 'bf16' or 'fp8', got 3"]),
        (None, [r"got None"]),
        (b"fp8", [r"got b'fp8'"]),
        (["fp8"], [r"got \['fp8'\]"]),
    ],
)
def test_parse_format_rejects_naming_what_was_given_and_what_is_accepted(bad: object, patterns: list[str]) -> None:
    with pytest.raises(InvalidParameterError) as info:
        parse_format(bad)  # type: ignore[arg-type]
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))


def test_parse_format_without_fp8_in_torch_names_the_torch_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch, "float8_e4m3fn")
    for name in ("fp8", "fp8_e4m3:tensor", "e4m3"):
        with pytest.raises(InvalidParameterError) as info:
            parse_format(name)
        message = str(info.value)
        assert "float8_e4m3fn" in message and f"torch {torch.__version__}" in message, message
        assert "'bf16'" in message and "'fp32'" in message  # what is accepted here
    assert parse_format("fp8_e5m2").dtype == E5M2  # only the missing dtype is refused
    assert parse_format("bf16").dtype == torch.bfloat16


def test_parse_ladder_format_gives_each_order_its_format() -> None:
    mixed = parse_ladder_format("bf16+fp8")
    assert mixed.name == "bf16+fp8_e4m3:row"
    assert mixed.of(0) == parse_format("bf16")
    assert all(mixed.of(i) == parse_format("fp8_e4m3:row") for i in range(1, 8))
    assert mixed.plain is None
    listed = parse_ladder_format(["fp32", torch.bfloat16, "fp8_e5m2:tensor"])
    assert [listed.of(i).name for i in range(5)] == ["fp32", "bf16"] + 3 * ["fp8_e5m2:tensor"]
    spaced = parse_ladder_format("  fp16 + fp8:tensor ")
    assert spaced.name == "fp16+fp8_e4m3:tensor"
    assert parse_ladder_format("fp8").formats == (parse_format("fp8"),)
    assert parse_ladder_format(torch.float16).formats == (parse_format("fp16"),)
    assert parse_ladder_format(parse_format("bf16")).formats == (parse_format("bf16"),)
    assert parse_ladder_format(mixed) is mixed
    # plain: one unscaled dtype for every order
    assert parse_ladder_format("bf16").plain == torch.bfloat16
    assert parse_ladder_format("bf16+bfloat16").plain == torch.bfloat16
    assert parse_ladder_format("fp32+bf16").plain is None
    assert parse_ladder_format("fp8").plain is None


@pytest.mark.parametrize(
    ("bad", "pattern"),
    [
        ("bf16+", r"'bf16\+': formats joined by '\+' must not be empty"),
        ("+fp8", r"must not be empty"),
        ("bf16++fp8", r"must not be empty"),
        ("", r"must not be empty"),
        ("bf16+fp9", r"unknown storage format 'fp9'"),
        ([], r"cache format must be a name .* got \[\]"),
        ([1, 2], r"got \[1, 2\]"),
        (8, r"got 8"),
    ],
)
def test_parse_ladder_format_rejects(bad: object, pattern: str) -> None:
    with pytest.raises(InvalidParameterError, match=pattern):
        parse_ladder_format(bad)  # type: ignore[arg-type]


# -- round trip -------------------------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_round_trip_is_within_the_format_error(data: st.DataObject) -> None:
    fmt = parse_format(data.draw(st.sampled_from(ALL_FORMATS), label="format"))
    # float16 holds at most 65504: keep its rows in range (the others hold any float32 drawn here)
    x = data.draw(features(max_exponent=10 if fmt.dtype == torch.float16 else 20), label="x")
    term = fmt.encode(x)
    assert term.data.dtype == fmt.dtype and term.data.shape == x.shape
    if fmt.scaling == "row":
        assert term.scale is not None and term.scale.shape == (*x.shape[:-1], 1)
    elif fmt.scaling == "tensor":
        assert term.scale is not None and term.scale.shape == ()
    else:
        assert term.scale is None
    assert term.nbytes == fmt.nbytes(x.shape)
    out = fmt.decode(term)
    assert out.dtype == torch.float32 and out.shape == x.shape
    error = (out.double() - x.double()).abs()
    bound = roundtrip_bound(fmt, x)
    excess = error - bound
    assert (excess <= 0).all(), (
        f"{fmt.name}: {int((excess > 0).sum())} elements beyond the bound, worst at "
        f"{tuple(int(i) for i in torch.nonzero(excess == excess.max())[0])}: error {float(error.max()):.3g}"
    )
    # the bound is against the element, not only the row (per-row scaling keeps small rows accurate)
    if fmt.scaled:
        assert (error <= 2.0 ** -SPEC[fmt.dtype][0] * amax_of(fmt, x) * (1 + F32_SLOP)).all()
    assert (out[x == 0] == 0).all()  # zeros are exact
    assert torch.isfinite(out).all()
    assert torch.equal(fmt.decode(term), out)  # decoding does not consume the term


@pytest.mark.parametrize("name", ALL_FORMATS)
@pytest.mark.parametrize("shape", [(), (5,), (3, 4), (2, 3, 4)])
def test_all_zero_tensors_round_trip_to_zeros(name: str, shape: tuple[int, ...]) -> None:
    fmt = parse_format(name)
    out = fmt.decode(fmt.encode(torch.zeros(shape)))
    assert out.shape == shape and torch.equal(out, torch.zeros(shape))
    negative = fmt.decode(fmt.encode(-torch.zeros(shape)))
    assert torch.equal(negative, torch.zeros(shape))  # -0.0 == 0.0, and no nan from 0 / 0


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_scalars_and_vectors_round_trip(name: str) -> None:
    fmt = parse_format(name)
    for x in (torch.tensor(3.7), torch.tensor(-1e-3), torch.tensor([0.5, -1000.0, 1e-6, 0.0])):
        out = fmt.decode(fmt.encode(x))
        assert out.shape == x.shape
        assert ((out.double() - x.double()).abs() <= roundtrip_bound(fmt, x)).all(), (x, out)


def test_row_scaling_keeps_a_small_row_that_tensor_scaling_flushes() -> None:
    x = torch.tensor([[1e4, -3e3, 2e4], [1e-3, 2e-3, -3e-3]])
    by_row = parse_format("fp8:row")
    by_tensor = parse_format("fp8:tensor")
    small = by_row.decode(by_row.encode(x))[1]
    assert torch.allclose(small, x[1], rtol=2.0**-4, atol=0)
    assert torch.equal(by_tensor.decode(by_tensor.encode(x))[1], torch.zeros(3))  # 1e-3 / (2e4 / 448) < 2^-10


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_plain_formats_round_exactly_like_a_cast(name: str) -> None:
    fmt = parse_format(name)
    x = torch.randn(33, 17, generator=torch.Generator().manual_seed(1)) * 100
    assert torch.equal(fmt.decode(fmt.encode(x)), x.to(fmt.dtype).float())
    assert torch.equal(parse_format("fp32").decode(parse_format("fp32").encode(x)), x)


# -- the CPU decoding of fp8 ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("scale", [1.0, 0.375, 3.0e5, 2.0**-20, 1 / 448])
def test_bit_decoding_equals_torch_conversion_for_every_bit_pattern(dtype: torch.dtype, scale: float) -> None:
    data = torch.arange(256, dtype=torch.uint8).view(dtype)
    reference = data.to(torch.float32) * torch.tensor(scale, dtype=torch.float32)
    keep = ~torch.isnan(reference)
    assert int(keep.sum()) == (254 if dtype == E4M3 else 250)  # nan patterns: 2 in e4m3fn, 6 in e5m2
    for scaling in ("tensor", "row"):
        fmt = StorageFormat(f"test:{scaling}", dtype, scaling)
        shaped = data if scaling == "tensor" else data.reshape(16, 16)
        scales = torch.tensor(scale) if scaling == "tensor" else torch.full((16, 1), scale)
        out = weighted_decode([1.0], [EncodedTerm(shaped, scales)], [fmt], torch.float32).reshape(-1)
        assert torch.equal(out[keep], reference[keep]), (out[keep] - reference[keep]).abs().max()
        assert torch.equal(torch.signbit(out[keep]), torch.signbit(reference[keep]))  # -0.0 stays -0.0
    zero, negative_zero, smallest = data[0], data[128], data[1]
    assert float(zero.float()) == 0.0 and torch.signbit(negative_zero.float())
    assert float(smallest.float()) == SPEC[dtype][2]  # the subnormals are among the patterns checked


def test_bit_decoding_with_a_scale_per_row() -> None:
    data = torch.arange(256, dtype=torch.uint8).view(E4M3).reshape(8, 32)
    scales = torch.tensor([1.0, 2.0**-20, 3.0e5, 0.375, 1 / 448, 7.0, 1e-3, 123.25])[:, None]
    reference = data.to(torch.float32) * scales
    out = weighted_decode([1.0], [EncodedTerm(data, scales)], [parse_format("fp8")], torch.float32)
    keep = ~torch.isnan(reference)
    assert torch.equal(out[keep], reference[keep])


# -- weighted decoding ------------------------------------------------------------------------------
def reference_sum(weights: list[float], terms: list[EncodedTerm]) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 weighted sum of the decoded terms, and its float32 rounding budget."""
    values = [exact_value(t) for t in terms]
    exact = sum(w * v for w, v in zip(weights, values, strict=True))
    size = sum(abs(w) * v.abs() for w, v in zip(weights, values, strict=True))
    # each term: its decoding, the weight's rounding, the product and the accumulation (float32 unit roundoff)
    return exact, (len(terms) + 4) * 2.0**-24 * size  # type: ignore[return-value]


def encode_all(names: list[str], shape: tuple[int, ...], seed: int) -> list[EncodedTerm]:
    generator = torch.Generator().manual_seed(seed)
    rows = math.prod(shape[:-1]) if shape else 1
    terms = []
    for name in names:
        magnitudes = torch.exp2(torch.randint(-8, 9, (rows, 1), generator=generator).float())
        width = shape[-1] if shape else 1
        x = (torch.randn(rows, width, generator=generator) * magnitudes).reshape(shape)
        terms.append(parse_format(name).encode(x))
    return terms


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_weighted_decode_equals_the_float64_sum_to_float32_rounding(data: st.DataObject) -> None:
    names = data.draw(st.lists(st.sampled_from(ALL_FORMATS), min_size=1, max_size=5), label="formats")
    # weights of the bases: 0, 1 or of moderate size (a product below float32's range underflows, as it should)
    moderate = st.tuples(st.floats(1e-3, 100), st.sampled_from([1.0, -1.0])).map(lambda t: t[0] * t[1])
    weight = st.one_of(st.just(0.0), st.just(1.0), moderate)
    weights = data.draw(st.lists(weight, min_size=len(names), max_size=len(names)), label="weights")
    shape = data.draw(st.sampled_from([(), (5,), (3, 7), (2, 3, 4), (1, 1)]), label="shape")
    terms = encode_all(names, shape, data.draw(st.integers(0, 2**31 - 1), label="seed"))
    formats = [parse_format(n) for n in names]
    exact, budget = reference_sum(weights, terms)
    out = weighted_decode(weights, terms, formats, torch.float32)
    assert out.dtype == torch.float32 and out.shape == shape
    assert ((out.double() - exact).abs() <= budget).all(), float((out.double() - exact).abs().max())
    half = weighted_decode(weights, terms, formats, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.shape == shape
    # rounded once to bf16 (unit roundoff 2^-8) from the float32 sum
    assert ((half.double() - exact).abs() <= budget + 2.0**-8 * (exact.abs() + budget)).all()


@pytest.mark.parametrize("shape", [(700, 400), (3, 300, 300), (2, 2**18 + 3)])
def test_weighted_decode_in_chunks_equals_the_float64_sum(shape: tuple[int, ...]) -> None:
    names = ["fp8_e4m3:row", "bf16", "fp8_e5m2:row", "fp32", "fp8_e4m3:tensor", "fp16"]
    weights = [1.0, -0.5, 0.0, 2.5, 1 / 3, 7.0]
    terms = encode_all(names, shape, seed=sum(shape))
    exact, budget = reference_sum(weights, terms)
    out = weighted_decode(weights, terms, [parse_format(n) for n in names], torch.float32)
    assert out.shape == shape
    assert ((out.double() - exact).abs() <= budget).all(), float((out.double() - exact).abs().max())
    single = weighted_decode([1.0], terms[:1], [parse_format(names[0])], torch.float32)
    assert torch.equal(single, exact_value(terms[0]).float())  # one fp8 term decodes exactly


def test_zero_weights_skip_their_terms_like_weighted_sum() -> None:
    finite = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -4.0]])
    poison = torch.tensor([[math.inf, math.nan, 1.0], [-math.inf, 2.0, 0.0]])
    fp32 = parse_format("fp32")
    for weights in ([1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0]):
        values = [finite, poison, poison][: len(weights)] if weights[0] else [poison, finite]
        out = weighted_decode(weights, [fp32.encode(v) for v in values], [fp32] * len(values), torch.float32)
        expected = weighted_sum(weights, torch.stack(values), torch.float32)
        torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    # a zero weight after the first skips even an fp8 term holding inf
    fp8 = parse_format("fp8")
    out = weighted_decode([1.0, 0.0], [fp8.encode(finite), fp8.encode(poison)], [fp8, fp8], torch.float32)
    assert torch.isfinite(out).all()
    assert torch.equal(out, fp8.decode(fp8.encode(finite)))


def test_a_weight_beyond_float32_gives_a_non_finite_result_not_an_error() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0], [1.0, 0.0, -1.0]])
    fp32 = parse_format("fp32")
    out = weighted_decode([1.0, 1e60], [fp32.encode(v) for v in values], [fp32, fp32], torch.float32)
    expected = weighted_sum((1.0, 1e60), values, torch.float32)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    assert out[0].item() == math.inf and math.isnan(out[1].item()) and out[2].item() == -math.inf
    for name in ("fp8", "fp8_e5m2:tensor", "bf16"):
        fmt = parse_format(name)
        alone = weighted_decode([1e60], [fmt.encode(values)], [fmt], torch.float32)
        assert torch.equal(torch.isinf(alone), values != 0), (name, alone)
        assert torch.equal(torch.isnan(alone), values == 0), (name, alone)
        assert torch.equal(torch.sign(alone[values != 0]), torch.sign(values[values != 0]))
        wide = weighted_decode([1e60], [fmt.encode(values)], [fmt], torch.float64)  # float64 holds the product
        assert wide.dtype == torch.float64
        torch.testing.assert_close(wide, 1e60 * exact_value(fmt.encode(values)), rtol=1e-15, atol=0)


def test_a_large_finite_weight_on_an_e4m3_term_does_not_overflow_early() -> None:
    fmt = parse_format("fp8:tensor")
    term = EncodedTerm(torch.tensor([0.875, 448.0]).to(E4M3), torch.tensor(1.0))
    weight = 2e36  # 2e36 * 0.875 = 1.75e36 is a float32 number; 2e36 * 448 is not
    expected = (exact_value(term) * weight).float()
    assert expected[0].item() == pytest.approx(1.75e36) and expected[1].item() == math.inf
    out = weighted_decode([weight], [term], [fmt], torch.float32)
    torch.testing.assert_close(out, expected, rtol=2**-23, atol=0)  # finite where the product is: no early inf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_weighted_decode_returns_the_requested_dtype(dtype: torch.dtype) -> None:
    names = ["fp8", "bf16", "fp32"]
    terms = encode_all(names, (4, 6), seed=3)
    exact, budget = reference_sum([1.0, 0.5, -2.0], terms)
    out = weighted_decode([1.0, 0.5, -2.0], terms, [parse_format(n) for n in names], dtype)
    assert out.dtype == dtype and out.shape == (4, 6)
    rounding = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 0.0}[dtype]
    assert ((out.double() - exact).abs() <= budget + rounding * (exact.abs() + budget) + 2.0**-25).all()


# -- non-finite values ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "name"),
    [
        (math.inf, "fp8_e4m3:row"),
        (-math.inf, "fp8_e4m3:row"),
        (math.inf, "fp8_e4m3:tensor"),
        (math.inf, "fp8_e5m2:row"),
        (-math.inf, "fp8_e5m2:tensor"),
        (math.nan, "fp8_e4m3:row"),
        (math.nan, "fp8_e4m3:tensor"),
        (math.nan, "fp8_e5m2:row"),
        (math.nan, "fp8_e5m2:tensor"),
        (math.inf, "bf16"),
        (math.nan, "fp16"),
    ],
)
def test_non_finite_values_never_decode_as_finite(value: float, name: str) -> None:
    fmt = parse_format(name)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(5))
    x[1, 2] = value
    out = fmt.decode(fmt.encode(x))
    assert not torch.isfinite(out[1, 2]), out[1]
    if math.isinf(value) and fmt.scaling == "row":
        assert not torch.isfinite(out[1]).any(), out[1]  # the row's scale is infinite: the whole row is poisoned
    if math.isinf(value) and fmt.scaling == "tensor":
        assert not torch.isfinite(out).any(), out
    if fmt.scaling != "tensor":  # the other rows are untouched
        others = torch.tensor([0, 2, 3])
        assert torch.isfinite(out[others]).all()
        assert ((out[others].double() - x[others].double()).abs() <= roundtrip_bound(fmt, x[others])).all()


# -- bytes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_FORMATS)
@pytest.mark.parametrize("shape", [(3,), (2, 5), (2, 3, 4)])
def test_format_nbytes_equals_what_an_encode_holds(name: str, shape: tuple[int, ...]) -> None:
    fmt = parse_format(name)
    term = fmt.encode(torch.randn(shape))
    assert fmt.nbytes(shape) == term.nbytes
    itemsize = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, E4M3: 1, E5M2: 1}[fmt.dtype]
    scales = {None: 0, "tensor": 1, "row": math.prod(shape[:-1])}[fmt.scaling]
    assert term.nbytes == math.prod(shape) * itemsize + 4 * scales


def test_ladder_format_nbytes_is_the_sum_over_orders() -> None:
    shape = (2, 3, 8)
    numel, rows = 48, 6
    mixed = parse_ladder_format("bf16+fp8")
    for m in range(4):
        assert mixed.nbytes(shape, m) == 2 * numel + m * (numel + 4 * rows)
        assert mixed.nbytes(shape, m) == sum(mixed.of(i).nbytes(shape) for i in range(m + 1))
    listed = parse_ladder_format(["fp32", "fp16", "fp8_e5m2:tensor"])
    assert listed.nbytes(shape, 4) == 4 * numel + 2 * numel + 3 * (numel + 4)
    storage = LadderStorage(mixed, torch.device("cpu"))
    assert storage.nbytes(shape, torch.float64, 3) == mixed.nbytes(shape, 3)  # the feature dtype plays no part


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_native_storage_nbytes_uses_the_feature_dtype(dtype: torch.dtype) -> None:
    shape, m = (3, 5), 2
    native = LadderStorage()
    ladder = DifferenceLadder(m)
    ladder.update(torch.zeros(shape, dtype=dtype), 0)
    assert (
        native.nbytes(shape, dtype, m) == ladder.nbytes == 15 * (m + 1) * torch.tensor([], dtype=dtype).element_size()
    )
    assert LadderStorage(None, torch.device("cpu")).nbytes(shape, dtype, m) == ladder.nbytes


def test_storage_names() -> None:
    assert LadderStorage().name == "native"
    assert LadderStorage(None, torch.device("cpu")).name == "native, offloaded to cpu"
    assert LadderStorage(parse_ladder_format("bf16+fp8")).name == "bf16+fp8_e4m3:row"
    assert isinstance(parse_ladder_format("fp8"), LadderFormat)


# -- devices ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_FORMATS)
def test_every_format_is_available_on_cpu(name: str) -> None:
    parse_format(name).check_device(torch.device("cpu"))
    parse_ladder_format(f"bf16+{name}").check_device(torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA is missing")
@pytest.mark.parametrize("name", ["fp8", "bf16"])
def test_a_device_that_is_missing_is_refused_naming_the_format(name: str) -> None:
    fmt = parse_format(name)
    with pytest.raises(InvalidParameterError) as info:
        fmt.check_device(torch.device("cuda"))
    assert repr(fmt.name) in str(info.value) and "cuda" in str(info.value)
    with pytest.raises(InvalidParameterError):
        parse_ladder_format(f"fp32+{name}").check_device(torch.device("cuda"))
