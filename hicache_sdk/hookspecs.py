"""Hook specifications of the ``hicache`` plugin system.

Plugins are modules (or objects) exposed through the ``hicache`` entry-point group and implement
any of these hooks, decorated with :data:`hicache_sdk.hookimpl`. The built-in bases, policies and
adapters are registered this same way.

Rules that bite (pluggy's): an implementation may accept fewer arguments than the spec; arguments
with default values are never passed; implementations run last-registered first unless marked
``tryfirst``/``trylast``; a misspelled ``hicache_*`` hook name fails loading with an error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import torch

    from .adapter import Adapter
    from .basis import Basis
    from .policy import Policy

__all__ = [
    "PROJECT_NAME",
    "hicache_register_adapters",
    "hicache_register_bases",
    "hicache_register_policies",
    "hicache_select_adapter",
    "hookimpl",
    "hookspec",
]

PROJECT_NAME = "hicache"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def hicache_register_bases(register: Callable[[type[Basis]], None]) -> None:
    """Register forecaster bases.

    Call ``register(cls)`` once per basis class: a subclass of :class:`hicache_sdk.Basis` with a
    unique ``name``.
    """


@hookspec
def hicache_register_policies(register: Callable[[type[Policy]], None]) -> None:
    """Register cache policies.

    Call ``register(cls)`` once per policy class: a subclass of :class:`hicache_sdk.Policy` with a
    unique ``name`` and a ``Config`` attrs class.
    """


@hookspec
def hicache_register_adapters(register: Callable[[type[Adapter]], None]) -> None:
    """Register model adapters.

    Call ``register(cls)`` once per adapter class: a subclass of :class:`hicache_sdk.Adapter` with a
    unique ``name``.
    """


@hookspec(firstresult=True)
def hicache_select_adapter(model: torch.nn.Module) -> str | None:
    """Name the adapter for ``model``, or return ``None`` to leave the choice to others.

    The first non-``None`` answer wins. When every implementation returns ``None``, the registered
    adapter with the highest ``priority`` whose ``fits(model)`` is true is chosen.
    """
