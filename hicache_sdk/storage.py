"""Storage formats of forecast state: how each term of a ladder is held in memory.

A :class:`StorageFormat` holds one tensor: in ``fp32``, ``bf16`` or ``fp16`` as it is, or in 8-bit
floating point (``fp8_e4m3``, ``fp8_e5m2``) divided by a scale, one per tensor (``:tensor``) or one
per row of the last dimension, i.e. per token (``:row``, the default). A :class:`LadderFormat`
gives each order of a ladder its format: ``"bf16+fp8"`` keeps ``D^0`` in bf16 and the higher
orders in fp8. Arithmetic never happens in the storage format: terms are decoded to float32,
combined, and the result is cast to the feature's dtype.

On CPU, fp8 terms are decoded by integer bit moves into float16 (exact: every fp8 value is a
float16 value, for ``e4m3`` up to a power of two folded into the scale), in chunks that stay in
cache, because torch's own fp8 conversion there is scalar and about ten times slower.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import attrs
import torch

from .errors import InvalidParameterError, did_you_mean

__all__ = [
    "FORMAT_NAMES",
    "EncodedTerm",
    "LadderFormat",
    "LadderStorage",
    "StorageFormat",
    "parse_format",
    "parse_ladder_format",
    "weighted_decode",
]

_PLAIN: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}
_FP8: dict[str, str] = {"fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
_ALIASES: dict[str, str] = {
    "float32": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "float64": "fp64",
    "fp8": "fp8_e4m3",
    "e4m3": "fp8_e4m3",
    "e5m2": "fp8_e5m2",
}
#: Every name a format may be given by (an fp8 name may end in ``:row`` or ``:tensor``).
FORMAT_NAMES: tuple[str, ...] = (*_PLAIN, *_FP8, *_ALIASES)
_SCALINGS = ("row", "tensor")
_CHUNK_ELEMENTS = 1 << 18  # CPU decoding works on about 1 MiB of float32 at a time (it stays in L2)
_BITS_MIN_ELEMENTS = 1 << 15  # below, torch's own (scalar) conversion costs less than five more ops
_E4M3_FACTOR = 256.0  # the e4m3 bits moved into float16 read 2^-8 of their value


@attrs.frozen
class EncodedTerm:
    """One stored tensor: ``data`` in the storage dtype and, for fp8, its ``scale``.

    ``scale`` is a float32 tensor: 0-d (per tensor) or of shape ``(*data.shape[:-1], 1)`` (per row).
    The value held is ``data * scale``.
    """

    data: torch.Tensor
    scale: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held by the data and the scale."""
        own = self.data.numel() * self.data.element_size()
        return own + (0 if self.scale is None else self.scale.numel() * self.scale.element_size())

    def to(self, device: torch.device, *, non_blocking: bool = False, copy: bool = False) -> EncodedTerm:
        """The same term on ``device`` (itself when it is there already, unless ``copy``)."""
        if self.data.device == device and not copy:
            return self
        scale = None if self.scale is None else self.scale.to(device, non_blocking=non_blocking, copy=copy)
        return EncodedTerm(self.data.to(device, non_blocking=non_blocking, copy=copy), scale)


@attrs.frozen
class StorageFormat:
    """How one tensor is held: ``dtype`` and, for 8-bit floats, a ``scaling`` (``"row"`` or ``"tensor"``).

    Made by :func:`parse_format` from a name such as ``"bf16"``, ``"fp8"`` or ``"fp8_e5m2:tensor"``.
    """

    name: str
    dtype: torch.dtype
    scaling: str | None = None

    @property
    def scaled(self) -> bool:
        """Whether values are divided by a scale before they are stored (the fp8 formats)."""
        return self.scaling is not None

    @property
    def largest(self) -> float:
        """The largest finite value the storage dtype holds."""
        return float(torch.finfo(self.dtype).max)

    @property
    def relative_error(self) -> float:
        """Unit roundoff of the storage dtype (half its machine epsilon): the relative error of one stored value
        against its scale (the planner orders its levels by this precision first)."""
        return float(torch.finfo(self.dtype).eps) / 2

    def nbytes(self, shape: Sequence[int]) -> int:
        """Bytes one tensor of ``shape`` takes in this format (data and scales)."""
        numel = math.prod(shape)
        scales = 0 if self.scaling is None else (1 if self.scaling == "tensor" else math.prod(shape[:-1]))
        return numel * torch.empty((), dtype=self.dtype).element_size() + 4 * scales

    def check_device(self, device: torch.device) -> None:
        """Raise if tensors of this format cannot be made and converted on ``device``."""
        try:
            probe = torch.ones(2, dtype=torch.float32, device=device)
            probe.to(self.dtype).to(torch.float32)
        except (RuntimeError, TypeError, AssertionError) as error:  # a CPU-only build asserts on "cuda"
            raise InvalidParameterError(
                f"storage format {self.name!r} ({self.dtype}) is not available on {device} with torch "
                f"{torch.__version__}: {error}. Accepted elsewhere: {sorted(_PLAIN)}"
            ) from error

    def encode(self, value: torch.Tensor) -> EncodedTerm:
        """``value`` held in this format (on its device). A non-finite value stays non-finite when decoded."""
        if self.scaling is None:
            return EncodedTerm(value.to(self.dtype, copy=True))
        magnitude = value.detach().abs().float()
        if self.scaling == "tensor":
            amax = magnitude.amax()
        else:
            amax = magnitude.amax(dim=-1, keepdim=True) if value.dim() else magnitude
        # an all-zero row keeps scale 1; an infinite or nan one gets a non-finite scale: it decodes as nan
        scale = torch.where(amax == 0, torch.ones_like(amax), amax / self.largest)
        return EncodedTerm((value.float() / scale).to(self.dtype), scale)

    def decode(self, term: EncodedTerm, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The value held by ``term``, as a new tensor of ``dtype``."""
        return weighted_decode([1.0], [term], [self], dtype)


def parse_format(value: str | torch.dtype | StorageFormat) -> StorageFormat:
    """A :class:`StorageFormat` from a name (``"bf16"``, ``"fp8"``, ``"fp8_e5m2:tensor"``) or a floating dtype."""
    if isinstance(value, StorageFormat):
        return value
    if isinstance(value, torch.dtype):
        names = {dtype: name for name, dtype in _PLAIN.items()}
        if value not in names:
            raise InvalidParameterError(
                f"storage dtype must be one of {[str(d) for d in _PLAIN.values()]} (or an fp8 format by name), "
                f"got {value}"
            )
        return StorageFormat(names[value], value)
    if not isinstance(value, str):
        raise InvalidParameterError(f"a storage format is a name such as 'bf16' or 'fp8', got {value!r}")
    base, _, scaling = value.strip().lower().partition(":")
    base = _ALIASES.get(base, base)
    if base in _PLAIN:
        if scaling:
            raise InvalidParameterError(
                f"storage format {value!r}: only fp8 formats take a scaling (':row', ':tensor')"
            )
        return StorageFormat(base, _PLAIN[base])
    if base in _FP8:
        scaling = scaling or "row"
        if scaling not in _SCALINGS:
            raise InvalidParameterError(f"storage format {value!r}: the scaling must be one of {list(_SCALINGS)}")
        dtype = getattr(torch, _FP8[base], None)
        if dtype is None:
            raise InvalidParameterError(
                f"storage format {value!r} needs torch.{_FP8[base]}, which torch {torch.__version__} lacks; "
                f"accepted here: {sorted(_PLAIN)}"
            )
        return StorageFormat(f"{base}:{scaling}", dtype, scaling)
    raise InvalidParameterError(
        f"unknown storage format {value!r}; accepted: {list(FORMAT_NAMES)} (fp8 ones with ':row' or ':tensor')."
        f"{did_you_mean(base, FORMAT_NAMES)}"
    )


@attrs.frozen
class LadderFormat:
    """The storage format of each order of a ladder: ``formats[i]`` for ``D^i``, the last for every higher order."""

    formats: tuple[StorageFormat, ...]

    @property
    def name(self) -> str:
        """E.g. ``"bf16+fp8_e4m3:row"``."""
        return "+".join(f.name for f in self.formats)

    def of(self, order: int) -> StorageFormat:
        """The format of ``D^order``."""
        return self.formats[min(order, len(self.formats) - 1)]

    @property
    def plain(self) -> torch.dtype | None:
        """The dtype of every order when all share one unscaled format, else ``None``."""
        first = self.formats[0]
        same = all(f == first for f in self.formats)
        return first.dtype if same and not first.scaled else None

    def nbytes(self, shape: Sequence[int], max_order: int) -> int:
        """Bytes of a full ladder (orders ``0..max_order``) of features of ``shape``."""
        return sum(self.of(i).nbytes(shape) for i in range(max_order + 1))

    def check_device(self, device: torch.device) -> None:
        """Raise if a format of this ladder cannot be held on ``device``."""
        for f in self.formats:
            f.check_device(device)


@attrs.frozen
class LadderStorage:
    """Where and how a ladder is held: its :class:`LadderFormat` (``None``: the feature's dtype) and the
    device it is offloaded to (``None``: with the feature)."""

    format: LadderFormat | None = None
    offload: torch.device | None = None
    #: hold the orders one by one, each allocated when first reached, even in one plain dtype
    compact: bool = False

    @property
    def name(self) -> str:
        """E.g. ``"bf16+fp8_e4m3:row"`` or ``"native, offloaded to cpu"``."""
        base = self.format.name if self.format is not None else "native"
        return base if self.offload is None else f"{base}, offloaded to {self.offload}"

    def nbytes(self, shape: Sequence[int], dtype: torch.dtype, max_order: int) -> int:
        """Bytes of a full ladder of features of ``shape`` and ``dtype`` (wherever they are held)."""
        if self.format is None:
            return math.prod(shape) * torch.empty((), dtype=dtype).element_size() * (max_order + 1)
        return self.format.nbytes(shape, max_order)


def parse_ladder_format(value: str | torch.dtype | StorageFormat | LadderFormat | Sequence[str]) -> LadderFormat:
    """A :class:`LadderFormat` from ``"fp8"``, ``"bf16+fp8"`` (``D^0`` in bf16, the rest in fp8), a dtype, or a
    list per order."""
    if isinstance(value, LadderFormat):
        return value
    if isinstance(value, str):
        parts = [p for p in re.split(r"\s*\+\s*", value.strip())]
        if not all(parts):
            raise InvalidParameterError(f"cache format {value!r}: formats joined by '+' must not be empty")
        return LadderFormat(tuple(parse_format(p) for p in parts))
    if isinstance(value, (torch.dtype, StorageFormat)):
        return LadderFormat((parse_format(value),))
    if isinstance(value, Sequence) and value and all(isinstance(v, (str, torch.dtype, StorageFormat)) for v in value):
        return LadderFormat(tuple(parse_format(v) for v in value))
    raise InvalidParameterError(
        f"cache format must be a name ('bf16', 'fp8', 'bf16+fp8'), a torch dtype or a list of names per order, got "
        f"{value!r}"
    )


# -- decoding -------------------------------------------------------------------------------------
def _bits_into(out: torch.Tensor, data: torch.Tensor, fmt: StorageFormat, scratch: torch.Tensor) -> float:
    """Write ``data`` (fp8) into float32 ``out`` through float16 bit moves; return the factor left to apply."""
    if fmt.dtype == torch.float8_e5m2:  # e5m2 is the upper byte of a float16
        scratch.copy_(data.view(torch.uint8))
        scratch.bitwise_left_shift_(8)
        out.copy_(scratch.view(torch.float16))
        return 1.0
    # e4m3fn: sign to bit 15, exponent and mantissa to bits 13..7: a float16 of 2^-8 the value
    scratch.copy_(data.view(torch.int8))
    scratch.bitwise_left_shift_(7)
    scratch.bitwise_and_(-16512)  # 0xBF80: clear bit 14, where the sign extension landed
    out.copy_(scratch.view(torch.float16))
    return _E4M3_FACTOR


def _fast_fp8(fmt: StorageFormat, device: torch.device, numel: int) -> bool:
    """Whether to decode by bit moves: on CPU, for tensors large enough that per-op overhead does not dominate."""
    return (
        device.type == "cpu"
        and numel >= _BITS_MIN_ELEMENTS
        and fmt.scaled
        and fmt.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    )


def weighted_decode(
    weights: Sequence[float],
    terms: Sequence[EncodedTerm],
    formats: Sequence[StorageFormat],
    dtype: torch.dtype,
) -> torch.Tensor:
    """``sum_i weights[i] * value(terms[i])`` computed in float32 (at least), returned as ``dtype``.

    The terms share one shape and device. On CPU the sum runs over chunks of rows small enough to
    stay in cache: per chunk each term is decoded into a float32 scratch and added, so memory
    traffic is about one read of the stored bytes and one write of the result.
    """
    first = terms[0].data
    device, shape = first.device, first.shape
    compute = torch.promote_types(dtype, torch.float32)
    width = int(shape[-1]) if first.dim() else 1
    rows = first.numel() // max(width, 1)
    out = torch.empty(shape, dtype=compute, device=device)
    flat_out = out.view(rows, width)
    flats = [(t.data.reshape(rows, width), None if t.scale is None else t.scale.reshape(-1, 1)) for t in terms]
    step = max(1, _CHUNK_ELEMENTS // max(width, 1)) if device.type == "cpu" else max(rows, 1)
    chunk_elements = min(step, max(rows, 1)) * width
    needs_bits = any(_fast_fp8(f, device, first.numel()) for f in formats)
    bits = torch.empty(chunk_elements, dtype=torch.int16, device=device) if needs_bits else None
    scratch = torch.empty(chunk_elements, dtype=compute, device=device) if len(terms) > 1 else None
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        target = flat_out[start:stop]
        n = target.numel()
        filled = False
        for weight, (data, scale), fmt in zip(weights, flats, formats, strict=True):
            if filled and weight == 0.0:
                continue
            buffer = target if not filled else scratch[:n].view(stop - start, width)  # type: ignore[index]
            if _fast_fp8(fmt, device, first.numel()):
                assert bits is not None
                factor = _bits_into(buffer, data[start:stop], fmt, bits[:n].view(stop - start, width))
            else:
                buffer.copy_(data[start:stop])
                factor = 1.0
            coefficient = weight * factor
            largest = torch.finfo(compute).max
            if abs(coefficient) > largest and factor != 1.0:  # apply the decoding factor first
                buffer.mul_(factor)
                coefficient = weight
            if abs(coefficient) > largest:  # beyond range: the product overflows, as it would
                buffer.mul_(coefficient)
                coefficient = 1.0
            chunk_scale = None if scale is None else (scale if scale.shape[0] == 1 else scale[start:stop])
            if not filled:
                if chunk_scale is not None:
                    target.mul_(chunk_scale)
                if coefficient != 1.0:
                    target.mul_(coefficient)
                filled = True
            elif chunk_scale is not None:
                target.addcmul_(buffer, chunk_scale, value=coefficient)
            else:
                target.add_(buffer, alpha=coefficient)
    return out if out.dtype == dtype else out.to(dtype)
