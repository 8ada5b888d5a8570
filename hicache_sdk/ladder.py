"""The finite-difference ladder: the forecasting state of one cached unit.

At each full step (an *anchor*) at step ``s_j`` with the previous anchor at ``s_{j-1}``::

    new D^0     = F(s_j)
    new D^{i+1} = (new D^i - old D^i) / (s_j - s_{j-1})

using the real spacing, and only for orders the old ladder already held: the ladder grows by at
most one order per anchor, up to ``max_order``. A forecast ``k`` steps after the newest anchor is
``sum_i w_i(k, h) D^i`` with the weights of a :class:`~hicache_sdk.basis.Basis`.

Samples of a batch may be anchored at different steps (a policy that computes some samples and
forecasts others): each sample then keeps its own newest step, order and spacing, and a forecast
applies each sample's weights to its own rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .basis import Basis
from .errors import InvalidParameterError
from .storage import EncodedTerm, parse_format, weighted_decode
from .validation import check_int

_PLAIN_FORMATS = {dtype: parse_format(dtype) for dtype in (torch.bfloat16, torch.float16)}

__all__ = ["DifferenceLadder", "weighted_sum"]


def weighted_sum(weights: Sequence[float], terms: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``sum_i weights[i] * terms[i]`` computed in float32 (at least), returned in ``dtype``.

    One multiply-add per order with host-side scalar weights: no temporaries beyond the output,
    no host-device transfer and no synchronisation. A weight beyond the compute dtype's range gives
    a non-finite result (as the multiplication would), not an error.
    """
    compute_dtype = torch.promote_types(dtype, torch.float32)
    if terms.device.type == "cpu" and terms.dtype != compute_dtype and terms.dtype in _PLAIN_FORMATS:
        # on CPU a mixed-dtype multiply-add is slow: decode in cache-sized chunks (the same arithmetic)
        fmt = _PLAIN_FORMATS[terms.dtype]
        return weighted_decode(
            weights, [EncodedTerm(terms[i]) for i in range(len(weights))], [fmt] * len(weights), dtype
        )
    largest = torch.finfo(compute_dtype).max
    out = terms[0].to(compute_dtype, copy=True)
    if weights[0] != 1.0:
        out.mul_(weights[0])
    for i in range(1, len(weights)):
        if weights[i] == 0.0:
            continue
        if abs(weights[i]) <= largest:
            out.add_(terms[i], alpha=weights[i])
        else:  # add_ refuses an alpha it cannot represent; the product overflows (inf, or nan on zeros)
            out.add_(terms[i].to(compute_dtype) * weights[i])
    return out if out.dtype == dtype else out.to(dtype)


class DifferenceLadder:
    """Ladder ``D^0 .. D^m`` of one unit, stored in one tensor of shape ``(m + 1, *feature_shape)``.

    Args:
        max_order: highest order ``m >= 0`` kept.
        storage_dtype: dtype the ladder is stored in (e.g. ``torch.bfloat16`` to halve memory);
            ``None`` keeps the feature's dtype. Updates and forecasts compute in float32 (float64
            for float64 features).
    """

    def __init__(self, max_order: int, storage_dtype: torch.dtype | None = None) -> None:
        self.max_order = check_int("max_order", max_order, minimum=0)
        self.storage_dtype = storage_dtype
        self.reset()

    def reset(self) -> None:
        """Forget every anchor (the state of a fresh ladder)."""
        self._terms: torch.Tensor | None = None
        self._size = 0
        self._last_step: int | None = None
        self._spacing: float | None = None
        self._feature_dtype: torch.dtype | None = None
        # per-sample (last step, size, spacing) once samples were anchored apart; None: shared
        self._rows: list[tuple[int, int, float | None]] | None = None

    @property
    def order(self) -> int:
        """Highest order currently held (the lowest over samples anchored apart); ``-1`` before the first anchor."""
        if self._rows is not None:
            return min(size for _, size, _ in self._rows) - 1
        return self._size - 1

    @property
    def last_step(self) -> int | None:
        """Step of the newest anchor (the newest over samples anchored apart)."""
        if self._rows is not None:
            return max(last for last, _, _ in self._rows)
        return self._last_step

    @property
    def spacing(self) -> float | None:
        """Steps between the two newest anchors (``None`` with fewer than two)."""
        return self._spacing

    @property
    def nbytes(self) -> int:
        """Bytes held by the ladder's storage."""
        return 0 if self._terms is None else self._terms.numel() * self._terms.element_size()

    @property
    def device_nbytes(self) -> int:
        """Bytes held on the features' device (all of them, unless the ladder is offloaded)."""
        return self.nbytes

    def prefetch(self) -> None:
        """Bring the terms to the features' device ahead of use (a no-op: this ladder never leaves it)."""

    def term(self, i: int) -> torch.Tensor:
        """The stored ``D^i``.

        Here a view of the storage; a ladder held in another format returns a decoded copy. To edit
        a term (ClusCa's refresh does), edit what this returns and hand it to :meth:`set_term`,
        which costs nothing when it is the view.
        """
        if self._terms is None or not 0 <= i < self._size:
            raise IndexError(f"ladder holds orders 0..{self.order}, asked for {i}")
        return self._terms[i]

    def set_term(self, i: int, value: torch.Tensor) -> None:
        """Replace the stored ``D^i`` by ``value`` (of the feature's shape)."""
        stored = self.term(i)
        if value.data_ptr() != stored.data_ptr() or value.dtype != stored.dtype:
            stored.copy_(value)

    def update(
        self, feature: torch.Tensor, step: int, *, extend: bool = True, rows: torch.Tensor | None = None
    ) -> None:
        """Record ``feature`` computed at ``step`` as the newest anchor.

        With ``extend=False`` the ladder restarts from this anchor (order 0), as during warm-up.
        With ``rows`` (a 1-D index of samples, on the host) ``feature`` holds only those samples of
        the batch, and only their ladders move.
        """
        step = check_int("step", step)
        if rows is not None or self._rows is not None:
            self._update_rows(feature, step, extend, rows)
            return
        if self._last_step is not None and step <= self._last_step:
            raise InvalidParameterError(f"anchor step must increase: got {step} after {self._last_step}")
        if self._terms is not None and feature.shape != self._terms.shape[1:]:
            raise InvalidParameterError(
                f"feature shape changed from {tuple(self._terms.shape[1:])} to {tuple(feature.shape)} without a reset"
            )
        if self._terms is None:
            dtype = self.storage_dtype or feature.dtype
            self._terms = torch.empty((self.max_order + 1, *feature.shape), dtype=dtype, device=feature.device)
        grow = extend and self._size > 0 and self.max_order > 0
        new_size = min(self._size + 1, self.max_order + 1) if grow else 1
        if grow:
            assert self._last_step is not None
            spacing = float(step - self._last_step)
            # float32 at least; float64 when the feature or the storage is float64
            compute_dtype = torch.promote_types(torch.promote_types(feature.dtype, self._terms.dtype), torch.float32)
            if feature.dtype == self._terms.dtype == compute_dtype and not feature.requires_grad:
                self._update_in_place(feature, spacing, new_size)
            else:
                new = feature.to(compute_dtype)
                for i in range(new_size):
                    # the next difference needs the old D^i: take it before D^i is overwritten
                    following = (new - self._terms[i].to(compute_dtype)) / spacing if i + 1 < new_size else None
                    self._terms[i].copy_(new)
                    if following is not None:
                        new = following
            self._spacing = spacing
        else:
            self._terms[0].copy_(feature)
            self._spacing = None
        self._size = new_size
        self._last_step = step
        self._feature_dtype = feature.dtype

    def _update_in_place(self, feature: torch.Tensor, spacing: float, new_size: int) -> None:
        """The update without temporaries, when the storage is the compute dtype (and no gradient flows).

        Unrolling the recurrence, ``new D^j = (F - sum_{i<j} spacing^i D^i) / spacing^j`` needs only
        old terms of lower order, so the orders are written from the top down, each into its own
        slot: no feature-sized allocation (on CPU those page-fault), the same value up to rounding.
        """
        assert self._terms is not None
        terms = self._terms
        for j in range(new_size - 1, 0, -1):
            torch.sub(feature, terms[0], out=terms[j])
            for i in range(1, j):
                terms[j].sub_(terms[i], alpha=spacing**i)
            if spacing != 1.0:
                terms[j].div_(spacing**j)
        terms[0].copy_(feature)

    def forecast(self, step: int, basis: Basis) -> torch.Tensor:
        """The basis forecast of the feature at ``step`` (after the newest anchor), in the feature's dtype."""
        if self._terms is None or self._last_step is None or self._feature_dtype is None:
            raise RuntimeError("cannot forecast from an empty ladder: no anchor was recorded")
        if self._rows is not None:
            return self._forecast_rows(step, basis)
        offset = step - self._last_step
        weights = basis.weights(offset, self.order, self._spacing or 1.0)
        return weighted_sum(weights, self._terms, self._feature_dtype)

    # -- samples anchored at different steps ------------------------------------------------------
    def _row_meta(self) -> list[tuple[int, int, float | None]]:
        if self._rows is not None:
            return self._rows
        assert self._terms is not None and self._last_step is not None
        return [(self._last_step, self._size, self._spacing)] * int(self._terms.shape[1])

    def _update_rows(self, feature: torch.Tensor, step: int, extend: bool, rows: torch.Tensor | None) -> None:
        if self._terms is None:
            raise RuntimeError("a ladder's first anchor must hold every sample (rows=None)")
        meta = list(self._row_meta())
        index = list(range(len(meta))) if rows is None else [int(r) for r in rows.tolist()]
        if feature.shape[0] != len(index) or feature.shape[1:] != self._terms.shape[2:]:
            raise InvalidParameterError(
                f"feature of shape {tuple(feature.shape)} does not fit {len(index)} samples of "
                f"{tuple(self._terms.shape[2:])}"
            )
        groups: dict[tuple[int, int], list[int]] = {}
        for position, row in enumerate(index):
            last, size, _ = meta[row]
            if step <= last:
                raise InvalidParameterError(f"anchor step must increase: got {step} after {last} (sample {row})")
            groups.setdefault((last, size), []).append(position)
        compute_dtype = torch.promote_types(torch.promote_types(feature.dtype, self._terms.dtype), torch.float32)
        for (last, size), positions in groups.items():
            grow = extend and size > 0 and self.max_order > 0
            new_size = min(size + 1, self.max_order + 1) if grow else 1
            spacing = float(step - last) if grow else None
            sample_rows = torch.tensor([index[p] for p in positions], device=self._terms.device)
            new = feature[torch.tensor(positions, device=feature.device)].to(compute_dtype)
            old = self._terms[:, sample_rows].to(compute_dtype)
            for i in range(new_size):
                following = (new - old[i]) / spacing if i + 1 < new_size and spacing is not None else None
                self._terms[i].index_copy_(0, sample_rows, new.to(self._terms.dtype))
                if following is not None:
                    new = following
            for p in positions:
                meta[index[p]] = (step, new_size, spacing)
        self._feature_dtype = feature.dtype
        first = meta[0]
        if all(m == first for m in meta):  # every sample anchored alike again: back to shared bookkeeping
            self._rows = None
            self._last_step, self._size, self._spacing = first
        else:
            self._rows = meta
            self._last_step = max(last for last, _, _ in meta)

    def _forecast_rows(self, step: int, basis: Basis) -> torch.Tensor:
        assert self._terms is not None and self._rows is not None and self._feature_dtype is not None
        out = torch.empty(self._terms.shape[1:], dtype=self._feature_dtype, device=self._terms.device)
        groups: dict[tuple[int, int, float | None], list[int]] = {}
        for row, meta in enumerate(self._rows):
            groups.setdefault(meta, []).append(row)
        for (last, size, spacing), rows in groups.items():
            weights = basis.weights(step - last, size - 1, spacing or 1.0)
            index = torch.tensor(rows, device=self._terms.device)
            out.index_copy_(0, index, weighted_sum(weights, self._terms[:size, index], self._feature_dtype))
        return out
