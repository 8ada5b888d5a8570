"""The runtime an adapter talks to: step tracking per context, unit serving, counting.

The adapter's block forwards call :meth:`Runtime.unit` for every cacheable computation and
:meth:`Runtime.block` after every block (its image tokens in and out, the policy's probe). A
model-level hook calls :meth:`Runtime.begin_step` / :meth:`Runtime.end_step` around every
transformer forward, and runs the forward again when the policy rejects a drafted step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import attrs
import torch

from .decision import BlockView, Decision, Reducer, StepInfo, local_reduce
from .errors import AdapterMismatchError, ForecastLayoutError
from .flops import flop_counter_mode
from .policy import Policy, TokenPath
from .state import ContextState, UnitState
from .storage import LadderFormat, LadderStorage, parse_format
from .validation import check_int

if TYPE_CHECKING:
    from .planner import MemoryPlan, MemoryPlanner

__all__ = ["DEFAULT_CONTEXT", "PREFETCH_UNITS", "BatchRows", "FlopTable", "Runtime", "UnitObserver", "UnitOutputs"]

DEFAULT_CONTEXT = "default"
#: The most units whose ladders are fetched ahead of use (a memory plan counts them as held).
PREFETCH_UNITS = 8
UnitOutputs = tuple[torch.Tensor, ...]
#: ``observer(context, step, unit_key, how, outputs)`` with ``how`` one of ``"computed"``,
#: ``"forecast"``, ``"fallback"``; called after a unit is served (for diagnostics and plots).
UnitObserver = Callable[[str, int, str, str, UnitOutputs], None]
#: ``batch_rows(index) -> outputs``: a unit's outputs computed for the samples in ``index`` (1-D) only.
BatchRows = Callable[[torch.Tensor], "torch.Tensor | Sequence[torch.Tensor]"]


def _as_tuple(value: torch.Tensor | Sequence[torch.Tensor]) -> UnitOutputs:
    return (value,) if isinstance(value, torch.Tensor) else tuple(value)


def _batch_of(outputs: UnitOutputs) -> int:
    """Samples in a unit's outputs (the first dimension of the first output; 1 for a scalar)."""
    return int(outputs[0].shape[0]) if outputs and outputs[0].dim() else 1


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


class _Draft:
    """What a step that may be rejected changed, to undo it (unit counts and FLOPs saved)."""

    def __init__(self, ctx: ContextState) -> None:
        self.counts = {key: attrs.evolve(unit.counts) for key, unit in ctx.units.items()}
        for counts in self.counts.values():
            counts.sample_computed = list(counts.sample_computed)
            counts.sample_forecast = list(counts.sample_forecast)
        self.flops_saved = ctx.flops_saved
        self.units = set(ctx.units)

    def undo(self, ctx: ContextState) -> float:
        """Restore the counts; return the FLOPs the draft had counted as saved."""
        for key in list(ctx.units):
            if key not in self.units:
                del ctx.units[key]
            else:
                ctx.units[key].counts = self.counts[key]
        saved, ctx.flops_saved = ctx.flops_saved - self.flops_saved, self.flops_saved
        return saved


class Runtime:
    """Serves cacheable units for one attached model according to one policy.

    Args:
        policy: the policy deciding what computes and what is forecast.
        storage: how the ladders are held (format per order, offload device); ``None``: in the
            features' dtype, with them.
        cache_dtype: shorthand for ``storage`` in one plain dtype.
        planner: chooses each unit's storage and each block's granularity to fit a memory budget
            (:mod:`hicache_sdk.planner`); replaces ``storage``.
        check_finite: recompute a unit whose forecast is not finite (costs one reduction and,
            on a GPU, one synchronisation per forecast unit).
        flops: measured FLOPs to reuse (FLOPs depend on the model, adapter and input shapes, not
            on the policy); measured on the first full step of each new input signature.
        reduce: the reduction point of tensor statistics (see :mod:`hicache_sdk.decision`);
            the identity in one process.

    Attributes:
        num_blocks: blocks of the attached model (every block list), set when attached.
        observed_blocks: the adapter's :attr:`~hicache_sdk.Adapter.observed_blocks`.
        noise_level: the adapter's :meth:`~hicache_sdk.Adapter.noise_level` (timestep to sigma).
        plan: the planner's :class:`~hicache_sdk.planner.MemoryPlan` in force (``None`` before it is made).
        peak_cache_bytes: the most forecast-state bytes held on the compute device at the end of any
            step of the current generation (every context).
    """

    def __init__(
        self,
        policy: Policy,
        *,
        storage: LadderStorage | None = None,
        cache_dtype: torch.dtype | None = None,
        planner: MemoryPlanner | None = None,
        check_finite: bool = True,
        flops: FlopTable | None = None,
        reduce: Reducer = local_reduce,
    ) -> None:
        self.policy = policy
        if cache_dtype is not None:
            storage = LadderStorage(
                LadderFormat((parse_format(cache_dtype),)), None if storage is None else storage.offload
            )
        self.storage = storage
        self.planner = planner
        self.plan: MemoryPlan | None = None
        self._plans: dict[tuple[Any, ...], MemoryPlan] = {}  # per input signature: shapes decide the plan
        self.peak_cache_bytes = 0
        #: block unit keys -> output shapes and dtypes of the block (what a planner needs of a coarse unit)
        self.block_layouts: dict[str, tuple[tuple[tuple[int, ...], torch.dtype], ...]] = {}
        self._passthrough = 0  # > 0 while a coarser unit computes: finer units inside simply run
        self._open: dict[str, float | None] = {}  # units opened and not closed yet -> FLOP count at opening
        self._order: list[str] = []  # unit keys in the order the last step served them (for prefetches)
        self._order_now: list[str] = []
        self._position: dict[str, int] = {}
        self._blocks_of: dict[str, int] = {}
        self.check_finite = check_finite
        self.reduce = reduce
        self.num_blocks = 0
        self.observed_blocks = 0
        self.noise_level: Callable[[float], float | None] | None = None
        self._models: dict[str, tuple[int, int, Callable[[float], float | None] | None, str]] = {}
        self._prefix = ""  # unit key prefix of the denoiser now running
        self._served: set[str] = set()  # unit keys served in the current step
        self.contexts: dict[str, ContextState] = {}
        self.current: ContextState | None = None
        self.generations = 0
        self._ended = False
        self._announced_steps: int | None = None  # steps of the next generation, from end_generation()
        self._signature: tuple[Any, ...] | None = None
        self.flops = flops if flops is not None else FlopTable()
        self._counter: Any = None
        self._excluded = 0.0  # FLOPs of the policy's own work in the step being measured (not model work)
        self._fallbacks: set[str] = set()  # opened units whose forecast was not finite: the caller computes
        self._stepped: set[tuple[Any, ...]] = set()  # (denoiser, input signature) that completed a step
        self._unplanned = False  # a unit the plan in force did not see was created
        self._step_forecasts = 0  # units served by the policy in the current step
        self._step_recorded = False  # whether a unit recorded an anchor in the current (non-full) step
        self._draft: _Draft | None = None
        self._mask: tuple[torch.Tensor, torch.Tensor] | None = None  # (mask, its host index) of this step
        self._watches_blocks = type(policy).on_block is not Policy.on_block
        self._can_reject = type(policy).end_step is not Policy.end_step
        self.observers: list[UnitObserver] = []
        #: called at the start of every generation of every context (e.g. to refuse another cache)
        self.generation_checks: list[Callable[[], None]] = []
        #: called with the forward's arguments (by name) before every step (e.g. context-parallel splits)
        self.input_check: Callable[[dict[str, Any]], None] | None = None
        #: the model's output is the same on every process sharing its tokens (context parallelism): non-finite
        #: forecasts are caught there, for all processes at once, instead of unit by unit on each shard
        self.shared_output = False
        #: ``shard(tokens)``: this process's share of a whole sequence, under context parallelism
        #: (a block whose input the parallelism splits inside it shows its whole input to the SDK)
        self.shard: Callable[[torch.Tensor], torch.Tensor] | None = None

    # -- denoisers ---------------------------------------------------------------------------
    def add_model(
        self,
        name: str,
        *,
        num_blocks: int,
        observed_blocks: int = 0,
        noise_level: Callable[[float], float | None] | None = None,
    ) -> None:
        """Serve one more denoiser of the pipeline (``name``: its attribute, e.g. ``"transformer_2"``).

        Its units are keyed ``"<name>.<key>"`` (the first denoiser added, or ``""``, keeps bare
        keys); its blocks, observed blocks and timestep convention apply while it runs.
        """
        self._models[name] = (num_blocks, observed_blocks, noise_level, f"{name}." if self._models else "")
        self._select_model(name)

    def _select_model(self, name: str) -> None:
        found = self._models.get(name)
        if found is not None:
            self.num_blocks, self.observed_blocks, self.noise_level, self._prefix = found

    # -- steps -------------------------------------------------------------------------------
    def end_generation(self, num_steps: int | None = None) -> None:
        """Mark the end of a generation: the next forward starts a new one.

        The finished generation's counters stay readable (for the summary) until then. Diffusers
        pipelines signal this at the end of every call, and a forward that raises ends its
        generation too; a bare loop relies on the timestep rule (a noise level above the previous
        one starts a new generation) or calls this itself. ``num_steps``, when given, is the number
        of steps (transformer calls per context) of the next generation, for policies with an
        always-full tail or a guard when no pipeline scheduler tells it.
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
        self._draft = None
        self._mask = None
        self._fallbacks.clear()
        self._open.clear()
        self._passthrough = 0
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
        batch_size: int | None = None,
        latents: torch.Tensor | None = None,
        model: str = "",
    ) -> None:
        """Called before a transformer forward in ``context`` at ``timestep`` (noise level).

        A new generation starts for a context never seen in this generation, after
        :meth:`end_generation`, when the noise level (sigma, from the adapter's timestep
        convention; the raw timestep when unknown) rises above the previous call's (an equal
        level does not: Heun-style samplers evaluate a level twice), when the inputs' shapes or
        dtypes change, or when the pipeline's loop index (``step_index``, which some pipelines
        pass in their cache context) returns to 0. ``total_steps`` is the number of steps of the
        generation when the pipeline tells it (read at the generation's first step);
        ``batch_size`` and ``latents`` (the model's main input) are shown to the policy.

        ``model`` names which of the pipeline's denoisers is called (:meth:`add_model`): when a
        generation passes from one to the next (Wan 2.2's high- and low-noise experts), it goes
        on, with its step count; the new expert's units start empty and that step computes in full.
        """
        if self._ended:
            self.contexts.clear()
            self._ended = False
            self.peak_cache_bytes = 0
            self.plan = None
        self._select_model(model)
        name = context or DEFAULT_CONTEXT
        sigma = None if timestep is None or self.noise_level is None else self.noise_level(timestep)
        level = sigma if sigma is not None else timestep  # the noise level, or the raw timestep if unknown
        ctx = self.contexts.get(name)
        if ctx is None:
            ctx = self.contexts[name] = ContextState(name, self.reduce, self.num_blocks)
            self._start_generation(ctx, total_steps)
        elif (level is not None and ctx.last_level is not None and level > ctx.last_level) or (
            step_index == 0 and ctx.last_step_index not in (None, 0)
        ):
            self._start_generation(ctx, total_steps)  # a new denoising run
        elif signature != ctx.signature and model == ctx.model:
            # new input shapes mid-run (a token count that changes): the cached features no longer
            # fit, so the run restarts, with the steps it has left (an always-full tail still comes)
            left = None if ctx.total_steps is None else max(ctx.total_steps - ctx.step - 1, 1)
            self._start_generation(ctx, left)
        switched = ctx.model is not None and ctx.model != model
        ctx.model = model
        if switched:  # the other denoiser's ladders are of no further use: free them (their counts stay)
            for key, unit in ctx.units.items():
                if not self._owns(key):
                    unit.restart()
        self._plan_memory(ctx, signature)
        ctx.step += 1
        ctx.last_level = level
        ctx.last_step_index = step_index
        ctx.signature = signature
        self.current = ctx
        self._signature = (model, *signature) if model else signature
        self._excluded = 0.0
        self._step_forecasts = 0
        self._step_recorded = False
        self._mask = None
        self._served.clear()
        self._open.clear()
        self._fallbacks.clear()
        self._passthrough = 0
        if self._order_now:
            self._order, self._order_now = self._order_now, []
            self._position = {key: i for i, key in enumerate(self._order)}
        if self.offloading:
            self._prefetch_after(ctx, -1, 0)
        if ctx.guard_reason is not None:
            ctx.full = True
            ctx.guarded_steps += 1
        elif switched:
            ctx.full = True  # a new expert: nothing of it is cached yet, and the policy starts afresh on it
            ctx.policy_state = self.policy.new_policy_state()
            note = f"denoiser switched to {model or 'the first one'}: that step computed in full"
            ctx.guard_notes[note] = ctx.guard_notes.get(note, 0) + 1
        else:
            info = StepInfo(name, ctx.step, timestep, sigma, ctx.total_steps, batch_size, latents)
            ctx.full = False  # a policy may fail open while planning
            ctx.full = bool(self.policy.plan_step(ctx, info)) or ctx.full
        self._draft = _Draft(ctx) if self._can_reject and not ctx.full else None
        if self._signature not in self.flops.model and ctx.full:
            self._counter = flop_counter_mode()
            self._counter.__enter__()

    @torch.compiler.disable
    def end_step(self, output: torch.Tensor | None = None) -> bool:
        """Called after a transformer forward that returned (one that raised calls :meth:`abort`).

        Shows ``output`` (the model's main output) to the policy. Returns ``True`` when the policy
        rejected the step: the caller runs the forward again, now with every unit computed, and
        calls this again. The rejected draft's work is counted as overhead.
        """
        ctx, sig = self.current, self._signature
        if ctx is not None and self._output_not_finite(ctx, output):
            return True
        if ctx is not None:
            accepted = self.policy.end_step(ctx, output) is not False
            if self.planner is not None and self.plan is None:
                self._make_room(0)  # the policy's own state grew: first anchors give way to keep the budget
            if not accepted and not ctx.full and self._step_forecasts:
                if self._redo_step(ctx):
                    return True
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
            if self._step_forecasts:
                ctx.forecast_steps += 1
            else:
                ctx.full_steps += 1
            self.peak_cache_bytes = max(self.peak_cache_bytes, sum(c.nbytes for c in self.contexts.values()))
            if self.planner is not None and ctx.signature is not None:
                self._stepped.add((ctx.model, *ctx.signature))
        self.current = None
        self._signature = None
        self._draft = None
        self._mask = None
        return False

    def _output_not_finite(self, ctx: ContextState, output: torch.Tensor | None) -> bool:
        """Across processes: a forecast step whose (gathered) output is not finite runs again in full.

        Each process then sees the same output, so all of them restart every ladder of the context
        and recompute the step together; a per-unit fallback would make one process alone run a
        unit, and with it the collectives inside, and hang the others.
        """
        if not (self.check_finite and self.shared_output) or ctx.full or not self._step_forecasts or output is None:
            return False
        if _all_finite((output,)):
            return False
        for unit in ctx.units.values():
            unit.restart()
        note = "forecast output not finite: the step ran again in full and every ladder restarted"
        ctx.guard_notes[note] = ctx.guard_notes.get(note, 0) + 1
        ctx.full = True
        self._served.clear()
        self._open.clear()
        self._fallbacks.clear()
        self._step_forecasts = 0
        self._draft = None
        return True

    def _redo_step(self, ctx: ContextState) -> bool:
        """Undo a rejected draft and make the step full; ``False`` if it cannot be (anchors were recorded)."""
        if self._step_recorded or self._draft is None:
            ctx.guard_notes.setdefault("rejection ignored: the draft recorded anchors (a fallback)", 0)
            ctx.guard_notes["rejection ignored: the draft recorded anchors (a fallback)"] += 1
            return False
        saved = self._draft.undo(ctx)
        total = self.flops.model.get(self._signature or ())
        if total is None:
            ctx.flops_measured = False
        else:
            ctx.flops_overhead += total - saved  # what the draft forward executed
        ctx.rejected_steps += 1
        ctx.full = True
        self._served.clear()
        self._fallbacks.clear()
        self._open.clear()
        self._draft = None
        self._step_forecasts = 0
        self._mask = None
        return True

    def _owns(self, key: str) -> bool:
        """Whether unit ``key`` belongs to the denoiser now running."""
        if self._prefix:
            return key.startswith(self._prefix)
        return not any(prefix and key.startswith(prefix) for *_, prefix in self._models.values())

    def _plan_memory(self, ctx: ContextState, signature: tuple[Any, ...]) -> None:
        """Put the memory plan of this denoiser and these input shapes in force, once its first step ran.

        Until then (the first step with new shapes, of each denoiser) each unit's first anchor is held
        as accurately as the budget still allows (:meth:`_first_storage`), so that the budget holds
        from the first anchor on. A plan is made again when a unit or a context it did not see
        appears (their bytes were not counted).
        """
        if self.planner is None:
            return
        key = (ctx.model, *signature)
        plan = self._plans.get(key)
        stale = plan is not None and (self._unplanned or len(self.contexts) > plan.contexts)
        if (plan is None or stale) and key in self._stepped:  # every unit's shapes are known
            plan = self._plans[key] = self.planner.plan(self.contexts.values(), self.block_layouts, self._owns)
        self._unplanned = False
        if plan is self.plan:
            return
        self.plan = plan  # None: new shapes, not planned yet
        if plan is None:
            return
        for context in self.contexts.values():
            for unit_key in [k for k in context.units if self._owns(k)]:
                if any(unit_key.startswith(block + ".") for block in plan.coarse):
                    del context.units[unit_key]  # served within its block's residual from now on
                else:
                    context.units[unit_key].restore(plan.storage_of(unit_key))

    def _first_storage(self, state: UnitState, outputs: UnitOutputs) -> None:
        """Store a unit's first anchor, before the plan exists, as accurately as the budget still allows.

        When even the cheapest storage does not fit, units stored earlier move to it (largest first):
        the first step fits whenever every unit's first anchor in the cheapest storage does.
        """
        assert self.planner is not None
        cheapest = self.planner.provisional
        assert cheapest.format is not None
        held = self._make_room(sum(cheapest.format.of(0).nbytes(tuple(o.shape)) for o in outputs))
        state.restore(self.planner.first_storage(outputs, held))

    def _make_room(self, need: int) -> int:
        """Before the plan: move stored units to the cheapest storage (largest first) until ``need`` more bytes
        fit the budget; return the bytes then held."""
        assert self.planner is not None
        cheapest = self.planner.provisional
        held = sum(c.nbytes for c in self.contexts.values())
        if held + need > self.planner.budget:
            stored = [u for c in self.contexts.values() for u in c.units.values() if not u.empty]
            for unit in sorted(stored, key=lambda u: -u.nbytes):
                if unit.storage != cheapest:
                    before = unit.nbytes
                    unit.restore(cheapest)
                    held -= before - unit.nbytes
                    if held + need <= self.planner.budget:
                        break
        return held

    def _run_generation_checks(self) -> None:
        for check in self.generation_checks:
            check()

    def _start_generation(self, ctx: ContextState, total_steps: int | None) -> None:
        self._run_generation_checks()
        if not any(c.step > 0 for c in self.contexts.values() if c is not ctx):
            self.peak_cache_bytes = 0  # no other context is mid-run: a new generation's peak
        ctx.reset()
        ctx.total_steps = total_steps if total_steps is not None else self._announced_steps
        ctx.policy_state = self.policy.new_policy_state()
        ctx.guard_reason = self.policy.guard(ctx.total_steps)
        self.generations += 1

    # -- units -------------------------------------------------------------------------------
    def unit(
        self,
        key: str,
        compute: Callable[[], torch.Tensor | Sequence[torch.Tensor]],
        *,
        streams: Sequence[str] | None = ("",),
        token_paths: Sequence[TokenPath] = (),
        batch_rows: BatchRows | None = None,
        block: int = -1,
        kind: str = "block",
        inputs: Hashable = None,
    ) -> UnitOutputs:
        """Outputs of the cacheable computation ``key`` at the current step.

        On a full step (or with nothing cached yet) ``compute()`` runs and its outputs become the
        unit's newest anchor; otherwise the policy decides (:meth:`Policy.decide`): compute,
        forecast (``compute`` does not run, unless the forecast is not finite: then it runs,
        counted as a fallback), verify, or a per-sample mask (``batch_rows(index)`` computes the
        unit for the samples in ``index``). Outside a transformer forward ``compute()`` simply
        runs. ``streams`` names the outputs; ``None`` takes as many unnamed streams as the first
        computation returns. ``block`` and ``kind`` say where the unit sits and what it computes
        (:class:`~hicache_sdk.decision.UnitInfo`). ``inputs``, when given, describes the unit's
        inputs (e.g. their shapes): when it changes, the unit's ladders restart and it computes
        (a token count that changes within a generation).

        Under ``torch.compile`` only ``compute()`` is traced: serving and recording are kept out
        of the graph, so step counters and forecast weights never cause a recompilation.

        Inside a coarser unit that computes (:meth:`passthrough`), ``compute()`` simply runs.
        """
        if self._passthrough:
            return _as_tuple(compute())
        served = self.open_unit(
            key,
            compute,
            streams=streams,
            token_paths=token_paths,
            batch_rows=batch_rows,
            block=block,
            kind=kind,
            inputs=inputs,
        )
        if served is not None:
            return served
        outputs = _as_tuple(compute())
        self.close_unit(key, outputs)
        return outputs

    def open_unit(
        self,
        key: str,
        compute: Callable[[], torch.Tensor | Sequence[torch.Tensor]] | None = None,
        *,
        streams: Sequence[str] | None = ("",),
        token_paths: Sequence[TokenPath] = (),
        batch_rows: BatchRows | None = None,
        block: int = -1,
        kind: str = "block",
        inputs: Hashable = None,
    ) -> UnitOutputs | None:
        """The first half of :meth:`unit`, for a unit whose computation spans several calls (a block range).

        Returns the unit's outputs when it is not computed at this step; ``None`` when the caller
        must compute it and hand the outputs to :meth:`close_unit` within the same step. Without
        ``compute``, a forecast that is not finite and a ``VERIFY`` decision compute the unit too.
        """
        key = self._prefix + key
        if self.current is not None:
            if key in self._served:
                raise AdapterMismatchError(
                    f"unit {key!r} was served twice in one step: a module called several times per block "
                    "(e.g. one feed-forward for image and text tokens) needs one unit key per call"
                )
            self._served.add(key)
        return self._serve(key, compute, streams, token_paths, batch_rows, block, kind, inputs)

    def close_unit(self, key: str, outputs: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Record the outputs of a unit that :meth:`open_unit` asked to compute (no-op outside a forward)."""
        self._record(self._prefix + key, _as_tuple(outputs))

    @contextmanager
    def passthrough(self) -> Iterator[None]:
        """Within: units served by :meth:`unit` just run and blocks are not shown to the policy.

        A coarser unit (a block's residual, a block range, the model output) computes its inside
        this way, so that the finer units inside it are neither cached nor counted.
        """
        self._passthrough += 1
        try:
            yield
        finally:
            self._passthrough -= 1

    def sharded_like(self, whole: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
        """``whole``'s share on this process when it is the whole of a sequence ``shard`` is a share of, else
        ``whole``."""
        if self.shard is None or whole.shape == shard.shape:
            return whole
        mine = self.shard(whole)
        return mine if mine.shape == shard.shape else whole

    def measured(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()``, with its FLOPs noted as those of unit ``key`` when this step counts FLOPs."""
        if self._counter is None or self.current is None or self._signature is None:
            return compute()
        before = self._counter.get_total_flops()
        result = compute()
        self.flops.units.setdefault(self._signature, {})[self._prefix + key] = float(
            self._counter.get_total_flops() - before
        )
        return result

    def note_block_layout(self, key: str, outputs: Sequence[torch.Tensor]) -> None:
        """Note the shapes and dtypes of block ``key``'s outputs (what its residual unit would hold)."""
        self.block_layouts[self._prefix + key] = tuple((tuple(v.shape), v.dtype) for v in outputs)

    def is_coarse(self, block_key: str) -> bool:
        """Whether the memory plan serves the block ``block_key`` as one residual unit."""
        return self.plan is not None and self._prefix + block_key in self.plan.coarse

    def storage_for(self, key: str) -> LadderStorage | None:
        """How the ladders of unit ``key`` (with its denoiser prefix) are held."""
        if self.plan is not None:
            return self.plan.storage_of(key)
        if self.planner is not None:
            return self.planner.provisional
        return self.storage

    @property
    def offloading(self) -> bool:
        """Whether some ladders may be held on an offload device (then units are prefetched)."""
        if self.plan is not None:
            return self.plan.offloads
        return self.storage is not None and self.storage.offload is not None

    def _prefetch_after(self, ctx: ContextState, position: int, block: int) -> None:
        """Start fetching the ladders of the units served next (in the last step's order), about a block ahead."""
        for key in self._order[position + 1 : position + 1 + PREFETCH_UNITS]:
            state = ctx.units.get(key)
            if state is None:
                continue
            if block >= 0 and state.block > block + 1:
                break
            for ladder in state.ladders:
                ladder.prefetch()

    @torch.compiler.disable
    def _serve(
        self,
        key: str,
        compute: Callable[[], torch.Tensor | Sequence[torch.Tensor]] | None,
        streams: Sequence[str] | None,
        token_paths: Sequence[TokenPath],
        batch_rows: BatchRows | None = None,
        block: int = -1,
        kind: str = "block",
        inputs: Hashable = None,
    ) -> UnitOutputs | None:
        """The unit's outputs if they are not computed whole at this step, else ``None``."""
        ctx = self.current
        if ctx is None:
            # a unit served outside any transformer forward: something bypasses the step hook
            # (another cache wrapping the model refuses itself here) or a block is called directly
            self._run_generation_checks()
            return None
        state = ctx.units.get(key)
        if state is None:
            state = ctx.units[key] = UnitState(
                key, streams, self.policy.max_order, self.storage_for(key), block=block, kind=kind
            )
            if self.plan is not None and key not in self.plan.storages and key not in self.plan.coarse:
                self._unplanned = True  # its bytes are not in the plan: plan again at the next step
        self._order_now.append(key)
        if self.offloading:
            position = self._position.get(key)
            if position is not None:
                self._prefetch_after(ctx, position, block)
        if inputs is not None and state.inputs != inputs:
            if state.inputs is not None:
                state.restart()  # new input shapes: the old anchors do not forecast these outputs
            state.inputs = inputs
        decision = Decision.COMPUTE if ctx.full or state.empty else self.policy.decide(ctx, state)
        if decision is Decision.VERIFY and compute is None:
            decision = Decision.COMPUTE  # a unit spanning several calls cannot run twice to check a forecast
        rows: torch.Tensor | None = None
        if isinstance(decision, torch.Tensor):
            rows = self._rows_of(decision, state)
            if rows.numel() in (0, decision.numel()):  # one kind of sample: a whole-unit decision
                decision = Decision.FORECAST if rows.numel() == 0 else Decision.COMPUTE
                rows = None
        if decision is Decision.COMPUTE:
            self._open[key] = self._counter.get_total_flops() if self._counter is not None else None
            return None
        if not isinstance(decision, (Decision, torch.Tensor)):
            raise TypeError(
                f"policy {self.policy.name!r} decided {decision!r} for unit {key!r}; expected a Decision or a mask"
            )
        self._step_forecasts += 1  # a step the policy forecast in (fallbacks included) is a forecast step
        recomputed = [0]
        paths = tuple(self._counted(p, recomputed) for p in token_paths)
        outputs = self._checked_layout(state, self.policy.forecast(ctx, state, paths))
        if self.check_finite and not self.shared_output and not _all_finite(outputs):
            state.counts.fallbacks += 1
            for ladder in state.ladders:  # restart from the fresh output: a non-finite ladder would fail again
                ladder.reset()
            if compute is None:  # the caller computes it and closes the unit
                self._fallbacks.add(key)
                return None
            return self._notify(ctx, key, "fallback", self._record_outputs(ctx, state, _as_tuple(compute()), True))
        batch = _batch_of(outputs)
        state.counts.forecast += 1
        computed_share = self._token_fraction(state, token_paths, recomputed[0])
        if decision is Decision.VERIFY:
            state.counts.verified += 1
            assert compute is not None
            self.policy.verify(ctx, state, outputs, _as_tuple(compute()))
            computed_share = 1.0
        elif rows is not None:
            outputs = self._mixed(ctx, state, key, outputs, rows, batch_rows)
            computed_share = max(computed_share, rows.numel() / batch)
        if recomputed[0] or rows is not None:
            state.counts.partial += 1
        state.counts.count_samples(batch, None if rows is None else rows.tolist())
        self._notify(ctx, key, "forecast", outputs)
        flops = self.flops.units.get(self._signature or (), {}).get(key)
        if flops is None:
            ctx.flops_measured = False
        else:
            ctx.flops_saved += flops * (1.0 - computed_share)
        return outputs

    def _rows_of(self, mask: torch.Tensor, state: UnitState) -> torch.Tensor:
        """The host index of a per-sample mask's ``True`` samples (one synchronisation per mask per step)."""
        if self._mask is not None and self._mask[0] is mask:
            return self._mask[1]
        batch = state.layout[0][0][0] if state.layout and state.layout[0][0] else None
        if mask.dtype != torch.bool or mask.dim() != 1 or (batch is not None and mask.shape[0] != batch):
            raise TypeError(
                f"policy {self.policy.name!r} returned a mask of {mask.dtype} {tuple(mask.shape)} for unit "
                f"{state.key!r}; a per-sample mask is a boolean tensor of shape ({batch},)"
            )
        rows = mask.nonzero().flatten().cpu()
        self._mask = (mask, rows)
        return rows

    def _mixed(
        self,
        ctx: ContextState,
        state: UnitState,
        key: str,
        forecast: UnitOutputs,
        rows: torch.Tensor,
        batch_rows: BatchRows | None,
    ) -> UnitOutputs:
        """The forecast with the samples in ``rows`` computed on the sub-batch and recorded as anchors."""
        if batch_rows is None:
            raise AdapterMismatchError(
                f"policy {self.policy.name!r} decided per sample for unit {key!r}, whose adapter cannot run "
                "a sub-batch; use an adapter that splits batches (e.g. 'flux') or per_sample=False"
            )
        fresh = self._checked_rows(state, _as_tuple(batch_rows(rows.to(forecast[0].device))), rows.numel())
        self.policy.on_computed(ctx, state, fresh, rows)
        self._step_recorded = True
        index = rows.to(forecast[0].device)
        return tuple(f.index_copy(0, index, v.to(f.dtype)) for f, v in zip(forecast, fresh, strict=True))

    def _checked_rows(self, state: UnitState, fresh: UnitOutputs, count: int) -> UnitOutputs:
        want = tuple(((count, *shape[1:]), dtype, device) for shape, dtype, device in state.layout)
        got = tuple((tuple(o.shape), o.dtype, o.device) for o in fresh)
        if got != want:
            raise ForecastLayoutError(
                f"unit {state.key!r} computed on {count} samples gave {list(got)}, expected {list(want)}"
            )
        return fresh

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
        if key in self._fallbacks:
            self._fallbacks.discard(key)
            self._notify(ctx, key, "fallback", self._record_outputs(ctx, state, outputs, True))
            return
        before = self._open.pop(key, None)
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
        if self.planner is not None and self.plan is None and state.empty:
            self._first_storage(state, outputs)
        self.policy.on_computed(ctx, state, outputs)
        if not ctx.full:
            self._step_recorded = True
        if not fallback:
            state.counts.computed += 1
            batch = _batch_of(outputs)
            state.counts.count_samples(batch, range(batch))
        return outputs

    @staticmethod
    def _counted(path: TokenPath, recomputed: list[int]) -> TokenPath:
        """Wrap a token path so the number of recomputed tokens is counted."""

        def compute(index: torch.Tensor) -> torch.Tensor:
            recomputed[0] += index.numel()
            return path.compute(index)

        return attrs.evolve(path, compute=compute)

    @staticmethod
    def _token_fraction(state: UnitState, token_paths: Sequence[TokenPath], recomputed: int) -> float:
        """Share of the unit's tokens recomputed at this step (0 when no token path ran)."""
        if not recomputed:
            return 0.0
        served = {p.stream for p in token_paths}
        total = sum(
            int(shape[0] * shape[1])
            for stream, (shape, _, _) in zip(state.streams, state.layout, strict=True)
            if stream in served
        )
        return min(1.0, recomputed / total) if total else 0.0

    @property
    def watches_blocks(self) -> bool:
        """Whether the policy looks at blocks (:meth:`block` does nothing otherwise)."""
        return self._watches_blocks

    @torch.compiler.disable
    def block(self, index: int, tokens_in: torch.Tensor, tokens_out: torch.Tensor) -> None:
        """Show the policy a block's image tokens before and after it ran (adapters call this after each block).

        Called at every step; costs nothing unless the policy overrides
        :meth:`Policy.on_block <hicache_sdk.Policy.on_block>`. When the policy declares
        ``block_work_flops`` (matrix work such as clustering) its FLOPs here are counted, kept out
        of the model's FLOPs and charged against the savings.
        """
        ctx = self.current
        if ctx is None or not self._watches_blocks or self._passthrough:
            return
        tokens_in = self.sharded_like(tokens_in, tokens_out)
        view = BlockView(index, self.num_blocks, tokens_in, tokens_out, self.observed_blocks)
        if not self.policy.block_work_flops:
            self.policy.on_block(ctx, view)
            return
        with flop_counter_mode() as counter:
            self.policy.on_block(ctx, view)
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
