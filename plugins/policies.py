"""Built-in policies: ``fora`` and ``taylorseer`` here; ``clusca``, ``first_block``, ``easycache``,
``speca`` and ``pab`` in modules of their own. All are registered by this module's hook."""

from __future__ import annotations

from collections.abc import Callable

import attrs

from hicache_sdk import hookimpl
from hicache_sdk.policy import IntervalPolicy, Policy, ScheduleConfig, interval_field, order_field, warmup_field

__all__ = ["Fora", "ForaConfig", "TaylorSeer", "TaylorSeerConfig"]


@attrs.frozen(kw_only=True)
class ForaConfig(ScheduleConfig):
    """FORA (arXiv 2407.01425): recompute every ``interval`` steps, reuse the last output between.

    The order is 0 whatever the basis: a forecast is the newest anchor itself. Defaults follow the
    FORA paper (N = 3, step 0 full).
    """

    interval: int = interval_field(3)
    warmup: int = warmup_field(1)


class Fora(IntervalPolicy):
    """FORA: plain reuse of each unit's newest computed output."""

    name = "fora"
    Config = ForaConfig


@attrs.frozen(kw_only=True)
class TaylorSeerConfig(ScheduleConfig):
    """TaylorSeer (arXiv 2503.06923) schedule and order; with ``basis="hermite"`` this is HiCache.

    Defaults are the reference code's FLUX settings: N = 6, W = 3, m = 1 (5.00x on 50 steps).
    The HiCache paper's setting is N = 7, W = 3, m = 2 with ``hermite(sigma=0.5)`` (5.56x).
    """

    max_order: int = order_field(1)


class TaylorSeer(IntervalPolicy):
    """TaylorSeer: forecast every unit from its finite-difference ladder with the chosen basis."""

    name = "taylorseer"
    Config = TaylorSeerConfig


@hookimpl
def hicache_register_policies(register: Callable[[type[Policy]], None]) -> None:
    from .clusca import ClusCa
    from .easycache import EasyCache
    from .first_block import FirstBlock
    from .pab import PyramidAttentionBroadcast
    from .speca import SpeCa

    for policy in (Fora, TaylorSeer, ClusCa, FirstBlock, EasyCache, SpeCa, PyramidAttentionBroadcast):
        register(policy)
