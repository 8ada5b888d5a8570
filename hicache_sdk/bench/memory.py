"""The memory a cache holds, measured: bytes of tensors reachable from a model's non-parameter state.

One walker serves every cache library: it starts from the attributes of every submodule (where
diffusers keeps its hook registries, this SDK its runtime and cache-dit its patched forwards and
contexts), follows containers, objects, bound methods, ``functools.partial`` and closures, never
enters another ``torch.nn.Module`` (each module is a root of its own) and counts each tensor
storage once, leaving out the model's parameters and buffers.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = ["PeakCacheBytes", "cache_bytes", "reachable_tensor_bytes"]

_ATOMS = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device, torch.Generator, type)
_OPAQUE = (types.ModuleType, types.BuiltinFunctionType, types.CodeType, types.FrameType)


def _children(obj: Any) -> Iterator[Any]:
    """What ``obj`` refers to, for the walk (nothing for atoms, modules and code)."""
    if isinstance(obj, dict):
        yield from obj.keys()
        yield from obj.values()
    elif isinstance(obj, (list, tuple, set, frozenset)):
        yield from obj
    elif isinstance(obj, types.MethodType):
        yield obj.__self__
    elif isinstance(obj, types.FunctionType):
        for cell in obj.__closure__ or ():
            try:
                yield cell.cell_contents
            except ValueError:  # an empty cell
                continue
    elif isinstance(obj, functools.partial):
        yield from obj.args
        yield obj.keywords
        yield obj.func
    else:
        if hasattr(obj, "__dict__"):
            yield from vars(obj).values()
        for slot in getattr(type(obj), "__slots__", ()):
            if isinstance(slot, str) and hasattr(obj, slot):
                yield getattr(obj, slot)


def reachable_tensor_bytes(roots: Iterable[Any], *, exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct tensor storages reachable from ``roots``, without those of ``exclude``.

    Modules met on the way are not entered; a storage shared by several views counts once, whole.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if isinstance(obj, _ATOMS) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "meta":
                storage = obj.untyped_storage()
                if storage.data_ptr() not in excluded:
                    storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
            continue
        if isinstance(obj, (torch.nn.Module, *_OPAQUE)):
            continue
        stack.extend(_children(obj))
    return sum(storages.values())


def cache_bytes(model: torch.nn.Module) -> int:
    """Bytes held in ``model``'s non-parameter state: what caches attached to it keep (0 for a bare model)."""
    roots = [vars(module) for module in model.modules()]
    return reachable_tensor_bytes(roots, exclude=[*model.parameters(), *model.buffers()])


class PeakCacheBytes:
    """Largest :func:`cache_bytes` of ``model`` seen around any of its forwards while attached.

    Some caches drop their state at the end of a generation (diffusers' MagCache), so the peak is
    taken before and after every forward. Walking costs time: keep it out of timed runs.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.peak = 0
        self._handles: list[Any] = []

    def _sample(self, *args: Any) -> None:
        self.peak = max(self.peak, cache_bytes(self.model))

    def __enter__(self) -> PeakCacheBytes:
        self._handles = [
            self.model.register_forward_pre_hook(self._sample),
            self.model.register_forward_hook(self._sample),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
