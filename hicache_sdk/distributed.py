"""Several processes, one generation: the reduction point on ``torch.distributed``.

Under context parallelism (diffusers' ``enable_parallelism`` with a ``ContextParallelConfig``) each
process holds a shard of every unit's tokens: it caches and forecasts its own shard, with no
gather. A policy that decides from tensor values reduces its sufficient statistics (sums,
numerator and denominator stacked) through ``ctx.reduce``; :class:`AllReduce` sums them over the
processes holding the shards, so that every process compares the same global value with its
threshold and takes the same decision, the one a single process would take. Fixed-interval
policies reduce nothing and communicate nothing.

``Accelerator.apply`` uses :class:`AllReduce` over the model's context-parallel group by itself when
the model has one, after checking that every process composed the same accelerator
(:func:`check_same_configuration`).
"""

from __future__ import annotations

import hashlib
import socket
import time
from typing import Any

import torch

from .errors import InvalidParameterError

__all__ = [
    "AllReduce",
    "check_divisible_inputs",
    "check_same_configuration",
    "context_parallel_group",
    "enable_context_parallel",
    "free_port",
]


class AllReduce:
    """A reducer (:data:`~hicache_sdk.decision.Reducer`) summing a statistic over a process group.

    Args:
        group: the processes holding shards of the same tokens (``None``: the default group).

    Attributes:
        calls, bytes: all-reduces made and bytes they carried (each process's own count).
        seconds: wall time spent in them (the call returns when the sum is there: gloo, or a
            policy that reads the value at once, as the built-ins do).
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.calls = 0
        self.bytes = 0
        self.seconds = 0.0

    def __call__(self, statistic: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        summed = statistic.detach().contiguous().clone()
        torch.distributed.all_reduce(summed, op=torch.distributed.ReduceOp.SUM, group=self.group)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.bytes += summed.numel() * summed.element_size()
        return summed

    @property
    def world_size(self) -> int:
        """Processes in the group."""
        return int(torch.distributed.get_world_size(self.group))


def free_port() -> int:
    """A TCP port free on this machine now, for a single-machine process group (``MASTER_PORT``)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def context_parallel_group(model: torch.nn.Module) -> Any:
    """The process group of ``model``'s context parallelism (diffusers' ``enable_parallelism``), or ``None``.

    Raises:
        InvalidParameterError: the parallelism splits sequences unevenly (``ulysses_anything`` or
            ``ring_anything``), which the SDK does not follow.
    """
    config = getattr(model, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    if cp is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    if getattr(cp, "ulysses_anything", False) or getattr(cp, "ring_anything", False):
        raise InvalidParameterError(
            "context parallelism with ulysses_anything or ring_anything splits sequences into unequal shards, "
            "which the SDK does not follow; use sequence lengths that divide among the processes instead"
        )
    mesh = getattr(cp, "_flattened_mesh", None) or getattr(cp, "_mesh", None)
    return None if mesh is None else mesh.get_group()


def check_same_configuration(description: str, group: Any = None) -> None:
    """Raise :class:`~hicache_sdk.errors.InvalidParameterError` unless every process of ``group`` gives the
    same ``description`` (e.g. the accelerator's tag): caches configured differently would decide
    differently, and a collective would wait forever."""
    digest = hashlib.sha256(description.encode()).hexdigest()
    gathered: list[Any] = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(gathered, (torch.distributed.get_rank(), digest, description), group=group)
    first_rank, first_digest, first = gathered[0]
    differ = [(rank, text) for rank, d, text in gathered if d != first_digest]
    if differ:
        rank, text = differ[0]
        raise InvalidParameterError(
            f"the processes of one context-parallel group composed different accelerators: rank {first_rank} has "
            f"{first!r}, rank {rank} has {text!r}; compose the same policy, basis and parameters on every rank"
        )


def check_divisible_inputs(model: torch.nn.Module, arguments: dict[str, Any], world: int) -> None:
    """Raise :class:`~hicache_sdk.errors.InvalidParameterError` when an input that ``model``'s context-parallel
    plan splits at its forward does not divide among ``world`` processes (diffusers would assert)."""
    plan = getattr(model, "_cp_plan", None) or {}
    for name, spec in (plan.get("", {}) or {}).items():
        value = arguments.get(name) if isinstance(name, str) else None
        dim = getattr(spec, "split_dim", None)
        expected = getattr(spec, "expected_dims", None)
        if not isinstance(value, torch.Tensor) or dim is None or (expected is not None and value.dim() != expected):
            continue  # diffusers does not split it either
        if value.dim() > dim and value.shape[dim] % world:
            raise InvalidParameterError(
                f"context parallelism over {world} processes splits {name!r} along dimension {dim}, of size "
                f"{value.shape[dim]} here ({tuple(value.shape)}): it must be a multiple of {world}"
            )


def enable_context_parallel(
    model: torch.nn.Module, *, ulysses_degree: int = 1, ring_degree: int = 1, **options: Any
) -> None:
    """``model.enable_parallelism`` with a ``ContextParallelConfig``, also on a CPU-only torch.

    diffusers picks each process's device as ``rank % torch.accelerator.device_count()``, which
    divides by zero without an accelerator. On such a machine this makes that count 1 while
    parallelism is enabled, and changes nothing else: the attention all-to-alls then run on gloo.
    With an accelerator it is ``enable_parallelism`` itself. ``options`` go to ``ContextParallelConfig``.
    """
    from diffusers import ContextParallelConfig

    config = ContextParallelConfig(ulysses_degree=ulysses_degree, ring_degree=ring_degree, **options)
    enable: Any = model.enable_parallelism
    accelerator: Any = torch.accelerator
    if accelerator.device_count() > 0:
        enable(config=config)
        return
    count = accelerator.device_count
    accelerator.device_count = lambda: 1
    try:
        enable(config=config)
    finally:
        accelerator.device_count = count
