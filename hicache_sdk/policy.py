"""The cache-policy interface: what a policy decides, when, and how it serves a unit it does not compute.

:class:`Policy` is the base of every policy; :class:`IntervalPolicy` decides from the step index
alone (FORA, TaylorSeer, ClusCa); :class:`DynamicPolicy` decides from what it observes, with a
warm-up, an always-full tail and a fail-open guard (First Block Cache, EasyCache, SpeCa, ...).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import attrs
import torch

from .basis import MAX_SUPPORTED_ORDER, Basis
from .decision import BlockView, Decision, StepInfo, UnitDecision
from .errors import InvalidParameterError, did_you_mean
from .schedule import SCHEDULES, Schedule, is_full_step
from .state import ContextState, UnitState
from .validation import attrs_validator, check_bool, check_int, check_real

if TYPE_CHECKING:
    from .adapter import Adapter

__all__ = [
    "DynamicConfig",
    "DynamicPolicy",
    "IntervalPolicy",
    "Policy",
    "ScheduleConfig",
    "TokenPath",
    "interval_field",
    "order_field",
    "tail_field",
    "threshold_field",
    "warmup_field",
]


def _check_schedule(instance: Any, attribute: Any, value: Any) -> None:
    if value not in SCHEDULES:
        hint = did_you_mean(value, SCHEDULES) if isinstance(value, str) else ""
        raise InvalidParameterError(f"{attribute.name} must be one of {SCHEDULES}, got {value!r}.{hint}")


def interval_field(default: int) -> Any:
    """An attrs field for ``interval`` (N >= 1); subclasses redeclare it to change the default."""
    return attrs.field(default=default, validator=attrs_validator(check_int, minimum=1))


def warmup_field(default: int) -> Any:
    """An attrs field for ``warmup`` (W >= 0)."""
    return attrs.field(default=default, validator=attrs_validator(check_int, minimum=0))


def tail_field(default: int = 0) -> Any:
    """An attrs field for ``tail`` (>= 0, the last steps of a generation that are always full)."""
    return attrs.field(default=default, validator=attrs_validator(check_int, minimum=0))


def threshold_field(default: float) -> Any:
    """An attrs field for a decision threshold (a finite real > 0)."""
    return attrs.field(default=default, validator=attrs_validator(check_real, low=0.0, low_open=True))


def order_field(default: int) -> Any:
    """An attrs field for ``max_order`` (m in 0..6, the highest finite-difference order kept)."""
    return attrs.field(default=default, validator=attrs_validator(check_int, minimum=0, maximum=MAX_SUPPORTED_ORDER))


@attrs.frozen(kw_only=True)
class ScheduleConfig:
    """Fields shared by interval policies.

    Attributes:
        interval: N >= 1, period of full steps after warm-up (N = 1 computes every step).
        warmup: W >= 0, leading steps that are always full.
        schedule: ``"reference"`` (TaylorSeer/HiCache/ClusCa code) or ``"diffusers"``
            (``TaylorSeerCacheConfig``); see :mod:`hicache_sdk.schedule`.
        tail: the last ``tail`` steps of every generation are full (diffusers'
            ``disable_cache_after_step = steps - tail``, the reference code's end enhancement);
            0 by default. Needs the number of steps: a diffusers pipeline tells it (its cache
            context or its scheduler, when the accelerator is applied to the pipeline); a bare loop
            passes it to :meth:`~hicache_sdk.CacheHandle.reset`.
    """

    interval: int = interval_field(6)
    warmup: int = warmup_field(3)
    schedule: Schedule = attrs.field(default="reference", validator=_check_schedule)
    tail: int = tail_field()


@attrs.frozen
class TokenPath:
    """Recomputes a token-wise unit (e.g. an MLP) on a subset of tokens.

    Attributes:
        compute: ``index (B, K) -> output (B, K, D)``: the unit's real output at those tokens.
        kind: ``"image"`` or ``"text"`` tokens.
        stream: the unit stream this path serves.
        module: the module it recomputes, relative to the unit's block (e.g. ``"ff"``).
    """

    compute: Callable[[torch.Tensor], torch.Tensor]
    kind: Literal["image", "text"]
    stream: str = ""
    module: str = ""


class Policy(abc.ABC):
    """Base class of cache policies: decides, per step and per unit, what computes and what is forecast.

    A policy has a frozen attrs ``Config`` class (validated on creation; every field has a default)
    and is built from a config and a basis. The runtime calls it at these points of each step of
    each context (CFG branch), in this order:

    1. :meth:`plan_step` at step start, with a :class:`~hicache_sdk.decision.StepInfo`: ``True``
       makes the step *full* (every unit computes; nothing else is asked).
    2. :meth:`decide` for each unit of a step that is not full (and whose unit holds an anchor):
       compute, forecast, verify, or a per-sample mask.
    3. :meth:`on_block` after each block ran, with its image tokens in and out (only if overridden):
       a probe. Blocks run in order, so a decision taken here serves the units of later blocks.
    4. :meth:`on_computed` with each unit's fresh outputs (record an anchor), :meth:`forecast` for
       each forecast unit, :meth:`verify` for each verified unit.
    5. :meth:`end_step` with the model's output: ``False`` rejects a step that forecast something;
       the runtime then runs the transformer again with every unit computed (SpeCa's rejection).

    Decisions are cheap and deterministic: a policy reads tensor statistics through the context's
    reduction point (``ctx.reduce``, see :meth:`DynamicPolicy.relative_change`) and turns them into
    a Python ``bool`` at most once per decision point (one host synchronisation on a GPU), or
    returns a per-sample mask tensor that the runtime turns into a sub-batch once per step.

    The base class computes every step: subclass :class:`IntervalPolicy` for a step-index schedule
    or :class:`DynamicPolicy` for a policy that decides from signals.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    #: whether the policy needs units that can be recomputed on a subset of tokens
    needs_token_paths: ClassVar[bool] = False
    #: whether :meth:`on_block` does matrix work (e.g. clustering) whose FLOPs the runtime must
    #: count and charge against the savings (off: each count costs ~0.1 ms on a CPU)
    block_work_flops: ClassVar[bool] = False

    def __init__(self, config: Any, basis: Basis) -> None:
        if not isinstance(config, self.Config):
            raise InvalidParameterError(
                f"policy {self.name!r} expects a {self.Config.__name__}, got {type(config).__name__}"
            )
        if not isinstance(basis, Basis):
            raise InvalidParameterError(f"basis must be a hicache_sdk.Basis instance, got {basis!r}")
        self.config: Any = config
        self.basis = basis

    @property
    def max_order(self) -> int:
        """Highest ladder order this policy keeps (0 for configs without ``max_order``)."""
        return int(getattr(self.config, "max_order", 0))

    @property
    def needs_batch_split(self) -> bool:
        """Whether :meth:`decide` may return per-sample masks (the adapter must split a batch)."""
        return False

    def check_adapter(self, adapter: Adapter) -> None:
        """Raise :class:`~hicache_sdk.InvalidParameterError` if a setting does not fit ``adapter``'s model.

        Called by :meth:`~hicache_sdk.Accelerator.apply` before anything is attached, so a setting
        that depends on the model (e.g. a block index) fails there, not at the first generation.
        """
        return None

    def check_units(self, units: str) -> None:
        """Raise :class:`~hicache_sdk.errors.InvalidParameterError` if this policy cannot serve units of
        granularity ``units`` (``"modules"``, ``"block"``, ``"range"``, ``"output"``).

        By default a policy that watches blocks (overrides :meth:`on_block`) refuses ``"range"`` and
        ``"output"``: on their forecast steps no block runs to be watched.
        """
        if units in ("range", "output") and type(self).on_block is not Policy.on_block:
            raise InvalidParameterError(
                f"policy {self.name!r} watches blocks as they run; with units={units!r} no block runs on forecast "
                "steps. Use units='modules' or 'block'."
            )

    def new_policy_state(self) -> Any:
        """Per-context state of the policy (``ctx.policy_state``), created at the start of each generation."""
        return None

    def guard(self, total_steps: int | None) -> str | None:
        """Why a generation of ``total_steps`` steps must compute every step (fail-open), or ``None``.

        Called at the start of each generation; a reason makes every step full and appears in the
        run summary's notes.
        """
        return None

    # -- the three decision points -----------------------------------------------------------
    def plan_step(self, ctx: ContextState, info: StepInfo) -> bool:
        """Whether the step starting now is full (every unit computes). The base class: always."""
        return True

    def on_block(self, ctx: ContextState, view: BlockView) -> None:
        """See a block's image tokens after it ran, at every step (only called if overridden)."""
        return None

    def decide(self, ctx: ContextState, unit: UnitState) -> UnitDecision:
        """How ``unit`` is served at a step that is not full: a :class:`~hicache_sdk.decision.Decision` or a mask.

        A mask is a boolean tensor of shape ``(batch,)`` on the unit's device: ``True`` samples
        compute (on the sub-batch), ``False`` ones are forecast. The base class forecasts.
        """
        return Decision.FORECAST

    def end_step(self, ctx: ContextState, output: torch.Tensor | None) -> bool:
        """Accept the step that just ran (``True``) or reject it (``False``: it runs again in full).

        ``output`` is the model's main output (or ``None``). Only a step that forecast some unit can
        be rejected, and only if no unit recorded an anchor in it (decide ``VERIFY``, not
        ``COMPUTE``, for the units that check a draft).
        """
        return True

    # -- per-unit work -----------------------------------------------------------------------
    def on_computed(
        self,
        ctx: ContextState,
        unit: UnitState,
        outputs: tuple[torch.Tensor, ...],
        rows: torch.Tensor | None = None,
    ) -> None:
        """Record a unit's freshly computed outputs as its newest anchor (every ladder extends).

        ``rows`` (a host index of samples) is given when only those samples computed: ``outputs``
        then hold just those rows. With ``max_order`` 0 the ladder holds the newest output.
        """
        unit.record(outputs, ctx.step, rows=rows)

    def forecast(
        self, ctx: ContextState, unit: UnitState, token_paths: tuple[TokenPath, ...]
    ) -> tuple[torch.Tensor, ...]:
        """The unit's outputs at a forecast step: the basis forecast of every stream.

        ``token_paths`` recompute the unit on chosen tokens (the runtime counts what they recompute).
        """
        return tuple(ladder.forecast(ctx.step, self.basis) for ladder in unit.ladders)

    def verify(
        self,
        ctx: ContextState,
        unit: UnitState,
        forecast: tuple[torch.Tensor, ...],
        computed: tuple[torch.Tensor, ...],
    ) -> None:
        """Compare a verified unit's forecast with its computed outputs (a decision ``VERIFY``)."""
        return None

    # -- description -------------------------------------------------------------------------
    @property
    def tag(self) -> str:
        """Readable identity, e.g. ``taylorseer[hermite(sigma=0.5)](interval=7, ...)``."""
        names = [a.name for a in attrs.fields(self.Config)]
        first = [n for n in ("interval", "warmup", "schedule", "max_order") if n in names]  # subclasses reorder
        ordered = first + [n for n in names if n not in first and not (n == "tail" and self.config.tail == 0)]
        params = ", ".join(f"{n}={getattr(self.config, n)!r}" for n in ordered)
        return f"{self.name}[{self.basis.tag}]({params})"


def _in_tail(policy: Policy, step: int, total_steps: int | None) -> bool:
    tail = int(getattr(policy.config, "tail", 0))
    if tail == 0:
        return False
    if total_steps is None:
        raise InvalidParameterError(
            f"policy {policy.name!r} has tail={tail} (always-full last steps) but the number of steps of this "
            "generation is unknown: apply the accelerator to the diffusers pipeline (its scheduler tells it), "
            "or call handle.reset(num_steps=...) before a bare denoising loop"
        )
    return step >= total_steps - tail


class IntervalPolicy(Policy):
    """A policy whose full steps follow the step index (a :class:`ScheduleConfig` schedule).

    Every unit is forecast on the other steps. Under the ``"reference"`` schedule higher orders start
    only from step ``W - 1`` on (the reference code's rule), so warm-up anchors one step apart do not
    feed a spacing-1 slope into the ladder; the ``"diffusers"`` schedule has no such rule (as
    diffusers' ``TaylorSeerCacheConfig`` hook). With ``interval`` 1 nothing is recorded.
    """

    def is_full_step(self, step: int) -> bool:
        """Whether ``step`` (0-based, within one generation) computes every unit."""
        c = self.config
        return is_full_step(step, interval=c.interval, warmup=c.warmup, schedule=c.schedule)

    def in_full_tail(self, step: int, total_steps: int | None) -> bool:
        """Whether ``step`` is among the last ``tail`` steps of a ``total_steps``-step generation.

        Raises:
            InvalidParameterError: ``tail`` is set and the number of steps is unknown.
        """
        return _in_tail(self, step, total_steps)

    def plan_step(self, ctx: ContextState, info: StepInfo) -> bool:
        return self.in_full_tail(info.step, info.total_steps) or self.is_full_step(info.step)

    def on_computed(
        self,
        ctx: ContextState,
        unit: UnitState,
        outputs: tuple[torch.Tensor, ...],
        rows: torch.Tensor | None = None,
    ) -> None:
        if self.config.interval == 1:
            return
        extend = self.config.schedule == "diffusers" or ctx.step >= self.config.warmup - 1
        unit.record(outputs, ctx.step, extend=extend, rows=rows)


@attrs.frozen(kw_only=True)
class DynamicConfig:
    """Fields shared by dynamic policies.

    Attributes:
        warmup: W >= 0 leading steps that always compute.
        tail: the last ``tail`` steps always compute (needs the number of steps, as
            :class:`ScheduleConfig`'s ``tail``).
        max_order: m, the highest finite-difference order the basis forecasts from (0: reuse).
        guard: fail open (compute every step, said in the summary) on generations shorter than
            ``min_steps`` and on steps whose signal is below ``noise_floor``.
        min_steps: the fewest steps a generation needs for caching (few-step and distilled
            schedules change too much per step to reuse anything); unknown step counts are not
            guarded.
        noise_floor: a reference magnitude (mean absolute value of the signal the relative change is
            taken against) at or below which the relative change means nothing: the step computes.
    """

    warmup: int = warmup_field(8)
    tail: int = tail_field()
    max_order: int = order_field(1)
    guard: bool = attrs.field(default=True, validator=attrs_validator(check_bool))
    min_steps: int = attrs.field(default=16, validator=attrs_validator(check_int, minimum=1))
    noise_floor: float = attrs.field(default=1e-6, validator=attrs_validator(check_real, low=0.0))


class DynamicPolicy(Policy):
    """A policy that decides from signals, with a :class:`DynamicConfig`'s warm-up, tail and guard.

    :meth:`plan_step` makes warm-up, tail and guarded steps full and asks :meth:`plan_signal` for
    the others (``False`` by default: the step is decided per unit and at probes).
    """

    def guard(self, total_steps: int | None) -> str | None:
        c = self.config
        if c.guard and total_steps is not None and total_steps < c.min_steps:
            return f"guard: {total_steps} steps < min_steps={c.min_steps} (few-step schedule): every step computed"
        return None

    def plan_step(self, ctx: ContextState, info: StepInfo) -> bool:
        if info.step < self.config.warmup or _in_tail(self, info.step, info.total_steps):
            return True
        return self.plan_signal(ctx, info)

    def plan_signal(self, ctx: ContextState, info: StepInfo) -> bool:
        """The step-start decision after warm-up and outside the tail (``True``: full)."""
        return False

    def relative_change(
        self, ctx: ContextState, value: torch.Tensor, reference: torch.Tensor, *, per_sample: bool = False
    ) -> torch.Tensor:
        """``sum|value - reference| / sum|reference|`` through ``ctx.reduce``, guarded by the noise floor.

        With the guard on, a change at or below ``noise_floor`` (or a zero reference) carries no
        information (identical probes, a saturated signal) and reads as ``inf``, so a threshold
        test computes; :meth:`fail_open_if_unreadable` says so in the summary. A float32 scalar (or
        ``(batch,)`` with ``per_sample``) on the inputs' device; no host synchronisation.
        """
        diff = (value.float() - reference.float()).abs()
        ref = reference.float().abs()
        dims = tuple(range(1, ref.dim())) if per_sample else tuple(range(ref.dim()))
        sums = ctx.reduce(torch.stack([diff.sum(dims), ref.sum(dims)]))
        change = sums[0] / sums[1].clamp_min(torch.finfo(torch.float32).tiny)
        if self.config.guard:
            unreadable = (change <= self.config.noise_floor) | (sums[1] == 0)
            change = torch.where(unreadable, torch.inf, change)
        return change

    def fail_open_if_unreadable(self, ctx: ContextState, change: float) -> bool:
        """Make the step full and note it if ``change`` (from :meth:`relative_change`) is ``inf``."""
        if change == float("inf"):
            ctx.fail_open(f"guard: signal at the noise floor ({self.config.noise_floor:g}), step computed")
            return True
        return False
