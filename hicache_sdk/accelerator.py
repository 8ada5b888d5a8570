"""``compose()``: one policy with one basis, applied to a diffusers pipeline or transformer."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import attrs
import torch

from .adapter import Adapter
from .basis import Basis
from .coexistence import check_no_other_cache, enable_cache_guard
from .decision import Reducer, local_reduce
from .errors import AdapterMismatchError, AlreadyAttachedError, InvalidParameterError, did_you_mean
from .hooks import StepsProvider, attach_block_forward, attach_step_hook, detach_all, refresh_registry_caches
from .policy import Policy
from .registry import get_registry
from .runtime import FlopTable, Runtime, UnitObserver
from .summary import RunSummary, summarize

__all__ = ["Accelerator", "CacheHandle", "compose", "handle_of"]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_HANDLE_ATTR = "_hicache_handle"
# FLOPs measured per model and adapter, kept across attachments (they do not depend on the policy)
_FLOP_TABLES: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, FlopTable]] = weakref.WeakKeyDictionary()


def parse_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """A storage dtype from a ``torch.dtype``, a name such as ``"bf16"``, or ``None``."""
    if value is None or isinstance(value, torch.dtype):
        if value is not None and not value.is_floating_point:
            raise InvalidParameterError(f"cache_dtype must be a floating dtype, got {value}")
        return value
    if value in _DTYPES:
        return _DTYPES[value]
    raise InvalidParameterError(
        f"cache_dtype must be one of {sorted(_DTYPES)} or a torch.dtype, got {value!r}.{did_you_mean(value, _DTYPES)}"
    )


def find_denoisers(target: Any) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of each denoiser to serve: a pipeline's ``transformer`` (and ``transformer_2``
    when it has one, as Wan 2.2 does), or ``target`` itself if it is a module.

    A lone denoiser is named ``""``; with two, they are named by their attributes.
    """
    first = find_transformer(target)
    second = getattr(target, "transformer_2", None) if first is not target else None
    if isinstance(second, torch.nn.Module):
        return [("transformer", first), ("transformer_2", second)]
    return [("", first)]


def find_transformer(target: Any) -> torch.nn.Module:
    """The denoiser of a pipeline (its ``transformer``) or ``target`` itself if it is a module."""
    inner = getattr(target, "transformer", None)
    if isinstance(inner, torch.nn.Module):
        return inner
    if isinstance(target, torch.nn.Module):
        return target
    raise AdapterMismatchError(
        f"expected a diffusers pipeline with a `transformer` or a torch.nn.Module, got {type(target).__name__}"
    )


@attrs.frozen(kw_only=True)
class Accelerator:
    """A composed caching scheme, ready to :meth:`apply` to any number of models (one at a time each).

    Made by :func:`compose`; holds validated, immutable settings.
    """

    policy_cls: type[Policy]
    config: Any
    basis: Basis
    adapter: str | None = None
    cache_dtype: torch.dtype | None = None
    check_finite: bool = True

    @property
    def tag(self) -> str:
        """E.g. ``taylorseer[hermite(sigma=0.5)](interval=7, warmup=3, schedule='reference', max_order=2)``."""
        return self.policy_cls(self.config, self.basis).tag

    def apply(self, target: Any, *, reduce: Reducer = local_reduce) -> CacheHandle:
        """Attach to a pipeline (its ``transformer``) or a transformer; return the handle.

        Applied to a pipeline, the accelerator also reads the number of steps of each generation
        from the pipeline's scheduler (for an always-full ``tail`` or a few-step guard); applied to
        a bare transformer, a loop that uses them announces it with :meth:`CacheHandle.reset`.

        ``reduce`` is the reduction point of the policy's statistics
        (:mod:`hicache_sdk.decision`): it sums a local statistic over every process holding a
        shard of the tokens, so that all of them take the same decision. The default, for one
        process, returns the statistic unchanged.

        Raises:
            AlreadyAttachedError: the model already has an accelerator (remove it first).
            CacheConflictError: another feature cache (diffusers', cache-dit's) acts on the model.
            AdapterMismatchError: no adapter fits the model, or the named one does not.
            InvalidParameterError: a policy setting does not fit the model (e.g. a block index).
        """
        denoisers = find_denoisers(target)
        for _, model in denoisers:
            if getattr(model, _HANDLE_ATTR, None) is not None:
                raise AlreadyAttachedError(
                    f"an accelerator is already attached to this {type(model).__name__}; call .remove() on its "
                    "handle (or leave its `with` block) before applying another"
                )
        policy = self.policy_cls(self.config, self.basis)
        model = denoisers[0][1]
        flops = _FLOP_TABLES.setdefault(model, {}).setdefault(
            "+".join(self._adapter_class(m, []).name for _, m in denoisers), FlopTable()
        )
        runtime = Runtime(
            policy, cache_dtype=self.cache_dtype, check_finite=self.check_finite, flops=flops, reduce=reduce
        )
        notes: list[str] = []
        adapters: list[Adapter] = []
        steps_of = _scheduler_steps(target, model)
        try:
            for name, denoiser in denoisers:
                check_no_other_cache(denoiser, policy.tag)
                adapter = self._adapter_class(denoiser, notes)(denoiser)
                self._check_fit(policy, adapter)
                if adapter.note:
                    notes.append(adapter.note)
                runtime.generation_checks.append(_cache_check(denoiser, policy.tag))
                runtime.add_model(
                    name,
                    num_blocks=adapter.num_blocks,
                    observed_blocks=adapter.observed_blocks,
                    noise_level=adapter.noise_level,
                )
                for binding in adapter.bindings(runtime):
                    attach_block_forward(binding.block, binding.forward)
                attach_step_hook(denoiser, runtime, steps_of=steps_of, name=name)
                adapters.append(adapter)
        except Exception:
            for _, denoiser in denoisers:
                detach_all(denoiser)
            raise
        handle = CacheHandle(model=model, runtime=runtime, adapter=adapters[0], notes=tuple(notes))
        handle.denoisers = tuple(zip((d for _, d in denoisers), adapters, strict=True))
        for _, denoiser in denoisers:
            refresh_registry_caches(denoiser)
            setattr(denoiser, _HANDLE_ATTR, handle)
            if hasattr(denoiser, "enable_cache"):
                vars(denoiser)["enable_cache"] = enable_cache_guard(denoiser, policy.tag)
        return handle

    def _adapter_class(self, model: torch.nn.Module, notes: list[str]) -> type[Adapter]:
        """The named adapter if it fits ``model``, else the best fit (a fallback says why in ``notes``)."""
        registry = get_registry()
        if self.adapter is not None:
            adapter_cls: type[Adapter] = registry.get("adapter", self.adapter).obj
            if not adapter_cls.fits(model):
                adapter_cls(model)  # an adapter that checks its model raises its own, more specific error
                raise AdapterMismatchError(f"adapter {self.adapter!r} does not fit {type(model).__name__}")
            return adapter_cls
        adapter_cls = registry.select_adapter(model)
        if adapter_cls.priority < 0:
            refused = [
                reason
                for reg in registry.entries("adapter").values()
                if reg.obj.claims(model) and (reason := reg.obj.mismatch(model)) is not None
            ]
            why = "; ".join(refused) if refused else "no specific adapter fits"
            notes.append(f"adapter {adapter_cls.name!r} chosen automatically: {why}")
        return adapter_cls

    @staticmethod
    def _check_fit(policy: Policy, adapter: Adapter) -> None:
        if policy.needs_token_paths and not adapter.provides_token_paths:
            raise AdapterMismatchError(
                f"policy {policy.name!r} recomputes units on chosen tokens; adapter {adapter.name!r} offers no "
                "token-wise units. Use an adapter that does (e.g. 'flux') or a policy without token refresh."
            )
        if policy.needs_batch_split and not adapter.provides_batch_split:
            raise AdapterMismatchError(
                f"policy {policy.name!r} has per_sample=True (decisions per sample of the batch); adapter "
                f"{adapter.name!r} cannot run a unit on a sub-batch. Use an adapter that can (e.g. 'flux') "
                "or per_sample=False."
            )
        policy.check_adapter(adapter)


def _cache_check(model: torch.nn.Module, tag: str) -> Callable[[], None]:
    """Refuse, at each generation's start, another feature cache attached to ``model`` meanwhile."""
    return lambda: check_no_other_cache(model, tag)


def _scheduler_steps(target: Any, model: torch.nn.Module) -> StepsProvider | None:
    """The number of steps of a generation, read from a pipeline's scheduler (``None`` for a bare model).

    A scheduler's ``timesteps`` holds one entry per transformer call (a second-order sampler lists
    its repeated levels), from which an img2img pipeline starts at ``begin_index``.
    """
    if target is model:
        return None

    def steps() -> int | None:
        scheduler = getattr(target, "scheduler", None)  # read at each call: users swap schedulers
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None:
            return None
        begin = getattr(scheduler, "begin_index", None) or 0
        return max(len(timesteps) - int(begin), 0)

    return steps


def handle_of(target: Any) -> CacheHandle | None:
    """The handle of the accelerator attached to ``target`` (a pipeline or a transformer), or ``None``.

    A sampling loop that knows its number of steps announces it with
    ``handle.reset(num_steps=...)`` when an accelerator is attached (the embedded model's
    :func:`~hicache_sdk.models.sample` does).
    """
    handle = getattr(find_transformer(target), _HANDLE_ATTR, None)
    return handle if isinstance(handle, CacheHandle) and handle.attached else None


class CacheHandle:
    """An accelerator attached to one model. Use as a context manager or call :meth:`remove`."""

    def __init__(self, *, model: torch.nn.Module, runtime: Runtime, adapter: Adapter, notes: tuple[str, ...]):
        self.model = model
        self.runtime = runtime
        self.adapter = adapter
        self.notes = notes
        #: ``(model, adapter)`` of every denoiser served (two for a pipeline with ``transformer_2``)
        self.denoisers: tuple[tuple[torch.nn.Module, Adapter], ...] = ((model, adapter),)
        self._attached = True

    @property
    def attached(self) -> bool:
        return self._attached

    def summary(self) -> RunSummary:
        """Summary of the last (or current) generation."""
        policy = self.runtime.policy
        return summarize(
            list(self.runtime.contexts.values()),
            policy=policy.tag,
            basis=policy.basis.tag,
            adapter="+".join(dict.fromkeys(adapter.name for _, adapter in self.denoisers)),
            notes=self.notes,
        )

    def reset(self, num_steps: int | None = None) -> None:
        """End the current generation: the next forward starts afresh.

        Pipelines need not call this (they signal the end of each call, and a failed call ends its
        generation by itself). A bare loop calls it before a generation that the noise-level rule
        cannot tell apart (e.g. one that starts at a lower noise level than the last one ended),
        and passes ``num_steps`` (transformer calls per context) when the policy has a ``tail``.
        """
        self.runtime.end_generation(num_steps)

    def add_observer(self, observer: UnitObserver) -> Callable[[], None]:
        """Call ``observer(context, step, unit_key, how, outputs)`` after every unit is served.

        ``how`` is ``"computed"``, ``"forecast"`` or ``"fallback"`` (a non-finite forecast that was
        recomputed); ``outputs`` are the unit's outputs at that step, one tensor per stream (the
        runtime's own tensors: clone them to keep them). Meant for diagnostics, plots and tests;
        an observer must not modify the outputs. Returns a function that removes the observer.
        """
        self.runtime.observers.append(observer)

        def remove() -> None:
            if observer in self.runtime.observers:
                self.runtime.observers.remove(observer)

        return remove

    def remove(self) -> None:
        """Detach: the model's forwards are restored exactly. Idempotent."""
        if not self._attached:
            return
        for model, _ in self.denoisers:
            detach_all(model)
            vars(model).pop("enable_cache", None)
            if getattr(model, _HANDLE_ATTR, None) is self:
                delattr(model, _HANDLE_ATTR)
        self._attached = False

    def __enter__(self) -> CacheHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def compose(
    policy: str,
    basis: str | Basis = "taylor",
    *,
    adapter: str | None = None,
    cache_dtype: torch.dtype | str | None = None,
    check_finite: bool = True,
    **params: Any,
) -> Accelerator:
    """Compose a registered policy with a registered basis.

    Each keyword in ``params`` goes to whichever of the policy's config or the basis declares it
    (e.g. ``interval``, ``warmup``, ``max_order`` to the policy, ``sigma`` to ``hermite``).

    Args:
        policy: registered policy name (``fora``, ``taylorseer``, ``clusca``, ...).
        basis: registered basis name or a ready :class:`Basis` instance.
        adapter: registered adapter name to force; by default chosen from the model.
        cache_dtype: ladder storage dtype (``"bf16"``, ``torch.float16``, ...); default the model's.
        check_finite: recompute units whose forecast is not finite (recommended).

    Example:
        >>> acc = compose("clusca", basis="hermite", interval=7, max_order=2, sigma=0.5)
    """
    registry = get_registry()
    if not isinstance(policy, str):
        raise InvalidParameterError(
            f"policy must be a registered policy name (a str such as 'taylorseer'), got {policy!r}; "
            f"registered policies: {sorted(registry.entries('policy'))}"
        )
    policy_cls: type[Policy] = registry.get("policy", policy).obj
    if adapter is not None:
        if not isinstance(adapter, str):
            raise InvalidParameterError(f"adapter must be a registered adapter name (a str) or None, got {adapter!r}")
        registry.get("adapter", adapter)  # an unknown name fails here, with a did-you-mean
    if not isinstance(check_finite, bool):
        raise InvalidParameterError(f"check_finite must be True or False, got {check_finite!r}")
    policy_fields = {a.name for a in attrs.fields(policy_cls.Config)}
    if isinstance(basis, Basis):
        basis_cls: type[Basis] = type(basis)
        basis_fields: set[str] = set()
        given = sorted(set(basis_cls.parameter_names()) & params.keys() - policy_fields)
        if given:
            raise InvalidParameterError(
                f"{given} are parameters of basis {basis_cls.name!r}, which was given as an instance "
                f"({basis.tag}); set them on the instance (e.g. basis=get_basis({basis_cls.name!r})"
                f"({given[0]}=...)) or pass basis={basis_cls.name!r} with {given[0]}=..."
            )
    elif isinstance(basis, str):
        basis_cls = registry.get("basis", basis).obj
        basis_fields = set(basis_cls.parameter_names())
    else:
        raise InvalidParameterError(f"basis must be a registered name or a Basis instance, got {basis!r}")
    ambiguous = sorted(policy_fields & basis_fields & params.keys())
    if ambiguous:
        raise InvalidParameterError(
            f"{ambiguous} are parameters of both policy {policy!r} and basis {basis_cls.name!r}; pass the basis "
            "as an instance, e.g. basis=get_basis(name)(...)"
        )
    unknown = sorted(params.keys() - policy_fields - basis_fields)
    if unknown:
        accepted = sorted(policy_fields | basis_fields)
        hint = did_you_mean(unknown[0], accepted)
        raise InvalidParameterError(
            f"no one takes {unknown}: policy {policy!r} takes {sorted(policy_fields)}, basis "
            f"{basis_cls.name!r} takes {sorted(basis_fields) if basis_fields else 'nothing more'}.{hint}"
        )
    config = policy_cls.Config(**{k: v for k, v in params.items() if k in policy_fields})
    basis_obj = (
        basis if isinstance(basis, Basis) else basis_cls(**{k: v for k, v in params.items() if k in basis_fields})
    )
    return Accelerator(
        policy_cls=policy_cls,
        config=config,
        basis=basis_obj,
        adapter=adapter,
        cache_dtype=parse_dtype(cache_dtype),
        check_finite=check_finite,
    )
