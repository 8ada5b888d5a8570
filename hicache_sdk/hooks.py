"""Forward wrapping through diffusers' hook registry (removable, signature-preserving).

Using :class:`diffusers.hooks.HookRegistry` gives three things for free: ``remove_hook`` restores
the original forward, ``functools.update_wrapper`` keeps the real signature, and a stateful hook
holding a ``StateManager`` receives the pipeline's ``transformer.cache_context(...)`` name.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, cast

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager

from .errors import AdapterMismatchError, InvalidParameterError
from .runtime import Runtime, bind_arguments

__all__ = [
    "HOOK_NAME",
    "BlockForward",
    "StepsProvider",
    "attach_block_forward",
    "attach_step_hook",
    "detach_all",
    "refresh_registry_caches",
]

HOOK_NAME = "hicache"

#: ``forward(block, original_forward, *args, **kwargs)``: a block's forward written against the runtime.
BlockForward = Callable[..., Any]
#: Returns the number of steps of the generation that is starting, or ``None`` if unknown.
StepsProvider = Callable[[], "int | None"]


class _NoState:
    def reset(self) -> None:
        pass


class _StepHook(ModelHook):
    """Wraps the transformer's forward: one call is one denoising step of one context."""

    _is_stateful = True

    def __init__(
        self, runtime: Runtime, steps_of: StepsProvider | None = None, name: str = "", output_unit: bool = False
    ) -> None:
        super().__init__()
        self.runtime = runtime
        self.steps_of = steps_of
        self.name = name
        self.output_unit = output_unit
        self._output_kind: tuple[str, type] | None = None  # how the forward packs its output (output_unit)
        # the latents and timestep of the last call made outside any cache context (see _branch)
        self._last_call: tuple[weakref.ref[torch.Tensor], int, Any, tuple[int, ...]] | None = None
        self._branch = 0
        # diffusers sets the pipeline's cache context on every StateManager of a stateful hook
        self.state_manager = StateManager(cast(Any, _NoState))
        self._signature_of: Callable[..., Any] | None = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._signature_of = module.forward
        return module

    # Under torch.compile this frame runs eagerly and the model's own forward is compiled: the
    # step bookkeeping (context, noise level, schedule) never enters a graph or its guards.
    @torch.compiler.disable(recursive=False)
    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        original = self.fn_ref.original_forward
        assert original is not None
        run = self._served_output if self.output_unit else original
        try:
            self._begin(module, args, kwargs)
            output = run(*args, **kwargs)
            while self.runtime.end_step(_main_output(output)):  # the policy rejected the draft: run it in full
                output = run(*args, **kwargs)
        except AssertionError as error:
            self.runtime.abort()
            if self.runtime.input_check is not None and "divisible by mesh size" in str(error):
                raise InvalidParameterError(
                    f"context parallelism could not split a sequence among its processes ({error}); the inputs were "
                    + ", ".join(f"{n} {tuple(v.shape)}" for n, v in _tensors(args, kwargs))
                    + ": every split sequence (tokens after patching) must be a multiple of the process count"
                ) from error
            raise
        except BaseException:
            # an error or an interrupt ends the generation: the next call must start afresh
            self.runtime.abort()
            raise
        return output

    def _served_output(self, *args: Any, **kwargs: Any) -> Any:
        """The forward's output as one unit (``units="output"``): on a forecast step nothing of the model runs."""
        original = self.fn_ref.original_forward
        assert original is not None
        computed: list[Any] = []

        def compute() -> torch.Tensor:
            with self.runtime.passthrough():
                output = original(*args, **kwargs)
            computed.append(output)
            self._output_kind = _output_kind(output)
            main = _main_output(output)
            assert main is not None  # _output_kind checked it
            return main

        (sample,) = self.runtime.unit("output", compute, kind="output")
        if computed:
            return computed[0]
        assert self._output_kind is not None
        kind, cls = self._output_kind
        if kind == "tensor":
            return sample
        if kind == "tuple":
            return cls((sample,))
        return cls(sample=sample)

    @torch.compiler.disable
    def _begin(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        arguments = bind_arguments(self._signature_of or module.forward, args, kwargs)
        signature = tuple(
            (name, tuple(value.shape), value.dtype)
            for name, value in arguments.items()
            if isinstance(value, torch.Tensor)
        )
        if self.runtime.input_check is not None:
            self.runtime.input_check(arguments)
        context = self._context()
        latents = arguments.get("hidden_states")
        latents = latents if isinstance(latents, torch.Tensor) else None
        name = None if context is None else str(context.name)
        if context is None:
            name = self._unnamed_branch(arguments)
        total = getattr(context, "num_inference_steps", None)
        if total is None and self.steps_of is not None:
            total = self.steps_of()
        self.runtime.begin_step(
            name,
            _noise_level(_timestep_of(arguments)),
            signature,
            total_steps=total,
            step_index=getattr(context, "step_index", None),
            batch_size=None if latents is None or latents.dim() == 0 else int(latents.shape[0]),
            latents=latents,
            model=self.name,
        )

    def _unnamed_branch(self, arguments: dict[str, Any]) -> str | None:
        """The context of a call made outside any cache context.

        A pipeline that runs classifier-free guidance as two calls on the same latents at the same
        timestep with other conditioning, without naming them (diffusers' Flux img2img, inpainting
        and Kontext pipelines with ``true_cfg_scale``), gets one context per call: ``None`` (the
        default) for the first, ``"default#2"`` for the second. Tensors are recognised by identity
        (and version, where tracked), which reads no data. A second-order sampler's repeated level
        comes with new latents, and a call repeated with the very same arguments is the same
        branch: both stay one context.
        """
        latents = arguments.get("hidden_states")
        level = _noise_level(_timestep_of(arguments))
        others = tuple(id(v) for k, v in arguments.items() if k != "hidden_states" and isinstance(v, torch.Tensor))
        if not isinstance(latents, torch.Tensor):
            self._last_call, self._branch = None, 0
            return None
        version = -1 if latents.is_inference() else latents._version  # inference tensors track no version
        last = self._last_call
        same_latents = last is not None and last[0]() is latents and last[1:3] == (version, level)
        if same_latents and last is not None and last[3] != others:
            self._branch += 1
        elif not same_latents:
            self._branch = 0
        self._last_call = (weakref.ref(latents), version, level, others)
        return None if self._branch == 0 else f"default#{self._branch + 1}"

    def _context(self) -> Any:
        try:
            return self.state_manager.context
        except ValueError:  # no cache_context set: a bare loop
            return None

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.runtime.end_generation()
        return module


class _BlockHook(ModelHook):
    """Replaces one block's forward by an adapter's runtime-aware forward."""

    def __init__(self, forward: BlockForward) -> None:
        super().__init__()
        self._forward = forward

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self._forward(module, self.fn_ref.original_forward, *args, **kwargs)


def _main_output(output: Any) -> torch.Tensor | None:
    """The model's main output: a tensor, the first item of a tuple, or an output object's ``sample``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    sample = getattr(output, "sample", None)
    return sample if isinstance(sample, torch.Tensor) else None


def _tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """The tensor arguments of a call, by name (positional ones by position)."""
    named = [(f"#{i}", v) for i, v in enumerate(args)] + list(kwargs.items())
    return [(n, v) for n, v in named if isinstance(v, torch.Tensor)]


def _output_kind(output: Any) -> tuple[str, type]:
    """How a forward packs its one output: a tensor, a 1-tuple, or an output object with ``sample``."""
    if isinstance(output, torch.Tensor):
        return "tensor", torch.Tensor
    if isinstance(output, (tuple, list)) and len(output) == 1 and isinstance(output[0], torch.Tensor):
        return "tuple", type(output)
    if isinstance(getattr(output, "sample", None), torch.Tensor) and len(getattr(output, "keys", list)()) <= 1:
        return "object", type(output)
    inside = output[0] if isinstance(output, (tuple, list)) and output else getattr(output, "sample", None)
    what = type(output).__name__ + ("" if inside is None else f" of {type(inside).__name__}")
    raise AdapterMismatchError(
        f"units='output' caches the model's one output tensor; this forward returned a {what}: use a finer granularity"
    )


#: Names a transformer forward gives its timestep (most: ``timestep``; HiDream ``timesteps``; Z-Image ``t``).
TIMESTEP_ARGUMENTS: tuple[str, ...] = ("timestep", "timesteps", "t")


def _timestep_of(arguments: dict[str, Any]) -> Any:
    return next((arguments[name] for name in TIMESTEP_ARGUMENTS if arguments.get(name) is not None), None)


def _noise_level(timestep: Any) -> float | None:
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0]) if timestep.numel() else None
    if isinstance(timestep, (int, float)):
        return float(timestep)
    return None


def attach_step_hook(
    model: torch.nn.Module,
    runtime: Runtime,
    *,
    steps_of: StepsProvider | None = None,
    name: str = "",
    output_unit: bool = False,
) -> None:
    """Track steps and contexts on ``model``'s forward.

    ``steps_of`` tells the number of steps of a generation when the pipeline's cache context does
    not; ``name`` is the denoiser's name in the runtime (:meth:`Runtime.add_model`). With
    ``output_unit`` the forward's output is itself the one unit, keyed ``"output"``.
    """
    hook = _StepHook(runtime, steps_of, name, output_unit)
    HookRegistry.check_if_exists_or_initialize(model).register_hook(hook, HOOK_NAME)


def attach_block_forward(block: torch.nn.Module, forward: BlockForward) -> None:
    """Route ``block``'s forward through ``forward``."""
    HookRegistry.check_if_exists_or_initialize(block).register_hook(_BlockHook(forward), HOOK_NAME)


def refresh_registry_caches(model: torch.nn.Module) -> None:
    """Make diffusers rebuild its cached lists of child registries after hooks came or went."""
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            registry.invalidate_child_registries_cache()


def detach_all(model: torch.nn.Module) -> None:
    """Remove every hicache hook under ``model`` and the traces the registry left behind."""
    for module in list(model.modules()):
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        registry.remove_hook(HOOK_NAME, recurse=False)
        if not registry.hooks:
            del module._diffusers_hook
            # the registry leaves the original bound method as an instance attribute
            if "forward" in vars(module) and getattr(module.forward, "__func__", None) is type(module).forward:
                del module.forward
    refresh_registry_caches(model)
