"""The cache-policy interface: when a step is full, and how a unit is served on the other steps."""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import attrs
import torch

from .basis import MAX_SUPPORTED_ORDER, Basis
from .errors import InvalidParameterError, did_you_mean
from .schedule import SCHEDULES, Schedule, is_full_step
from .state import ContextState, UnitState
from .validation import attrs_validator, check_int

if TYPE_CHECKING:
    from .adapter import Adapter

__all__ = ["Policy", "ScheduleConfig", "TokenPath", "interval_field", "order_field", "tail_field", "warmup_field"]


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
    """

    compute: Callable[[torch.Tensor], torch.Tensor]
    kind: Literal["image", "text"]
    stream: str = ""


class Policy(abc.ABC):
    """Base class of cache policies.

    A policy has a frozen attrs ``Config`` class (validated on creation) and is built from a config
    and a basis. The runtime asks it whether each step is full, hands it each unit's outputs on
    full steps (:meth:`on_full`) and asks it for each unit's outputs on forecast steps
    (:meth:`forecast`).
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    #: whether the policy needs units that can be recomputed on a subset of tokens
    needs_token_paths: ClassVar[bool] = False

    def __init__(self, config: Any, basis: Basis) -> None:
        if not isinstance(config, self.Config):
            raise InvalidParameterError(
                f"policy {self.name!r} expects a {self.Config.__name__}, got {type(config).__name__}"
            )
        if not isinstance(basis, Basis):
            raise InvalidParameterError(f"basis must be a hicache_sdk.Basis instance, got {basis!r}")
        self.config: Any = config
        self.basis = basis

    # -- schedule ----------------------------------------------------------------------------
    @property
    def max_order(self) -> int:
        """Highest ladder order this policy keeps (0 for configs without ``max_order``)."""
        return int(getattr(self.config, "max_order", 0))

    def is_full_step(self, step: int) -> bool:
        """Whether ``step`` (0-based, within one generation) computes every unit."""
        c = self.config
        return is_full_step(step, interval=c.interval, warmup=c.warmup, schedule=c.schedule)

    def in_full_tail(self, step: int, total_steps: int | None) -> bool:
        """Whether ``step`` is among the last ``tail`` steps of a ``total_steps``-step generation.

        Raises:
            InvalidParameterError: ``tail`` is set and the number of steps is unknown.
        """
        tail = int(getattr(self.config, "tail", 0))
        if tail == 0:
            return False
        if total_steps is None:
            raise InvalidParameterError(
                f"policy {self.name!r} has tail={tail} (always-full last steps) but the number of steps of this "
                "generation is unknown: apply the accelerator to the diffusers pipeline (its scheduler tells it), "
                "or call handle.reset(num_steps=...) before a bare denoising loop"
            )
        return step >= total_steps - tail

    def check_adapter(self, adapter: Adapter) -> None:
        """Raise :class:`~hicache_sdk.InvalidParameterError` if a setting does not fit ``adapter``'s model.

        Called by :meth:`~hicache_sdk.Accelerator.apply` before anything is attached, so a setting
        that depends on the model (e.g. a block index) fails there, not at the first generation.
        """
        return None

    # -- per-unit work -----------------------------------------------------------------------
    def new_policy_state(self) -> Any:
        """Per-context state of the policy, created at the start of each generation."""
        return None

    def on_full(self, ctx: ContextState, unit: UnitState, outputs: tuple[torch.Tensor, ...]) -> None:
        """Record a unit's freshly computed outputs as a new anchor.

        Under the ``"reference"`` schedule higher orders start only from step ``W - 1`` on (the
        reference code's rule), so warm-up anchors one step apart do not feed a spacing-1 slope into
        the ladder; the ``"diffusers"`` schedule has no such rule (every anchor extends the ladder,
        as diffusers' ``TaylorSeerCacheConfig`` hook does). With ``interval`` 1 every step is full
        and no ladder is ever read, so nothing is recorded (no time, no memory).
        """
        if self.config.interval == 1:
            return
        extend = self.config.schedule == "diffusers" or ctx.step >= self.config.warmup - 1
        for ladder, value in zip(unit.ladders, outputs, strict=True):
            ladder.update(value, ctx.step, extend=extend)

    def forecast(
        self, ctx: ContextState, unit: UnitState, token_paths: tuple[TokenPath, ...]
    ) -> tuple[torch.Tensor, ...]:
        """The unit's outputs at a forecast step (the basis forecast of every stream)."""
        return tuple(ladder.forecast(ctx.step, self.basis) for ladder in unit.ladders)

    def observe(self, ctx: ContextState, block_index: int, num_blocks: int, image_tokens: torch.Tensor) -> None:
        """See a block's image hidden states at a full step (token-level policies cluster them)."""
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
