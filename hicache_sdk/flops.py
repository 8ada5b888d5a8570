"""FLOP counting with torch's ``FlopCounterMode``, including CPU attention kernels."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import flop_counter

__all__ = ["flop_counter_mode"]


def _sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    return int(flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape))


def _extra_formulas() -> dict[Any, Any]:
    ops: dict[Any, Any] = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:  # not counted by torch itself
        ops[cpu_sdpa] = _sdpa_flops
    return ops


def flop_counter_mode() -> flop_counter.FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts CPU scaled-dot-product attention."""
    return flop_counter.FlopCounterMode(display=False, custom_mapping=_extra_formulas())
