"""Refuse to run beside another feature cache on the same model.

Two caches on one model either both act (diffusers' TaylorSeer hooks the attention modules this
SDK's adapters call, and the output matches neither cache) or one silently bypasses the other (an
adapter that re-expresses a block's forward skips hooks on that block). Neither is acceptable, so
the SDK refuses: :meth:`~hicache_sdk.Accelerator.apply` raises if another cache is enabled, and
while attached, enabling one (``transformer.enable_cache(...)``, or any ``apply_*`` function of
diffusers' hooks, or cache-dit) raises at the call or at the next generation.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import CacheConflictError
from .hooks import HOOK_NAME

__all__ = ["DIFFUSERS_CACHE_MODULES", "check_no_other_cache", "enable_cache_guard", "other_caches"]

#: Modules of ``diffusers.hooks`` whose hooks are feature caches (their hooks are refused beside this SDK's).
DIFFUSERS_CACHE_MODULES: frozenset[str] = frozenset(
    f"diffusers.hooks.{name}"
    for name in (
        "faster_cache",
        "first_block_cache",
        "mag_cache",
        "pyramid_attention_broadcast",
        "sea_cache",
        "taylorseer_cache",
        "text_kv_cache",
    )
)


def other_caches(model: torch.nn.Module) -> list[str]:
    """Descriptions of the feature caches other than this SDK's that act on ``model`` (empty if none)."""
    found: list[str] = []
    config = getattr(model, "_cache_config", None)
    if config is not None:
        found.append(f"diffusers' {type(config).__name__} (enabled with enable_cache)")
    if vars(model).get("_is_cached", False):
        found.append("cache-dit (enabled with cache_dit.enable_cache)")
    hooked: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        for hook_name, hook in registry.hooks.items():
            if hook_name != HOOK_NAME and type(hook).__module__ in DIFFUSERS_CACHE_MODULES:
                hooked.setdefault(hook_name, []).append(name or "<model>")
    for hook_name, where in hooked.items():
        places = ", ".join(where[:3]) + (f" and {len(where) - 3} more" if len(where) > 3 else "")
        found.append(f"diffusers' hook {hook_name!r} on {places}")
    return found


def check_no_other_cache(model: torch.nn.Module, ours: str) -> None:
    """Raise :class:`CacheConflictError` naming both caches if another one acts on ``model``."""
    found = other_caches(model)
    if found:
        raise CacheConflictError(
            f"hicache {ours} cannot run beside another feature cache on this {type(model).__name__}: "
            f"{'; '.join(found)}. Two caches on one model give an output that matches neither (or one "
            "bypasses the other). Disable the other cache first (transformer.disable_cache()) or remove "
            "this accelerator (handle.remove())."
        )


def enable_cache_guard(model: torch.nn.Module, ours: str) -> Any:
    """A replacement for ``model.enable_cache`` that refuses, naming both caches (installed while attached)."""

    def enable_cache(config: Any, *args: Any, **kwargs: Any) -> None:
        raise CacheConflictError(
            f"cannot enable {type(config).__name__} on this {type(model).__name__}: hicache {ours} is attached "
            "to it, and two feature caches on one model give an output that matches neither. Remove the "
            "accelerator first (handle.remove(), or leave its `with` block)."
        )

    return enable_cache
