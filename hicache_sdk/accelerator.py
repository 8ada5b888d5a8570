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
from .distributed import AllReduce, check_divisible_inputs, check_same_configuration, context_parallel_group
from .errors import AdapterMismatchError, AlreadyAttachedError, InvalidParameterError, did_you_mean
from .granularity import MODULES, Granularity, parse_units, range_forwards, residual_forward
from .hooks import StepsProvider, attach_block_forward, attach_step_hook, detach_all, refresh_registry_caches
from .planner import MemoryPlanner, parse_bytes
from .policy import Policy
from .registry import get_registry
from .runtime import FlopTable, Runtime, UnitObserver
from .storage import LadderStorage, parse_ladder_format
from .summary import RunSummary, summarize

__all__ = ["Accelerator", "CacheHandle", "compose", "handle_of"]

_HANDLE_ATTR = "_hicache_handle"
# FLOPs measured per model and adapter, kept across attachments (they do not depend on the policy)
_FLOP_TABLES: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, FlopTable]] = weakref.WeakKeyDictionary()


def parse_storage(cache_dtype: Any = None, offload: Any = None) -> LadderStorage | None:
    """The ladders' :class:`~hicache_sdk.storage.LadderStorage` from ``compose``'s ``cache_dtype`` and ``offload``."""
    fmt = None
    if cache_dtype is not None:
        try:
            fmt = parse_ladder_format(cache_dtype)
        except InvalidParameterError as error:
            raise InvalidParameterError(f"cache_dtype: {error}") from None
    device = None if offload is None else parse_device(offload)
    return None if fmt is None and device is None else LadderStorage(fmt, device)


def parse_device(value: Any, name: str = "offload") -> torch.device:
    """A device that exists on this machine, from a name (``"cpu"``, ``"cuda:1"``) or a ``torch.device``."""
    if not isinstance(value, (str, torch.device)):
        raise InvalidParameterError(f"{name} must be a device name such as 'cpu' or a torch.device, got {value!r}")
    try:
        device = torch.device(value)
    except RuntimeError as error:
        raise InvalidParameterError(
            f"{name}={value!r} is not a device name ('cpu', 'cuda', 'cuda:1', ...): {error}"
        ) from None
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, AttributeError) as error:
        raise InvalidParameterError(
            f"{name}={value!r}: no such device on this machine ({str(error).splitlines()[0]}); 'cpu' always exists"
        ) from None
    return device


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
    storage: LadderStorage | None = None
    check_finite: bool = True
    units: Granularity = MODULES
    memory_budget: int | None = None

    @property
    def cache_dtype(self) -> torch.dtype | None:
        """The ladders' dtype when every order is held in one plain dtype (``None``: the features' own, or mixed)."""
        return None if self.storage is None or self.storage.format is None else self.storage.format.plain

    @property
    def tag(self) -> str:
        """E.g. ``taylorseer[hermite(sigma=0.5)](interval=7, warmup=3, schedule='reference', max_order=2)``,
        followed by the memory settings that are not the defaults (``{units=block, cache=bf16+fp8_e4m3:row}``)."""
        memory = []
        if self.units.kind != "modules":
            memory.append(f"units={self.units.name}")
        if self.storage is not None:
            memory.append(f"cache={self.storage.name}")
        if self.memory_budget is not None:
            memory.append(f"memory_budget={self.memory_budget}")
        policy = self.policy_cls(self.config, self.basis).tag
        return f"{policy} {{{', '.join(memory)}}}" if memory else policy

    def apply(self, target: Any, *, reduce: Reducer | None = None) -> CacheHandle:
        """Attach to a pipeline (its ``transformer``) or a transformer; return the handle.

        Applied to a pipeline, the accelerator also reads the number of steps of each generation
        from the pipeline's scheduler (for an always-full ``tail`` or a few-step guard); applied to
        a bare transformer, a loop that uses them announces it with :meth:`CacheHandle.reset`.

        ``reduce`` is the reduction point of the policy's statistics
        (:mod:`hicache_sdk.decision`): it sums a local statistic over every process holding a
        shard of the tokens, so that all of them take the same decision. By default: for a model
        under diffusers' context parallelism, an all-reduce over its group
        (:class:`~hicache_sdk.distributed.AllReduce`, after checking that every process composed
        the same accelerator); otherwise the statistic unchanged.

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
        group = context_parallel_group(model)
        if group is not None:
            check_same_configuration(self.tag, group)
        if reduce is None:
            reduce = local_reduce if group is None else AllReduce(group)
        planner = self._planner(policy, denoisers)
        # FLOPs are per unit: the same adapter with other units (or blocks a plan may coarsen) measures anew
        units = f"{self.units.name}, coarse" if planner is not None and planner.coarse else self.units.name
        flops = _FLOP_TABLES.setdefault(model, {}).setdefault(
            "+".join(self._adapter_class(m, []).name for _, m in denoisers) + f" ({units})", FlopTable()
        )
        runtime = Runtime(
            policy,
            storage=self.storage,
            planner=planner,
            check_finite=self.check_finite,
            flops=flops,
            reduce=reduce,
        )
        if group is not None:  # each process holds a shard of the tokens
            world, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
            runtime.input_check = lambda arguments: check_divisible_inputs(model, arguments, world)
            runtime.shard = lambda whole: whole.chunk(world, dim=1)[rank] if whole.dim() > 1 else whole
            runtime.shared_output = True
        notes: list[str] = []
        adapters: list[Adapter] = []
        steps_of = _scheduler_steps(target, model)
        try:
            for name, denoiser in denoisers:
                check_no_other_cache(denoiser, policy.tag)
                adapter = self._adapter_class(denoiser, notes)(denoiser)
                self._check_fit(policy, adapter, self.units)
                self._check_storage(denoiser)
                if adapter.note:
                    notes.append(adapter.note)
                runtime.generation_checks.append(_cache_check(denoiser, policy.tag))
                runtime.add_model(
                    name,
                    num_blocks=adapter.num_blocks,
                    observed_blocks=adapter.observed_blocks,
                    noise_level=adapter.noise_level,
                )
                for block, forward in self._forwards(adapter, runtime):
                    attach_block_forward(block, forward)
                attach_step_hook(
                    denoiser, runtime, steps_of=steps_of, name=name, output_unit=self.units.kind == "output"
                )
                adapters.append(adapter)
        except Exception:
            for _, denoiser in denoisers:
                detach_all(denoiser)
            raise
        if runtime.planner is not None and runtime.planner.offload is None and self.storage is not None:
            notes.append(f"offload={self.storage.offload} unused: the model runs on {_device_of(model)} already")
        handle = CacheHandle(model=model, runtime=runtime, adapter=adapters[0], notes=tuple(notes))
        handle.units = self.units.name
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

    def _planner(self, policy: Policy, denoisers: list[tuple[str, torch.nn.Module]]) -> MemoryPlanner | None:
        if self.memory_budget is None:
            return None
        device = _device_of(denoisers[0][1])
        offload = None
        if device.type != "cpu":
            offload = self.storage.offload if self.storage is not None and self.storage.offload else torch.device("cpu")
        return MemoryPlanner(
            self.memory_budget, policy.max_order, coarse=self._coarse_allowed(policy), offload=offload, device=device
        )

    def _coarse_allowed(self, policy: Policy) -> bool:
        """Whether a memory plan may serve blocks as one residual unit."""
        if self.units.kind != "modules" or policy.needs_token_paths or policy.needs_batch_split:
            return False
        try:
            policy.check_units("block")
        except InvalidParameterError:
            return False
        return True

    def _forwards(self, adapter: Adapter, runtime: Runtime) -> list[tuple[torch.nn.Module, Any]]:
        """The forwards to install for this accelerator's granularity (and memory plan)."""
        kind = self.units.kind
        if kind == "output":
            return []
        if kind == "range":
            blocks = adapter.blocks()
            if self.units.start is None and self.units.stop is None:  # one range per block list
                lists = [key.rsplit(".", 1)[0] for key, _ in blocks]
                spans = _runs(lists)
            else:
                spans = [self.units.bounds(len(blocks))]
            return [
                (module, forward)
                for first, stop in spans
                for _, module, forward in range_forwards(runtime, blocks, first, stop)
            ]
        layouts: dict[str, tuple[str | None, ...]] = {}
        if kind == "block":
            return [
                (module, residual_forward(runtime, key, index, layouts))
                for index, (key, module) in enumerate(adapter.blocks())
            ]
        bindings = [(b.block, b.forward) for b in adapter.bindings(runtime)]
        if runtime.planner is None or not runtime.planner.coarse or adapter.name == "generic":
            return bindings
        inner = {id(block): forward for block, forward in bindings}
        wrapped = [
            (module, residual_forward(runtime, key, index, layouts, inner.pop(id(module), None), switchable=True))
            for index, (key, module) in enumerate(adapter.blocks())
        ]
        return wrapped + [(block, forward) for block, forward in bindings if id(block) in inner]

    def _check_storage(self, model: torch.nn.Module) -> None:
        if self.storage is not None and self.storage.format is not None:
            self.storage.format.check_device(_device_of(model))

    @staticmethod
    def _check_fit(policy: Policy, adapter: Adapter, units: Granularity = MODULES) -> None:
        if units.kind != "modules" and policy.needs_token_paths:
            raise AdapterMismatchError(
                f"policy {policy.name!r} recomputes units on chosen tokens; units={units.name!r} offers none. "
                "Use units='modules' with an adapter that has token paths (e.g. 'flux')."
            )
        if units.kind not in adapter.granularities:
            raise AdapterMismatchError(
                f"adapter {adapter.name!r} serves {type(adapter.model).__name__} with units in "
                f"{list(adapter.granularities)}, not {units.name!r}"
                + (f": {adapter.granularity_note}" if adapter.granularity_note else "")
            )
        policy.check_units(units.kind)
        if units.kind != "modules":
            if policy.needs_batch_split:
                raise AdapterMismatchError(
                    f"policy {policy.name!r} has per_sample=True; units={units.name!r} cannot run on a sub-batch. "
                    "Use units='modules' or per_sample=False."
                )
            policy.check_adapter(adapter)
            return
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


def _runs(names: list[str]) -> list[tuple[int, int]]:
    """``(first, stop)`` of each run of equal consecutive names."""
    spans: list[tuple[int, int]] = []
    for i, name in enumerate(names):
        if spans and names[spans[-1][0]] == name:
            spans[-1] = (spans[-1][0], i + 1)
        else:
            spans.append((i, i + 1))
    return spans


def _device_of(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without any)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


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
        #: the granularity of the units served (see :mod:`hicache_sdk.granularity`)
        self.units = "modules"
        self._attached = True

    @property
    def attached(self) -> bool:
        return self._attached

    def summary(self) -> RunSummary:
        """Summary of the last (or current) generation."""
        policy = self.runtime.policy
        runtime = self.runtime
        plan = runtime.plan
        storage = runtime.storage.name if runtime.storage is not None else "native"
        return summarize(
            list(runtime.contexts.values()),
            policy=policy.tag,
            basis=policy.basis.tag,
            adapter="+".join(dict.fromkeys(adapter.name for _, adapter in self.denoisers)),
            notes=self.notes,
            peak_cache_bytes=runtime.peak_cache_bytes,
            granularity=self.units,
            storage="planned" if runtime.planner is not None else storage,
            memory_budget=None if runtime.planner is None else runtime.planner.budget,
            predicted_bytes=None if plan is None else plan.predicted_bytes,
            memory_plan=None if plan is None else plan.levels_used,
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
    cache_dtype: Any = None,
    offload: str | torch.device | None = None,
    units: str | Granularity = "modules",
    memory_budget: int | str | None = None,
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
        cache_dtype: storage format of the ladders: ``"fp32"``, ``"bf16"``, ``"fp16"``, ``"fp8"``
            (e4m3, per-row scales), ``"fp8_e5m2:tensor"``, a mix per order such as ``"bf16+fp8"``
            (``D^0`` in bf16, higher orders in fp8), or a torch dtype; default the model's dtype.
            Arithmetic is float32 whatever the format (see :mod:`hicache_sdk.storage`).
        offload: device the ladders are held on between uses (``"cpu"`` for a GPU run: host memory,
            prefetched about one block ahead); default none.
        units: granularity of the cached units: ``"modules"`` (the adapter's), ``"block"``,
            ``"range"`` / ``"range[a:b]"`` or ``"output"`` (see :mod:`hicache_sdk.granularity`).
        memory_budget: bytes of forecast state allowed on the model's device (an int or a string
            such as ``"2GiB"``): a planner then chooses each unit's format, offload and granularity
            (:mod:`hicache_sdk.planner`); ``cache_dtype`` cannot be given with it.
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
    budget = None if memory_budget is None else parse_bytes(memory_budget)
    if budget is not None and cache_dtype is not None:
        raise InvalidParameterError(
            f"give memory_budget ({memory_budget!r}) or cache_dtype ({cache_dtype!r}), not both: with a budget "
            "the planner chooses each unit's format"
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
        storage=parse_storage(cache_dtype, offload),
        check_finite=check_finite,
        units=parse_units(units),
        memory_budget=budget,
    )
