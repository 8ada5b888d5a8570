"""The plugin registry: loads ``hicache`` entry points once and keeps name-keyed registries."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from importlib import metadata
from typing import Any, Generic, TypeVar

import attrs
import pluggy

from . import hookspecs
from .adapter import Adapter
from .basis import Basis
from .errors import (
    AdapterMismatchError,
    DuplicatePluginError,
    HicacheError,
    PluginRegistrationError,
    UnknownPluginError,
)
from .policy import Policy

__all__ = [
    "AUTOLOAD_ENV",
    "DISTRIBUTION",
    "ENTRY_POINT_GROUP",
    "PluginRegistry",
    "Registration",
    "get_registry",
]

ENTRY_POINT_GROUP = "hicache"
DISTRIBUTION = "hicache-sdk"
#: Set to ``1`` to load only the built-in plugins, none of the third-party entry points.
AUTOLOAD_ENV = "HICACHE_DISABLE_PLUGIN_AUTOLOAD"

T = TypeVar("T")


@attrs.frozen
class Registration(Generic[T]):
    """One registered basis, policy or adapter and where it came from."""

    kind: str
    name: str
    obj: type[T]
    plugin: str
    distribution: str


_KINDS: dict[str, tuple[str, type]] = {
    "basis": ("hicache_register_bases", Basis),
    "policy": ("hicache_register_policies", Policy),
    "adapter": ("hicache_register_adapters", Adapter),
}


def _autoload_disabled() -> bool:
    return os.environ.get(AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false", "no")


class PluginRegistry:
    """Owns the pluggy manager and the three name-keyed registries.

    Entry points load lazily on first use and once. Programmatic plugins can be added with
    :meth:`register_plugin` (e.g. in a notebook or a test).
    """

    def __init__(self) -> None:
        self.manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.manager.add_hookspecs(hookspecs)
        self._distributions: dict[str, str] = {}
        self._entries: dict[str, dict[str, Registration[Any]]] | None = None
        self._loaded = False
        self._lock = threading.RLock()

    # -- loading ---------------------------------------------------------------------------
    def load_entry_points(self) -> None:
        """Load the ``hicache`` entry points (built-ins always; third-party unless disabled)."""
        with self._lock:
            if self._loaded:
                return
            skip_third_party = _autoload_disabled()
            found_builtin = False
            for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
                dist = ep.dist
                dist_name = dist.metadata["Name"] if dist is not None else "<unknown>"
                builtin = dist_name == DISTRIBUTION
                found_builtin |= builtin
                if skip_third_party and not builtin:
                    continue
                plugin_name = ep.name if builtin else f"{dist_name}:{ep.name}"
                if self.manager.has_plugin(plugin_name):
                    continue
                label = f"{dist_name} {dist.version}" if dist is not None else dist_name
                self._add(ep.load(), plugin_name, label)
            if not found_builtin:
                raise HicacheError(
                    f"no built-in plugins found in entry-point group {ENTRY_POINT_GROUP!r}: "
                    f"install the {DISTRIBUTION} distribution (e.g. `pip install -e .` in its clone)"
                )
            self._loaded = True

    def register_plugin(self, plugin: object, name: str | None = None, distribution: str = "<runtime>") -> str:
        """Register a plugin object (module or instance with hook implementations); return its name."""
        with self._lock:
            self.load_entry_points()
            plugin_name = name or getattr(plugin, "__name__", None) or repr(plugin)
            self._add(plugin, plugin_name, distribution)
            return plugin_name

    def unregister_plugin(self, name: str) -> None:
        """Remove a plugin registered under ``name`` and everything it registered."""
        with self._lock:
            if self.manager.unregister(name=name) is None:
                raise UnknownPluginError("plugin", name, [n for n, _ in self.manager.list_name_plugin()])
            self._distributions.pop(name, None)
            self._entries = None

    def _add(self, plugin: object, plugin_name: str, distribution: str) -> None:
        try:
            self.manager.register(plugin, name=plugin_name)
        except Exception:
            # pluggy < 1.7 leaves a plugin whose hook fails validation half-registered
            if self.manager.get_plugin(plugin_name) is plugin:
                self.manager.unregister(name=plugin_name)
            raise
        try:
            self.manager.check_pending()
            self._distributions[plugin_name] = distribution
            self._entries = None
            self._collect()
        except Exception:
            self.manager.unregister(name=plugin_name)
            self._distributions.pop(plugin_name, None)
            self._entries = None
            raise

    # -- collection ------------------------------------------------------------------------
    def _collect(self) -> dict[str, dict[str, Registration[Any]]]:
        if self._entries is not None:
            return self._entries
        entries: dict[str, dict[str, Registration[Any]]] = {kind: {} for kind in _KINDS}
        for kind, (hook_name, base) in _KINDS.items():
            caller = getattr(self.manager.hook, hook_name)
            for impl in caller.get_hookimpls():  # registration order (pluggy calls them in reverse)
                register = self._make_register(kind, base, impl.plugin_name, entries[kind])
                impl.function(**{arg: register for arg in impl.argnames})
        self._entries = entries
        return entries

    def _make_register(
        self, kind: str, base: type, plugin_name: str, table: dict[str, Registration[Any]]
    ) -> Callable[[Any], None]:
        dist = self._distributions.get(plugin_name, "<runtime>")

        def register(obj: Any) -> None:
            concrete = isinstance(obj, type) and issubclass(obj, base) and not getattr(obj, "__abstractmethods__", ())
            if not concrete:
                raise PluginRegistrationError(
                    f"plugin {plugin_name!r} ({dist}) registered {obj!r} as a {kind}; expected a concrete "
                    f"subclass of hicache_sdk.{base.__name__}"
                )
            name = getattr(obj, "name", None)
            if not isinstance(name, str) or not name.isidentifier():
                raise PluginRegistrationError(
                    f"plugin {plugin_name!r} ({dist}) registered {kind} {obj.__qualname__} with name "
                    f"{name!r}; expected a `name` class attribute that is a Python identifier"
                )
            if name in table:
                first = table[name]
                raise DuplicatePluginError(
                    f"{kind} name {name!r} is registered twice: by plugin {first.plugin!r} "
                    f"({first.distribution}) as {first.obj.__module__}.{first.obj.__qualname__} and by "
                    f"plugin {plugin_name!r} ({dist}) as {obj.__module__}.{obj.__qualname__}"
                )
            table[name] = Registration(kind, name, obj, plugin_name, dist)

        return register

    # -- access ----------------------------------------------------------------------------
    def entries(self, kind: str) -> dict[str, Registration[Any]]:
        """All registrations of ``kind`` (``basis``, ``policy`` or ``adapter``) by name."""
        with self._lock:
            self.load_entry_points()
            return dict(self._collect()[kind])

    def get(self, kind: str, name: str) -> Registration[Any]:
        """The registration of ``kind`` named ``name``; :class:`UnknownPluginError` if none."""
        table = self.entries(kind)
        if name not in table:
            raise UnknownPluginError(kind, name, table)
        return table[name]

    def select_adapter(self, model: Any) -> type[Adapter]:
        """The adapter class for ``model``: the ``hicache_select_adapter`` hook, else the best fit."""
        adapters = self.entries("adapter")
        chosen = self.manager.hook.hicache_select_adapter(model=model)
        if chosen is not None:
            return self.get("adapter", chosen).obj
        fitting = [reg.obj for reg in adapters.values() if reg.obj.fits(model)]
        if not fitting:
            raise AdapterMismatchError(
                f"no registered adapter fits {type(model).__name__}; tried {sorted(adapters)}. "
                "A model needs block lists such as `transformer_blocks` or `blocks` (generic adapter), "
                "or an adapter written for it."
            )
        return max(fitting, key=lambda cls: cls.priority)


_REGISTRY: PluginRegistry | None = None
_REGISTRY_LOCK = threading.Lock()


def get_registry() -> PluginRegistry:
    """The process-wide registry (created on first use; entry points load on first access)."""
    global _REGISTRY
    with _REGISTRY_LOCK:
        if _REGISTRY is None:
            _REGISTRY = PluginRegistry()
        return _REGISTRY


def reset_registry() -> PluginRegistry:
    """Drop the process-wide registry so the next access loads entry points afresh (for tests)."""
    global _REGISTRY
    with _REGISTRY_LOCK:
        _REGISTRY = None
    return get_registry()
