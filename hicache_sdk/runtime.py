"""The runtime an adapter talks to: step tracking per context, unit serving, counting.

The adapter's block forwards call :meth:`Runtime.unit` for every cacheable computation and
:meth:`Runtime.observe` where a policy may want to see image tokens. A model-level hook calls
:meth:`Runtime.begin_step` / :meth:`Runtime.end_step` around every transformer forward.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .flops import flop_counter_mode
from .policy import Policy, TokenPath
from .state import ContextState, UnitState

__all__ = ["DEFAULT_CONTEXT", "Runtime", "UnitOutputs"]

DEFAULT_CONTEXT = "default"
UnitOutputs = tuple[torch.Tensor, ...]


def _as_tuple(value: torch.Tensor | Sequence[torch.Tensor]) -> UnitOutputs:
    return (value,) if isinstance(value, torch.Tensor) else tuple(value)


def _all_finite(tensors: UnitOutputs) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class Runtime:
    """Serves cacheable units for one attached model according to one policy.

    Args:
        policy: the policy deciding full steps and forecasts.
        cache_dtype: storage dtype of the ladders (``None``: the features' dtype).
        check_finite: recompute a unit whose forecast is not finite (costs one reduction and,
            on a GPU, one synchronisation per forecast unit).
    """

    def __init__(self, policy: Policy, *, cache_dtype: torch.dtype | None = None, check_finite: bool = True):
        self.policy = policy
        self.cache_dtype = cache_dtype
        self.check_finite = check_finite
        self.contexts: dict[str, ContextState] = {}
        self.current: ContextState | None = None
        self.generations = 0
        self._ended = False
        self._signature: tuple[Any, ...] | None = None
        self._model_flops: dict[tuple[Any, ...], float] = {}
        self._unit_flops: dict[tuple[Any, ...], dict[str, float]] = {}
        self._counter: Any = None

    # -- steps -------------------------------------------------------------------------------
    def end_generation(self) -> None:
        """Mark the end of a generation: the next forward starts a new one.

        The finished generation's counters stay readable (for the summary) until then. Diffusers
        pipelines signal this at the end of every call; a bare loop relies on the timestep rule
        (a noise level above the previous one starts a new generation) or calls this itself.
        """
        self._ended = True
        self.current = None

    def begin_step(self, context: str | None, timestep: float | None, signature: tuple[Any, ...]) -> None:
        """Called before a transformer forward in ``context`` at ``timestep`` (noise level)."""
        if self._ended:
            self.contexts.clear()
            self._ended = False
        name = context or DEFAULT_CONTEXT
        ctx = self.contexts.get(name)
        if ctx is None:
            ctx = self.contexts[name] = ContextState(name)
            self._start_generation(ctx)
        elif timestep is not None and ctx.last_timestep is not None and timestep > ctx.last_timestep:
            self._start_generation(ctx)  # the noise level went up: a new denoising run
        ctx.step += 1
        ctx.last_timestep = timestep
        ctx.full = self.policy.is_full_step(ctx.step)
        if ctx.full:
            ctx.full_steps += 1
        else:
            ctx.forecast_steps += 1
        self.current = ctx
        self._signature = signature
        if signature not in self._model_flops and ctx.full:
            self._counter = flop_counter_mode()
            self._counter.__enter__()

    def end_step(self) -> None:
        """Called after the transformer forward (also when it raised)."""
        ctx, sig = self.current, self._signature
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            assert sig is not None
            self._model_flops[sig] = float(self._counter.get_total_flops())
            self._counter = None
        if ctx is not None and sig is not None:
            total = self._model_flops.get(sig)
            if total is None:
                ctx.flops_measured = False
            else:
                ctx.flops_total += total
        self.current = None
        self._signature = None

    def _start_generation(self, ctx: ContextState) -> None:
        ctx.reset()
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
        """
        ctx = self.current
        if ctx is None:
            return _as_tuple(compute())
        state = ctx.units.get(key)
        if state is None:
            state = ctx.units[key] = UnitState(key, streams, self.policy.max_order, self.cache_dtype)
        if ctx.full or state.empty:
            return self._compute(ctx, state, compute)
        recomputed = [0]
        paths = tuple(self._counted(p, recomputed) for p in token_paths)
        outputs = self.policy.forecast(ctx, state, paths)
        if self.check_finite and not _all_finite(outputs):
            state.counts.fallbacks += 1
            return self._compute(ctx, state, compute, fallback=True)
        state.counts.forecast += 1
        flops = self._unit_flops.get(self._signature or (), {}).get(key)
        if flops is None:
            ctx.flops_measured = False
        else:
            ctx.flops_saved += flops * (1.0 - self._token_fraction(state, token_paths, recomputed[0]))
        return outputs

    def _compute(
        self, ctx: ContextState, state: UnitState, compute: Callable[[], Any], fallback: bool = False
    ) -> UnitOutputs:
        before = self._counter.get_total_flops() if self._counter is not None else None
        outputs = _as_tuple(compute())
        if not state.streams:
            state.set_streams([str(i) for i in range(len(outputs))])
        if len(outputs) != len(state.streams):
            raise RuntimeError(
                f"unit {state.key!r} produced {len(outputs)} outputs for streams {state.streams}"
            )
        if before is not None and self._signature is not None:
            flops = float(self._counter.get_total_flops() - before)
            self._unit_flops.setdefault(self._signature, {})[state.key] = flops
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

    def observe(self, block_index: int, num_blocks: int, image_tokens: torch.Tensor) -> None:
        """Show the policy a block's image hidden states, on full steps only."""
        ctx = self.current
        if ctx is not None and ctx.full:
            self.policy.observe(ctx, block_index, num_blocks, image_tokens)


def bind_arguments(
    forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The forward's arguments by parameter name (positional ones included)."""
    try:
        return dict(inspect.signature(forward).bind_partial(*args, **kwargs).arguments)
    except TypeError:
        return dict(kwargs)
