"""hicache-sdk: training-free acceleration of diffusion transformers by feature caching.

Compose a cache policy with a forecaster basis and attach it to a diffusers pipeline::

    import hicache_sdk as sdk

    with sdk.compose("clusca", basis="hermite").apply(pipe) as handle:
        image = pipe(prompt).images[0]
        print(handle.summary())

Bases, policies and adapters are plugins registered through the ``hicache`` entry-point group;
the built-in ones are registered the same way.
"""

from __future__ import annotations

from typing import Any

from .errors import (
    AdapterMismatchError,
    AlreadyAttachedError,
    CacheConflictError,
    DuplicatePluginError,
    ForecastLayoutError,
    HicacheError,
    InvalidParameterError,
    PluginLoadError,
    PluginLoadWarning,
    PluginRegistrationError,
    UnknownPluginError,
)
from .hookspecs import hookimpl, hookspec

__version__ = "0.1.0"

__all__ = [
    "Accelerator",
    "Adapter",
    "AdapterMismatchError",
    "AlreadyAttachedError",
    "Basis",
    "CacheConflictError",
    "CacheHandle",
    "DuplicatePluginError",
    "ForecastLayoutError",
    "HicacheError",
    "InvalidParameterError",
    "PluginLoadError",
    "PluginLoadWarning",
    "PluginProblem",
    "PluginRegistrationError",
    "Policy",
    "Registration",
    "RunSummary",
    "TokenPath",
    "UnknownPluginError",
    "__version__",
    "compose",
    "get_adapter",
    "get_basis",
    "get_policy",
    "hookimpl",
    "hookspec",
    "list_adapters",
    "list_bases",
    "list_plugin_problems",
    "list_plugins",
    "list_policies",
    "register_plugin",
]

# hookimpl must be importable before the modules below (plugins import it from here)
from .accelerator import Accelerator, CacheHandle, compose
from .adapter import Adapter
from .basis import Basis
from .policy import Policy, TokenPath
from .registry import PluginProblem, Registration, get_registry
from .summary import RunSummary


def get_basis(name: str) -> type[Basis]:
    """The basis class registered as ``name``; call it with its parameters to get a basis."""
    return get_registry().get("basis", name).obj


def list_bases() -> list[str]:
    """Names of the registered bases, sorted."""
    return sorted(get_registry().entries("basis"))


def get_policy(name: str) -> type[Policy]:
    """The policy class registered as ``name`` (its ``Config`` holds the parameters)."""
    return get_registry().get("policy", name).obj


def list_policies() -> list[str]:
    """Names of the registered policies, sorted."""
    return sorted(get_registry().entries("policy"))


def get_adapter(name: str) -> type[Adapter]:
    """The adapter class registered as ``name``."""
    return get_registry().get("adapter", name).obj


def list_adapters() -> list[str]:
    """Names of the registered adapters, sorted."""
    return sorted(get_registry().entries("adapter"))


def list_plugins() -> list[Registration[Any]]:
    """Every registration (bases, policies, adapters) with its plugin and distribution."""
    registry = get_registry()
    return [reg for kind in ("basis", "policy", "adapter") for reg in registry.entries(kind).values()]


def list_plugin_problems() -> list[PluginProblem]:
    """The third-party plugins (or registrations) left out at loading, each with its distribution and problem."""
    registry = get_registry()
    registry.load_entry_points()
    return list(registry.problems)


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register an in-process plugin object (a module or instance with ``hicache_*`` hooks)."""
    return get_registry().register_plugin(plugin, name)
