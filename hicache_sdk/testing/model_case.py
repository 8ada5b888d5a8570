"""A tiny model of one family and how to call it: what the adapter contract kit runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch

__all__ = ["ModelCase", "cast_floating", "main_output"]


def main_output(output: Any) -> torch.Tensor:
    """The model's main output: a tensor, the first item of a tuple or list, or an output object's ``sample``.

    A list of per-sample tensors of one shape (Z-Image) is stacked.
    """
    if isinstance(output, torch.Tensor):
        return output
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(output, (tuple, list)) and output:
        first = output[0]
        if isinstance(first, torch.Tensor):
            return first
        if isinstance(first, (tuple, list)) and first and all(isinstance(t, torch.Tensor) for t in first):
            return torch.stack(list(first))
    raise TypeError(f"cannot find the main output in a {type(output).__name__}")


@attrs.frozen
class ModelCase:
    """A tiny random-weight model of one family, and the arguments of one denoising step.

    Attributes:
        family: the name of the adapter that must serve this model when none is named.
        build: returns the model in float32 and eval mode, with the same weights at every call
            (it seeds its own generator).
        inputs: ``inputs(batch, sigma, seed)`` returns the forward's keyword arguments in float32 for
            ``batch`` samples at noise level ``sigma`` in (0, 1] (converted to the family's own
            timestep convention); the same ``seed`` gives the same latents and conditioning.
        output: picks the main output tensor from what the forward returns.
    """

    family: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[int, float, int], dict[str, Any]]
    output: Callable[[Any], torch.Tensor] = main_output


def cast_floating(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with every floating tensor (also inside lists, tuples and dicts) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(cast_floating(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: cast_floating(v, dtype) for k, v in value.items()}
    return value
