"""The policy contract kit: every built-in policy passes it, and it catches broken policies by rule."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import pytest
import torch
from hicache_sdk.plugins.policies import TaylorSeer, TaylorSeerConfig

import hicache_sdk as sdk
from hicache_sdk.adapter import Adapter
from hicache_sdk.decision import BlockView
from hicache_sdk.policy import TokenPath
from hicache_sdk.registry import DISTRIBUTION
from hicache_sdk.state import ContextState, UnitState
from hicache_sdk.testing import (
    PolicyContract,
    caching_params,
    check_bad_config_refused,
    check_batches,
    check_caches,
    check_contexts_isolated,
    check_deterministic,
    check_exact_without_caching,
    check_policy_contract,
    check_remove_restores,
    check_summary_and_flops,
    no_cache_params,
)

torch.set_num_threads(1)  # tiny models: one thread is much faster than several fighting over the cores

Outputs = tuple[torch.Tensor, ...]


def _builtin_cases() -> list[Any]:
    """Every built-in policy, plus one case with its off-by-default switches (e.g. ``per_sample``) on."""
    cases = []
    for reg in sdk.list_plugins():
        if reg.kind != "policy" or reg.distribution.split()[0] != DISTRIBUTION:
            continue
        cases.append(pytest.param(reg.name, {}, id=reg.name))
        switches = {a.alias: True for a in attrs.fields(reg.obj.Config) if a.default is False}
        if switches:
            cases.append(pytest.param(reg.name, switches, id=f"{reg.name}-{'-'.join(switches)}"))
    return sorted(cases, key=lambda p: p.id)


BUILTIN_CASES = _builtin_cases()


def test_every_builtin_policy_is_covered() -> None:
    names = {p.values[0] for p in BUILTIN_CASES}
    assert {"fora", "taylorseer", "clusca"} <= names
    assert names <= set(sdk.list_policies())


@pytest.mark.parametrize(("policy", "params"), BUILTIN_CASES)
def test_builtin_policy_satisfies_the_contract(policy: str, params: dict[str, Any]) -> None:
    check_policy_contract(policy, params=params)


def test_settings_are_derived_from_config_field_names() -> None:
    assert caching_params("taylorseer") == {"warmup": 1, "interval": 2}
    assert no_cache_params("taylorseer") == [{"warmup": 6}, {"interval": 1}]
    assert no_cache_params("fora", steps=5) == [{"warmup": 5}, {"interval": 1}]
    seer = caching_params(TaylorSeer)  # a class works as well as its registered name
    assert seer == caching_params("taylorseer")


# -- a well-behaved policy that is not registered, through the pytest mixin ------------------------
class Reuse(TaylorSeer):
    """TaylorSeer at order 0, unregistered: the kit composes it directly."""

    name = "contract_reuse"


class TestUnregisteredPolicy(PolicyContract):
    contract_params: ClassVar[dict[str, Any]] = {"max_order": 0}
    contract_steps = 6

    @pytest.fixture
    def policy(self) -> type[Reuse]:
        return Reuse


# -- broken policies: the kit names the rule they break -------------------------------------------
class Forgetful(TaylorSeer):
    """Never records an anchor, so it never forecasts."""

    name = "contract_forgetful"

    def on_computed(self, ctx: ContextState, unit: UnitState, outputs: Outputs, rows: Any = None) -> None:
        return None


class InPlaceEditor(TaylorSeer):
    """Scales the computed outputs it records, in place: the model's outputs change even when nothing is cached."""

    name = "contract_in_place"

    def on_computed(self, ctx: ContextState, unit: UnitState, outputs: Outputs, rows: Any = None) -> None:
        for value in outputs:
            value.mul_(1.001)
        super().on_computed(ctx, unit, outputs, rows)


class FlopLiar(TaylorSeer):
    """Does matrix work in on_block without declaring block_work_flops: the summary overstates the savings."""

    name = "contract_flop_liar"

    def on_block(self, ctx: ContextState, view: BlockView) -> None:
        torch.bmm(view.tokens_out, view.tokens_out.transpose(1, 2))


class HookLeaver(TaylorSeer):
    """Registers a torch forward hook on the model that remove() cannot know about."""

    name = "contract_hook_leaver"

    def check_adapter(self, adapter: Adapter) -> None:
        adapter.model.register_forward_hook(lambda *args: None)


class SharedReuse(TaylorSeer):
    """Reuses each unit's newest output kept on the policy itself, whatever the context."""

    name = "contract_shared"

    def __init__(self, config: Any, basis: Any) -> None:
        super().__init__(config, basis)
        self.newest: dict[str, Outputs] = {}

    def on_computed(self, ctx: ContextState, unit: UnitState, outputs: Outputs, rows: Any = None) -> None:
        super().on_computed(ctx, unit, outputs, rows)
        self.newest[unit.key] = tuple(o.clone() for o in outputs)

    def forecast(self, ctx: ContextState, unit: UnitState, token_paths: tuple[TokenPath, ...]) -> Outputs:
        return self.newest[unit.key]


class Unseeded(TaylorSeer):
    """Adds noise from torch's global generator to its forecasts."""

    name = "contract_unseeded"

    def forecast(self, ctx: ContextState, unit: UnitState, token_paths: tuple[TokenPath, ...]) -> Outputs:
        return tuple(o + 1e-3 * torch.randn_like(o) for o in super().forecast(ctx, unit, token_paths))


class SampleMixer(TaylorSeer):
    """Serves each sample the forecast of the next one."""

    name = "contract_mixer"

    def forecast(self, ctx: ContextState, unit: UnitState, token_paths: tuple[TokenPath, ...]) -> Outputs:
        return tuple(o.roll(1, 0) for o in super().forecast(ctx, unit, token_paths))


@attrs.frozen(kw_only=True)
class LooseConfig(TaylorSeerConfig):
    jitter: float = 0.0  # no validator


class Loose(TaylorSeer):
    """A config field that accepts anything."""

    name = "contract_loose"
    Config = LooseConfig


@pytest.mark.parametrize(
    ("policy", "check", "rule"),
    [
        (Forgetful, check_caches, "caches"),
        (InPlaceEditor, check_exact_without_caching, "exact without caching"),
        (FlopLiar, check_summary_and_flops, "summary and FLOPs"),
        (HookLeaver, check_remove_restores, "remove\\(\\) restores"),
        (SharedReuse, check_contexts_isolated, "contexts isolated"),
        (Unseeded, check_deterministic, "deterministic"),
        (SampleMixer, check_batches, "batch > 1"),
    ],
    ids=lambda value: getattr(value, "__name__", None),
)
def test_a_broken_policy_fails_the_rule_it_breaks(policy: type, check: Any, rule: str) -> None:
    with pytest.raises(AssertionError, match=f"^{rule}: policy {policy.__qualname__}"):
        check(policy, steps=6)


def test_an_unvalidated_config_field_is_caught() -> None:
    with pytest.raises(AssertionError, match=r"^bad config refused: .*LooseConfig\(jitter='0.5'\) was accepted"):
        check_bad_config_refused(Loose)


def test_the_whole_contract_stops_at_the_first_broken_rule() -> None:
    with pytest.raises(AssertionError, match=r"^contexts isolated: .*state leaks between contexts"):
        check_policy_contract(SharedReuse, steps=6)


def test_settings_that_never_cache_are_reported() -> None:
    with pytest.raises(AssertionError, match=r"^caches: policy 'first_block'.*pass params="):
        check_caches("first_block", params={"threshold": 1e-9})
