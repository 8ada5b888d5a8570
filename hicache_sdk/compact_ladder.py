"""A ladder held in a :class:`~hicache_sdk.storage.LadderStorage`: per-order formats, optionally offloaded.

:class:`CompactLadder` keeps the bookkeeping and the semantics of
:class:`~hicache_sdk.ladder.DifferenceLadder` (same differences, same forecasts up to the rounding of
the storage format) but holds each order as an :class:`~hicache_sdk.storage.EncodedTerm`, on the
offload device when there is one. There the terms are fetched before use: :meth:`CompactLadder.prefetch`
starts the copies early (on a side stream on CUDA, so that they overlap the model's work) and the next
forecast or update takes them; a term used without a prefetch is fetched on demand. New anchors are
encoded on the compute device and copied back asynchronously into pinned host memory.

:func:`make_ladder` picks the plain ladder when the storage is a plain dtype kept with the feature,
so that existing configurations compute bit for bit as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .basis import Basis
from .errors import InvalidParameterError
from .ladder import DifferenceLadder
from .storage import EncodedTerm, LadderStorage, StorageFormat, parse_format, weighted_decode
from .validation import check_int

__all__ = ["CompactLadder", "convert_ladder", "make_ladder"]

_COPY_STREAMS: dict[torch.device, Any] = {}


def _copy_stream(device: torch.device) -> Any:
    """One side stream per CUDA device for prefetches."""
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device=device)
    return _COPY_STREAMS[device]


def make_ladder(max_order: int, storage: LadderStorage | None = None) -> DifferenceLadder:
    """The ladder for ``storage``: a plain :class:`DifferenceLadder` when it is one unscaled dtype held with
    the feature (or the feature's own dtype), else a :class:`CompactLadder`."""
    if storage is None or (storage.offload is None and storage.format is None and not storage.compact):
        return DifferenceLadder(max_order)
    plain = storage.format.plain if storage.format is not None else None
    if storage.offload is None and plain is not None and not storage.compact:
        return DifferenceLadder(max_order, plain)
    return CompactLadder(max_order, storage)


def convert_ladder(ladder: DifferenceLadder, max_order: int, storage: LadderStorage | None) -> DifferenceLadder:
    """A ladder held in ``storage`` with the anchors of ``ladder`` (each order re-encoded)."""
    fresh = make_ladder(max_order, storage)
    if ladder.order < 0 and ladder._rows is None:
        return fresh
    held = ladder._size if ladder._rows is None else max(size for _, size, _ in ladder._rows)
    terms = [ladder.term(i) for i in range(held)] if ladder._rows is None else _held_terms(ladder, held)
    fresh._size, fresh._last_step, fresh._spacing = ladder._size, ladder._last_step, ladder._spacing
    fresh._rows, fresh._feature_dtype = ladder._rows, ladder._feature_dtype
    first = terms[0]
    if isinstance(fresh, CompactLadder):
        fresh._device, fresh._shape = first.device, tuple(first.shape)
        for i, term in enumerate(terms):
            fresh._store(i, term)
    else:
        dtype = fresh.storage_dtype or ladder._feature_dtype or first.dtype
        fresh._terms = torch.zeros((max_order + 1, *first.shape), dtype=dtype, device=first.device)
        for i, term in enumerate(terms):
            fresh._terms[i].copy_(term)
    return fresh


def _held_terms(ladder: DifferenceLadder, held: int) -> list[torch.Tensor]:
    """Every stored order of a ladder whose samples were anchored apart (some rows hold fewer orders)."""
    if isinstance(ladder, CompactLadder):
        terms = ladder._terms_here()
        return [weighted_decode([1.0], [terms[i]], [ladder._format(i)], torch.float32) for i in range(held)]
    assert ladder._terms is not None
    return [ladder._terms[i] for i in range(held)]


class CompactLadder(DifferenceLadder):
    """A :class:`DifferenceLadder` whose orders are stored encoded (see :mod:`hicache_sdk.storage`).

    Args:
        max_order: highest order ``m >= 0`` kept.
        storage: the format of each order and the offload device.

    Attributes:
        prefetched: prefetches that a read used (:meth:`term`, a forecast or an update); ``fetched``:
            reads that had to copy the terms on demand.
    """

    def __init__(self, max_order: int, storage: LadderStorage) -> None:
        self.storage = storage
        self.prefetched = 0
        self.fetched = 0
        super().__init__(max_order, None)

    def reset(self) -> None:
        if getattr(self, "_ready", None) is not None:
            self._settle()
        super().reset()
        self._slots: list[EncodedTerm] = []
        self._device: torch.device | None = None
        self._shape: tuple[int, ...] | None = None
        self._staged: list[EncodedTerm] | None = None
        self._ready: Any = None  # CUDA event: the prefetch has landed
        self._unread = False  # the staged copies come from a prefetch and were not read yet
        self._written: Any = None  # CUDA event: the last write-back was issued

    # -- where the terms are ------------------------------------------------------------------
    @property
    def offloaded(self) -> bool:
        """Whether the terms are held on another device than the features' (then they do not count on it)."""
        return self.storage.offload is not None and self._device is not None and self.storage.offload != self._device

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored terms, wherever they are."""
        return sum(s.nbytes for s in self._slots)

    @property
    def device_nbytes(self) -> int:
        """Bytes on the compute device: the stored terms unless offloaded, plus those a prefetch staged."""
        staged = 0 if self._staged is None else sum(s.nbytes for s in self._staged)
        return staged + (0 if self.offloaded else self.nbytes)

    def _format(self, order: int) -> StorageFormat:
        if self.storage.format is not None:
            return self.storage.format.of(order)
        assert self._feature_dtype is not None
        return parse_format(self._feature_dtype)

    def prefetch(self) -> None:
        """Start copying the terms to the compute device (a no-op without offload, or when already staged).

        An offload device equal to the compute device still goes through the copies (the same code
        path as a real offload, which is how it is tested on a machine without an accelerator).
        """
        if self.storage.offload is None or self._staged is not None or not self._slots:
            return
        assert self._device is not None
        if self._device.type == "cuda" and self.offloaded:
            stream = _copy_stream(self._device)
            if self._written is not None:
                stream.wait_event(self._written)
            with torch.cuda.stream(stream):
                self._staged = [s.to(self._device, non_blocking=True, copy=True) for s in self._slots]
                self._ready = torch.cuda.Event()
                self._ready.record(stream)
        else:
            self._staged = [s.to(self._device, copy=True) for s in self._slots]
        self._unread = True

    def _terms_here(self, *, keep: bool = False) -> list[EncodedTerm]:
        """The stored terms on the compute device (the prefetched ones, or fetched now).

        With ``keep`` they stay staged for the next read too (:meth:`term` before a forecast).
        """
        if self.storage.offload is None:
            return self._slots
        assert self._device is not None
        if self._staged is None:
            self.fetched += 1
            staged = [s.to(self._device, copy=True) for s in self._slots]
            self._staged = staged if keep else None
            return staged
        staged = self._staged
        if self._unread:
            self.prefetched += 1
            self._unread = False
        if self._ready is not None:  # the copies were made on the side stream: wait for them, then own them
            current = torch.cuda.current_stream(self._device)
            current.wait_event(self._ready)
            for term in staged:
                for t in (term.data, term.scale):
                    if t is not None:
                        t.record_stream(current)
            self._ready = None
        if not keep:
            self._staged = None
        return staged

    def _settle(self) -> None:
        """Let a prefetch in flight finish before the stored terms change or its copies are dropped."""
        if self._ready is not None:
            torch.cuda.current_stream(self._device).wait_event(self._ready)
            self._ready = None

    def _store(self, order: int, value: torch.Tensor) -> None:
        """Encode ``value`` as ``D^order`` (on the compute device) and keep it at home."""
        self._settle()  # a prefetch may still be reading the home copy
        encoded = self._format(order).encode(value)
        if self.storage.offload is not None:
            assert self.storage.offload is not None
            pin = self._device is not None and self._device.type == "cuda" and self.storage.offload.type == "cpu"
            if order < len(self._slots):
                home = self._slots[order]
            else:
                home = EncodedTerm(
                    torch.empty(
                        encoded.data.shape, dtype=encoded.data.dtype, device=self.storage.offload, pin_memory=pin
                    ),
                    None
                    if encoded.scale is None
                    else torch.empty(
                        encoded.scale.shape, dtype=torch.float32, device=self.storage.offload, pin_memory=pin
                    ),
                )
            home.data.copy_(encoded.data, non_blocking=pin)
            if home.scale is not None and encoded.scale is not None:
                home.scale.copy_(encoded.scale, non_blocking=pin)
            if pin:
                self._written = torch.cuda.Event()
                self._written.record(torch.cuda.current_stream(self._device))
            encoded = home
        if order < len(self._slots):
            self._slots[order] = encoded
        else:
            self._slots.append(encoded)

    # -- the ladder -----------------------------------------------------------------------------
    def term(self, i: int) -> torch.Tensor:
        """``D^i`` decoded (a new tensor in the feature's dtype; write it back with :meth:`set_term`)."""
        if not 0 <= i < self._size or (self._rows is not None and i > self.order):
            raise IndexError(f"ladder holds orders 0..{self.order}, asked for {i}")
        assert self._feature_dtype is not None
        terms = self._terms_here(keep=True)
        return weighted_decode([1.0], [terms[i]], [self._format(i)], self._feature_dtype)

    def set_term(self, i: int, value: torch.Tensor) -> None:
        if not 0 <= i < self._size or (self._rows is not None and i > self.order):
            raise IndexError(f"ladder holds orders 0..{self.order}, asked to set {i}")
        self._settle()
        self._staged = None  # a prefetched copy would hide the new value
        self._store(i, value)

    def update(
        self, feature: torch.Tensor, step: int, *, extend: bool = True, rows: torch.Tensor | None = None
    ) -> None:
        step = check_int("step", step)
        if rows is not None or self._rows is not None:
            if not self._slots:
                raise RuntimeError("a ladder's first anchor must hold every sample (rows=None)")
            with self._materialized():
                self._update_rows(feature, step, extend, rows)
            return
        if self._last_step is not None and step <= self._last_step:
            raise InvalidParameterError(f"anchor step must increase: got {step} after {self._last_step}")
        if self._shape is not None and tuple(feature.shape) != self._shape:
            raise InvalidParameterError(
                f"feature shape changed from {self._shape} to {tuple(feature.shape)} without a reset"
            )
        self._device, self._shape, self._feature_dtype = feature.device, tuple(feature.shape), feature.dtype
        grow = extend and self._size > 0 and self.max_order > 0
        new_size = min(self._size + 1, self.max_order + 1) if grow else 1
        compute = torch.promote_types(feature.dtype, torch.float32)
        new = feature.detach().to(compute)
        if grow:
            assert self._last_step is not None
            spacing = float(step - self._last_step)
            old = self._terms_here()
            for i in range(new_size):
                following = None
                if i + 1 < new_size:  # the next difference needs the old D^i: decode it before D^i is written
                    following = new - weighted_decode([1.0], [old[i]], [self._format(i)], compute)
                    following.div_(spacing)
                self._store(i, new)
                if following is not None:
                    new = following
            self._spacing = spacing
        else:
            self._settle()
            self._staged = None
            self._store(0, new)
            self._spacing = None
        self._size = new_size
        self._last_step = step

    def forecast(self, step: int, basis: Basis) -> torch.Tensor:
        if not self._slots or self._last_step is None or self._feature_dtype is None:
            raise RuntimeError("cannot forecast from an empty ladder: no anchor was recorded")
        if self._rows is not None:
            with self._materialized(write_back=False):
                return self._forecast_rows(step, basis)
        weights = basis.weights(step - self._last_step, self.order, self._spacing or 1.0)
        terms = self._terms_here()
        formats = [self._format(i) for i in range(len(weights))]
        return weighted_decode(weights, terms[: len(weights)], formats, self._feature_dtype)

    @contextmanager
    def _materialized(self, *, write_back: bool = True) -> Iterator[None]:
        """Decode every order into a float32 ``_terms`` tensor for the per-sample paths, then encode back."""
        assert self._shape is not None and self._feature_dtype is not None and self._device is not None
        compute = torch.promote_types(self._feature_dtype, torch.float32)
        terms = self._terms_here()
        full = torch.zeros((self.max_order + 1, *self._shape), dtype=compute, device=self._device)
        for i, term in enumerate(terms):
            full[i] = weighted_decode([1.0], [term], [self._format(i)], compute)
        self._terms = full
        try:
            yield
            held = max(size for _, size, _ in self._row_meta())
        finally:
            self._terms = None
        if write_back:
            for i in range(held):
                self._store(i, full[i])
