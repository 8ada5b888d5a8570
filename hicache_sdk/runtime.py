"""The runtime an adapter talks to: step tracking per context, unit serving, counting.

The adapter's block forwards call :meth:`Runtime.unit` for every cacheable computation and
:meth:`Runtime.observe` where a policy may want to see image tokens. A model-level hook calls
:meth:`Runtime.begin_step` / :meth:`Runtime.end_step` around every transformer forward.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch

from .errors import ForecastLayoutError
from .flops import flop_counter_mode
from .policy import Policy, TokenPath
from .state import ContextState, UnitState
from .validation import check_int

__all__ = ["DEFAULT_CONTEXT", "FlopTable", "Runtime", "UnitObserver", "UnitOutputs"]

DEFAULT_CONTEXT = "default"
UnitOutputs = tuple[torch.Tensor, ...]
#: ``observer(context, step, unit_key, how, outputs)`` with ``how`` one of ``"computed"``,
#: ``"forecast"``, ``"fallback"``; called after a unit is served (for diagnostics and plots).
UnitObserver = Callable[[str, int, str, str, UnitOutputs], None]


def _as_tuple(value: torch.Tensor | Sequence[torch.Tensor]) -> UnitOutputs:
    return (value,) if isinstance(value, torch.Tensor) else tuple(value)


def _all_finite(tensors: UnitOutputs) -> bool:
    """Whether every value is finite, from one float32 sum per tensor.

    A nan or an infinity propagates into the sum; a sum that overflows float32 (not a real
    activation) reads as non-finite too and only costs a recompute. On CPU this is one pass with
    no temporary, where ``isfinite(t).all()`` writes a boolean tensor and was 40x slower.
    """
    return all(bool(torch.isfinite(t.sum(dtype=torch.float32))) for t in tensors)


@attrs.define
class FlopTable:
    """FLOPs of whole forwards and of each unit, per input signature (shapes and dtypes)."""

    model: dict[tuple[Any, ...], float] = attrs.field(factory=dict)
    units: dict[tuple[Any, ...], dict[str, float]] = attrs.field(factory=dict)


class Runtime:
    """Serves cacheable units for one attached model according to one policy.

    Args:
        policy: the policy deciding full steps and forecasts.
        cache_dtype: storage dtype of the ladders (``None``: the features' dtype).
        check_finite: recompute a unit whose forecast is not finite (costs one reduction and,
            on a GPU, one synchronisation per forecast unit).
        flops: measured FLOPs to reuse (FLOPs depend on the model, adapter and input shapes, not
            on the policy); measured on the first full step of each new input signature.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        cache_dtype: torch.dtype | None = None,
        check_finite: bool = True,
        flops: FlopTable | None = None,
    ) -> None:
        self.policy = policy
        self.cache_dtype = cache_dtype
        self.check_finite = check_finite
        self.contexts: dict[str, ContextState] = {}
        self.current: ContextState | None = None
        self.generations = 0
        self._ended = False
        self._announced_steps: int | None = None  # steps of the next generation, from end_generation()
        self._signature: tuple[Any, ...] | None = None
        self.flops = flops if flops is not None else FlopTable()
        self._counter: Any = None
        self._excluded = 0.0  # FLOPs of the policy's own work in the step being measured (not model work)
        self._flops_before: float | None = None  # FLOP count when the unit now computing started
        self.observers: list[UnitObserver] = []
        #: called at the start of every generation of every context (e.g. to refuse another cache)
        self.generation_checks: list[Callable[[], None]] = []

    # -- steps -------------------------------------------------------------------------------
    def end_generation(self, num_steps: int | None = None) -> None:
        """Mark the end of a generation: the next forward starts a new one.

        The finished generation's counters stay readable (for the summary) until then. Diffusers
        pipelines signal this at the end of every call, and a forward that raises ends its
        generation too; a bare loop relies on the timestep rule (a noise level above the previous
        one starts a new generation) or calls this itself. ``num_steps``, when given, is the number
        of steps (transformer calls per context) of the next generation, for policies with an
        always-full tail when no pipeline scheduler tells it.
        """
        if num_steps is not None:
            check_int("num_steps", num_steps, minimum=1)
        self._ended = True
        self._announced_steps = num_steps
        self.current = None

    def abort(self) -> None:
        """End the generation whose forward is raising: nothing of it is reused by the next call.

        Called by the step hook when a transformer forward raises (an exception or a
        ``KeyboardInterrupt``), the first step included. The partial FLOP count is dropped and the
        next forward starts a fresh generation, so it equals a run on a fresh handle bit for bit.
        """
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None
        self._signature = None
        self.end_generation()

    @torch.compiler.disable
    def begin_step(
        self,
        context: str | None,
        timestep: float | None,
        signature: tuple[Any, ...],
        *,
        total_steps: int | None = None,
        step_index: int | None = None,
    ) -> None:
        """Called before a transformer forward in ``context`` at ``timestep`` (noise level).

        A new generation starts for a context never seen in this generation, after
        :meth:`end_generation`, when the noise level rises above the previous call's (an equal
        level does not: Heun-style samplers evaluate a level twice), when the inputs' shapes or
        dtypes change, or when the pipeline's loop index (``step_index``, which some pipelines
        pass in their cache context) returns to 0. ``total_steps`` is the number of steps of the
        generation when the pipeline tells it (read at the generation's first step).
        """
        if self._ended:
            self.contexts.clear()
            self._ended = False
        name = context or DEFAULT_CONTEXT
        ctx = self.contexts.get(name)
        if ctx is None:
            ctx = self.contexts[name] = ContextState(name)
            self._start_generation(ctx, total_steps)
        elif (
            (timestep is not None and ctx.last_timestep is not None and timestep > ctx.last_timestep)
            or signature != ctx.signature
            or (step_index == 0 and ctx.last_step_index not in (None, 0))
        ):
            self._start_generation(ctx, total_steps)  # a new denoising run
        ctx.step += 1
        ctx.last_timestep = timestep
        ctx.last_step_index = step_index
        ctx.signature = signature
        ctx.full = self.policy.in_full_tail(ctx.step, ctx.total_steps) or self.policy.is_full_step(ctx.step)
        if ctx.full:
            ctx.full_steps += 1
        else:
            ctx.forecast_steps += 1
        self.current = ctx
        self._signature = signature
        self._excluded = 0.0
        if signature not in self.flops.model and ctx.full:
            self._counter = flop_counter_mode()
            self._counter.__enter__()

    @torch.compiler.disable
    def end_step(self) -> None:
        """Called after a transformer forward that returned (one that raised calls :meth:`abort`)."""
        ctx, sig = self.current, self._signature
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            assert sig is not None
            self.flops.model[sig] = float(self._counter.get_total_flops()) - self._excluded
            self._counter = None
        if ctx is not None and sig is not None:
            total = self.flops.model.get(sig)
            if total is None:
                ctx.flops_measured = False
            else:
                ctx.flops_total += total
        self.current = None
        self._signature = None

    def _run_generation_checks(self) -> None:
        for check in self.generation_checks:
            check()

    def _start_generation(self, ctx: ContextState, total_steps: int | None) -> None:
        self._run_generation_checks()
        ctx.reset()
        ctx.total_steps = total_steps if total_steps is not None else self._announced_steps
        ctx.policy_state = self.policy.new_policy_state()
        self.generations += 1

    # -- units -------------------------------------------------------------------------------
    def unit(
        self,
        key: str,
        compute: Callable[[], torch.Tensor | Sequence[torch.Tensor]],
        *,
        streams: Sequence[str] | None = ("",),
        token_paths: Sequence[TokenPath] = (),
    ) -> UnitOutputs:
        """Outputs of the cacheable computation ``key`` at the current step.

        On a full step (or with nothing cached yet) ``compute()`` runs and its outputs become the
        unit's newest anchor; on a forecast step the policy forecasts them and ``compute`` does not
        run, unless the forecast is not finite (then it runs, counted as a fallback).
        Outside a transformer forward ``compute()`` simply runs. ``streams`` names the outputs;
        ``None`` takes as many unnamed streams as the first computation returns.

        Under ``torch.compile`` only ``compute()`` is traced: serving and recording are kept out
        of the graph, so step counters and forecast weights never cause a recompilation.
        """
        served = self._serve(key, compute, streams, token_paths)
        if served is not None:
            return served
        outputs = _as_tuple(compute())
        self._record(key, outputs)
        return outputs

    @torch.compiler.disable
    def _serve(
        self,
        key: str,
        compute: Callable[[], torch.Tensor | Sequence[torch.Tensor]],
        streams: Sequence[str] | None,
        token_paths: Sequence[TokenPath],
    ) -> UnitOutputs | None:
        """The unit's outputs if it is not computed at this step (forecast or fallback), else ``None``."""
        ctx = self.current
        if ctx is None:
            # a unit served outside any transformer forward: something bypasses the step hook
            # (another cache wrapping the model refuses itself here) or a block is called directly
            self._run_generation_checks()
            return None
        state = ctx.units.get(key)
        if state is None:
            state = ctx.units[key] = UnitState(key, streams, self.policy.max_order, self.cache_dtype)
        if ctx.full or state.empty:
            self._flops_before = self._counter.get_total_flops() if self._counter is not None else None
            return None
        recomputed = [0]
        paths = tuple(self._counted(p, recomputed) for p in token_paths)
        outputs = self._checked_layout(state, self.policy.forecast(ctx, state, paths))
        if self.check_finite and not _all_finite(outputs):
            state.counts.fallbacks += 1
            for ladder in state.ladders:  # restart from the fresh output: a non-finite ladder would fail again
                ladder.reset()
            return self._notify(ctx, key, "fallback", self._record_outputs(ctx, state, _as_tuple(compute()), True))
        state.counts.forecast += 1
        self._notify(ctx, key, "forecast", outputs)
        flops = self.flops.units.get(self._signature or (), {}).get(key)
        if flops is None:
            ctx.flops_measured = False
        else:
            ctx.flops_saved += flops * (1.0 - self._token_fraction(state, token_paths, recomputed[0]))
        return outputs

    def _checked_layout(self, state: UnitState, outputs: Any) -> UnitOutputs:
        """``outputs`` as a tuple, if it matches the unit's computed outputs in count, shape, dtype and device.

        Metadata only (no element is read), so it costs no synchronisation: a policy bug raises
        here instead of being broadcast silently into the model.
        """
        served = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
        got = tuple(
            (tuple(o.shape), o.dtype, o.device) if isinstance(o, torch.Tensor) else type(o).__name__ for o in served
        )
        if got != state.layout:
            raise ForecastLayoutError(
                f"policy {self.policy.name!r} forecast unit {state.key!r} as {list(got)} (shape, dtype, device), "
                f"but the unit computes {list(state.layout)}; a forecast must match the computed outputs"
            )
        return served

    @torch.compiler.disable
    def _record(self, key: str, outputs: UnitOutputs) -> None:
        """Record outputs computed after :meth:`_serve` returned ``None`` (no-op outside a forward)."""
        ctx = self.current
        if ctx is None:
            return
        state = ctx.units[key]
        before, self._flops_before = self._flops_before, None
        if before is not None and self._counter is not None and self._signature is not None:
            flops = float(self._counter.get_total_flops() - before)
            self.flops.units.setdefault(self._signature, {})[key] = flops
        self._notify(ctx, key, "computed", self._record_outputs(ctx, state, outputs, False))

    def _notify(self, ctx: ContextState, key: str, how: str, outputs: UnitOutputs) -> UnitOutputs:
        for observer in self.observers:
            observer(ctx.name, ctx.step, key, how, outputs)
        return outputs

    def _record_outputs(self, ctx: ContextState, state: UnitState, outputs: UnitOutputs, fallback: bool) -> UnitOutputs:
        """Hand freshly computed outputs to the policy as the unit's newest anchor."""
        if not state.streams:
            state.set_streams([str(i) for i in range(len(outputs))])
        if len(outputs) != len(state.streams):
            raise RuntimeError(f"unit {state.key!r} produced {len(outputs)} outputs for streams {state.streams}")
        state.layout = tuple((tuple(o.shape), o.dtype, o.device) for o in outputs)
        self.policy.on_full(ctx, state, outputs)
        if not fallback:
            state.counts.computed += 1
        return outputs

    @staticmethod
    def _counted(path: TokenPath, recomputed: list[int]) -> TokenPath:
        """Wrap a token path so the number of recomputed tokens is counted."""

        def compute(index: torch.Tensor) -> torch.Tensor:
            recomputed[0] += index.numel()
            return path.compute(index)

        return TokenPath(compute=compute, kind=path.kind, stream=path.stream)

    @staticmethod
    def _token_fraction(state: UnitState, token_paths: Sequence[TokenPath], recomputed: int) -> float:
        """Share of the unit's tokens recomputed at this step (0 when no token path ran)."""
        if not recomputed:
            return 0.0
        served = {p.stream for p in token_paths}
        total = sum(
            int(ladder.term(0).shape[0] * ladder.term(0).shape[1])
            for stream, ladder in zip(state.streams, state.ladders, strict=True)
            if stream in served
        )
        return min(1.0, recomputed / total) if total else 0.0

    @torch.compiler.disable
    def observe(self, block_index: int, num_blocks: int, image_tokens: torch.Tensor) -> None:
        """Show the policy a block's image hidden states, on full steps only.

        The FLOPs the policy spends here (e.g. clustering, whose iterations vary) are counted at
        every call, kept out of the model's FLOPs and charged against the savings.
        """
        ctx = self.current
        if ctx is None or not ctx.full or type(self.policy).observe is Policy.observe:
            return
        with flop_counter_mode() as counter:
            self.policy.observe(ctx, block_index, num_blocks, image_tokens)
        cost = float(counter.get_total_flops())
        ctx.flops_overhead += cost
        if self._counter is not None:
            self._excluded += cost


def bind_arguments(forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The forward's arguments by parameter name (positional ones included)."""
    try:
        return dict(inspect.signature(forward).bind_partial(*args, **kwargs).arguments)
    except TypeError:
        return dict(kwargs)
