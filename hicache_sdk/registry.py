"""The plugin registry: loads ``hicache`` entry points once and keeps name-keyed registries."""

from __future__ import annotations

import os
import threading
import warnings
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
    PluginLoadError,
    PluginLoadWarning,
    PluginRegistrationError,
    UnknownPluginError,
)
from .policy import Policy

__all__ = [
    "AUTOLOAD_ENV",
    "DISTRIBUTION",
    "ENTRY_POINT_GROUP",
    "STRICT_ENV",
    "PluginProblem",
    "PluginRegistry",
    "Registration",
    "entry_points_of_group",
    "get_registry",
]

ENTRY_POINT_GROUP = "hicache"
DISTRIBUTION = "hicache-sdk"
#: Set to ``1`` to load only the built-in plugins, none of the third-party entry points.
AUTOLOAD_ENV = "HICACHE_DISABLE_PLUGIN_AUTOLOAD"
#: Set to ``1`` to make any third-party plugin that fails to load an error (default: a warning).
STRICT_ENV = "HICACHE_STRICT_PLUGINS"

T = TypeVar("T")


@attrs.frozen
class Registration(Generic[T]):
    """One registered basis, policy or adapter and where it came from."""

    kind: str
    name: str
    obj: type[T]
    plugin: str
    distribution: str


@attrs.frozen
class PluginProblem:
    """A third-party plugin, or one of its registrations, that was not loaded, and why.

    Attributes:
        plugin: the plugin's name (``distribution:entry-point`` for third-party entry points).
        distribution: the distribution and version that provides it.
        problem: what went wrong (an import error, a misspelled hook, a duplicated name...).
        names: the ``(kind, name)`` registrations concerned, where known.
    """

    plugin: str
    distribution: str
    problem: str
    names: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return f"plugin {self.plugin!r} ({self.distribution}): {self.problem}"


_KINDS: dict[str, tuple[str, type]] = {
    "basis": ("hicache_register_bases", Basis),
    "policy": ("hicache_register_policies", Policy),
    "adapter": ("hicache_register_adapters", Adapter),
}


def _flag(env: str) -> bool:
    return os.environ.get(env, "").strip().lower() not in ("", "0", "false", "no")


def entry_points_of_group() -> list[metadata.EntryPoint]:
    """The installed ``hicache`` entry points (one seam, so a test suite can hide the environment's)."""
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


class _Refused(Exception):
    """A registration refused by a plugin-side rule (wrapped into a :class:`HicacheError` by the caller)."""


class PluginRegistry:
    """Owns the pluggy manager and the three name-keyed registries.

    Entry points load lazily on first use and once. Programmatic plugins can be added with
    :meth:`register_plugin` (e.g. in a notebook or a test).

    A third-party entry point that fails (it does not import, misspells a hook, registers
    something that is not a basis / policy / adapter, or raises) is left out with a
    :class:`~hicache_sdk.PluginLoadWarning` naming its distribution and the problem; every other
    plugin loads. A third-party name that duplicates a built-in one is refused (the built-in stays);
    two third-party plugins with one name make that name an error when requested
    (:class:`~hicache_sdk.DuplicatePluginError` naming both). With ``HICACHE_STRICT_PLUGINS=1`` any
    such problem is a :class:`~hicache_sdk.PluginLoadError` instead. A plugin added with
    :meth:`register_plugin` is always checked strictly: its problem is raised to the caller.
    """

    def __init__(self) -> None:
        self.manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.manager.add_hookspecs(hookspecs)
        self._registrations: dict[str, list[Registration[Any]]] = {}  # per plugin, in loading order
        self._builtin: set[str] = set()
        self._entries: dict[str, dict[str, Registration[Any]]] | None = None
        self._ambiguous: dict[tuple[str, str], list[Registration[Any]]] = {}
        self.problems: list[PluginProblem] = []
        self._loaded = False
        self._lock = threading.RLock()

    # -- loading ---------------------------------------------------------------------------
    def load_entry_points(self) -> None:
        """Load the ``hicache`` entry points (built-ins always; third-party unless disabled)."""
        with self._lock:
            if self._loaded:
                return
            skip_third_party = _flag(AUTOLOAD_ENV)
            found_builtin = False
            found = [
                (ep, ep.dist.metadata["Name"] if ep.dist is not None else "<unknown>") for ep in entry_points_of_group()
            ]
            found.sort(key=lambda item: item[1] != DISTRIBUTION)  # built-ins first: they win every name
            for ep, dist_name in found:
                dist = ep.dist
                builtin = dist_name == DISTRIBUTION
                found_builtin |= builtin
                if skip_third_party and not builtin:
                    continue
                plugin_name = ep.name if builtin else f"{dist_name}:{ep.name}"
                if self.manager.has_plugin(plugin_name):
                    continue
                label = f"{dist_name} {dist.version}" if dist is not None else dist_name
                if builtin:
                    self._builtin.add(plugin_name)
                    self._add(ep.load(), plugin_name, label, strict=True)
                    continue
                try:
                    plugin = ep.load()
                except Exception as exc:  # a broken third-party package must not take the others down
                    self._report(PluginProblem(plugin_name, label, f"failed to import {ep.value!r}: {_describe(exc)}"))
                    continue
                self._add(plugin, plugin_name, label, strict=False)
            if not found_builtin:
                raise HicacheError(
                    f"no built-in plugins found in entry-point group {ENTRY_POINT_GROUP!r}: "
                    f"install the {DISTRIBUTION} distribution (e.g. `pip install -e .` in its clone)"
                )
            self._loaded = True

    def register_plugin(self, plugin: object, name: str | None = None, distribution: str = "<runtime>") -> str:
        """Register a plugin object (module or instance with hook implementations); return its name.

        Checked strictly: any problem (a misspelled hook, a bad or duplicated registration) raises
        and leaves the registry as it was.
        """
        with self._lock:
            self.load_entry_points()
            plugin_name = name or getattr(plugin, "__name__", None) or repr(plugin)
            self._add(plugin, plugin_name, distribution, strict=True)
            return plugin_name

    def unregister_plugin(self, name: str) -> None:
        """Remove a plugin registered under ``name`` and everything it registered."""
        with self._lock:
            if self.manager.unregister(name=name) is None:
                raise UnknownPluginError("plugin", name, [n for n, _ in self.manager.list_name_plugin()])
            self._registrations.pop(name, None)
            self._entries = None

    def _add(self, plugin: object, plugin_name: str, distribution: str, *, strict: bool) -> None:
        """Register ``plugin`` with pluggy and collect what it registers; on a problem raise (strict) or warn."""
        try:
            self.manager.register(plugin, name=plugin_name)
        except Exception as exc:
            # pluggy < 1.7 leaves a plugin whose hook fails validation half-registered
            if self.manager.get_plugin(plugin_name) is plugin:
                self.manager.unregister(name=plugin_name)
            self._fail(strict, exc, PluginProblem(plugin_name, distribution, _describe(exc)))
            return
        attempted: list[tuple[str, str]] = []
        try:
            self.manager.check_pending()
            registrations = self._collect_plugin(plugin_name, distribution, attempted)
        except Exception as exc:
            self.manager.unregister(name=plugin_name)
            self._fail(strict, exc, PluginProblem(plugin_name, distribution, _describe(exc), tuple(attempted)))
            return
        clashes = self._clashes(registrations)
        if clashes and (strict or _flag(STRICT_ENV)):
            self.manager.unregister(name=plugin_name)
            first, new = clashes[0]
            raise _duplicate(first.kind, first.name, [first, new])
        self._registrations[plugin_name] = registrations
        self._entries = None
        for first, new in clashes:
            kept = "the built-in one is kept" if first.plugin in self._builtin else "requesting it is an error"
            self._report(
                PluginProblem(
                    plugin_name,
                    distribution,
                    f"its {new.kind} {new.name!r} duplicates the one of plugin {first.plugin!r} "
                    f"({first.distribution}); {kept}",
                    ((new.kind, new.name),),
                )
            )

    def _fail(self, strict: bool, exc: Exception, problem: PluginProblem) -> None:
        if strict:
            if isinstance(exc, _Refused):
                raise exc.args[0] from None
            raise exc
        self._report(problem)

    def _report(self, problem: PluginProblem) -> None:
        if _flag(STRICT_ENV):
            raise PluginLoadError(f"{problem} ({STRICT_ENV} is set: plugin problems are errors)")
        self.problems.append(problem)
        warnings.warn(f"{problem}; the other plugins are loaded", PluginLoadWarning, stacklevel=4)

    # -- collection ------------------------------------------------------------------------
    def _collect_plugin(
        self, plugin_name: str, distribution: str, attempted: list[tuple[str, str]]
    ) -> list[Registration[Any]]:
        """Run one plugin's registration hooks; its registrations, validated (raises on the first problem)."""
        registrations: list[Registration[Any]] = []
        for kind, (hook_name, base) in _KINDS.items():
            caller = getattr(self.manager.hook, hook_name)
            for impl in caller.get_hookimpls():
                if impl.plugin_name != plugin_name:
                    continue
                register = self._make_register(kind, base, plugin_name, distribution, registrations, attempted)
                impl.function(**{arg: register for arg in impl.argnames})
        return registrations

    def _make_register(
        self,
        kind: str,
        base: type,
        plugin_name: str,
        dist: str,
        registrations: list[Registration[Any]],
        attempted: list[tuple[str, str]],
    ) -> Callable[[Any], None]:
        def register(obj: Any) -> None:
            name = getattr(obj, "name", None)
            if isinstance(name, str):
                attempted.append((kind, name))
            concrete = isinstance(obj, type) and issubclass(obj, base) and not getattr(obj, "__abstractmethods__", ())
            if not concrete:
                raise _Refused(
                    PluginRegistrationError(
                        f"plugin {plugin_name!r} ({dist}) registered {obj!r} as a {kind}; expected a concrete "
                        f"subclass of hicache_sdk.{base.__name__}"
                    )
                )
            if not isinstance(name, str) or not name.isidentifier():
                raise _Refused(
                    PluginRegistrationError(
                        f"plugin {plugin_name!r} ({dist}) registered {kind} {obj.__qualname__} with name "
                        f"{name!r}; expected a `name` class attribute that is a Python identifier"
                    )
                )
            if kind == "policy":
                _check_policy_config(obj, plugin_name, dist)
            new = Registration(kind, name, obj, plugin_name, dist)
            twin = next((r for r in registrations if (r.kind, r.name) == (kind, name)), None)
            if twin is not None:
                raise _Refused(_duplicate(kind, name, [twin, new]))
            registrations.append(new)

        return register

    def _clashes(self, registrations: list[Registration[Any]]) -> list[tuple[Registration[Any], Registration[Any]]]:
        """Pairs (registered earlier, new) of registrations with the same kind and name."""
        earlier = {(r.kind, r.name): r for regs in self._registrations.values() for r in regs}
        return [(earlier[r.kind, r.name], r) for r in registrations if (r.kind, r.name) in earlier]

    def _merged(self) -> dict[str, dict[str, Registration[Any]]]:
        """Name-keyed registries: the first plugin's registration wins over a third party's duplicate
        of a built-in; a name two third-party plugins share is left out (and recorded as ambiguous)."""
        if self._entries is not None:
            return self._entries
        entries: dict[str, dict[str, Registration[Any]]] = {kind: {} for kind in _KINDS}
        ambiguous: dict[tuple[str, str], list[Registration[Any]]] = {}
        for regs in self._registrations.values():
            for reg in regs:
                table = entries[reg.kind]
                first = table.get(reg.name)
                if (reg.kind, reg.name) in ambiguous:
                    ambiguous[reg.kind, reg.name].append(reg)
                elif first is None:
                    table[reg.name] = reg
                elif first.plugin not in self._builtin:
                    ambiguous[reg.kind, reg.name] = [table.pop(reg.name), reg]
        self._entries, self._ambiguous = entries, ambiguous
        return entries

    # -- access ----------------------------------------------------------------------------
    def entries(self, kind: str) -> dict[str, Registration[Any]]:
        """All registrations of ``kind`` (``basis``, ``policy`` or ``adapter``) by name."""
        with self._lock:
            self.load_entry_points()
            return dict(self._merged()[kind])

    def get(self, kind: str, name: str) -> Registration[Any]:
        """The registration of ``kind`` named ``name``.

        Raises:
            UnknownPluginError: nothing is registered under that name (it lists what is, and the
                plugins that failed to load).
            DuplicatePluginError: two third-party plugins registered that name.
        """
        table = self.entries(kind)
        if name in table:
            return table[name]
        with self._lock:
            clash = self._ambiguous.get((kind, name))
        if clash:
            raise _duplicate(kind, name, clash)
        raise UnknownPluginError(kind, name, table, problems=[str(p) for p in self.problems_for(kind, name)])

    def problems_for(self, kind: str, name: str) -> list[PluginProblem]:
        """The load problems that concern ``name`` (or could: plugins that failed before registering anything)."""
        return [p for p in self.problems if (kind, name) in p.names or not p.names]

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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, _Refused):
        exc = exc.args[0]
    return f"{type(exc).__name__}: {exc}"


def _duplicate(kind: str, name: str, regs: list[Registration[Any]]) -> DuplicatePluginError:
    first, second = regs[0], regs[1]
    return DuplicatePluginError(
        f"{kind} name {name!r} is registered twice: by plugin {first.plugin!r} "
        f"({first.distribution}) as {first.obj.__module__}.{first.obj.__qualname__} and by "
        f"plugin {second.plugin!r} ({second.distribution}) as {second.obj.__module__}.{second.obj.__qualname__}"
    )


def _check_policy_config(cls: type, plugin_name: str, dist: str) -> None:
    """A policy's ``Config`` must be a frozen attrs class constructible with its defaults."""
    config = getattr(cls, "Config", None)
    where = f"plugin {plugin_name!r} ({dist}) registered policy {cls.__qualname__}"
    if not (isinstance(config, type) and attrs.has(config)):
        raise _Refused(PluginRegistrationError(f"{where} whose `Config` is {config!r}; expected a frozen attrs class"))
    try:
        instance = config()
    except Exception as exc:
        raise _Refused(
            PluginRegistrationError(f"{where}: its Config() must build with defaults for every field ({exc})")
        ) from None
    try:
        setattr(instance, "__hicache_probe__", None)  # noqa: B010 (a frozen class refuses any attribute)
    except attrs.exceptions.FrozenInstanceError:
        return
    except AttributeError:
        pass
    raise _Refused(
        PluginRegistrationError(f"{where} whose Config {config.__qualname__} is not frozen; use @attrs.frozen")
    )


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
