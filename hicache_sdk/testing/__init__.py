"""Contract tests for plugin authors: the checks hicache-sdk runs on every registered basis and policy.

Policies: :func:`check_policy_contract` (or the :class:`PolicyContract` pytest mixin) runs a policy,
by registered name or class, on tiny random-weight Flux models and checks every rule: it caches, it
is exact in its no-cache setting, its summary and FLOPs agree with torch's FlopCounterMode,
``remove()`` restores the model, CFG contexts are isolated, runs are deterministic, batches work,
non-finite forecasts fall back, and bad configs are refused. Each rule is also a ``check_*``
function. Bases, below.

Adapters: :func:`check_adapter_contract` (or the :class:`AdapterContract` mixin) runs an adapter
on a :class:`ModelCase`, a tiny random-weight model of its family with the arguments of one
denoising step (:data:`FAMILY_CASES` has one per built-in family), and checks that it is chosen
for its model and refuses others, is exact at interval 1 in float32 and bfloat16, really skips
the modules of forecast units, counts its FLOPs right, is removed cleanly, keeps CFG contexts
apart and splits batches correctly (see :mod:`hicache_sdk.testing.adapter_contract`).

Run them on your own basis as a plain function, with or without pytest::

    from hicache_sdk.testing import check_basis_contract

    check_basis_contract(MyBasis(alpha=0.3))  # raises AssertionError naming the broken rule

or mix :class:`BasisContract` into a pytest test class and provide a ``basis`` fixture::

    import pytest
    from hicache_sdk.testing import BasisContract

    class TestMyBasis(BasisContract):
        @pytest.fixture
        def basis(self):
            return MyBasis(alpha=0.3)

The deterministic checks need only torch. The property-based check
(:func:`check_basis_properties`, part of :func:`check_basis_contract` unless
``properties=False``) uses `hypothesis <https://hypothesis.readthedocs.io>`_, which is imported
lazily, only when that check runs: it is a dependency of the ``test`` extra
(``pip install "hicache-sdk[test]"``), not of the package.
"""

from __future__ import annotations

from .adapter_contract import (
    AdapterContract,
    AdapterLike,
    check_adapter_batches,
    check_adapter_contexts_isolated,
    check_adapter_contract,
    check_adapter_exact_at_interval_one,
    check_adapter_flops,
    check_adapter_lighter_units,
    check_adapter_remove_restores,
    check_adapter_selected,
    check_adapter_skips_forecast_modules,
)
from .basis_contract import (
    BasisContract,
    check_basis_contract,
    check_basis_identity,
    check_basis_properties,
    check_finite_forecasts,
    check_forecast_layout,
    check_invalid_arguments_rejected,
    check_linear_in_ladder,
    check_reset_equals_fresh,
    check_weights,
)
from .families import FAMILY_CASES
from .model_case import ModelCase, cast_floating, main_output
from .policy_contract import (
    DEFAULT_STEPS,
    PolicyContract,
    PolicyLike,
    caching_params,
    check_bad_config_refused,
    check_batches,
    check_caches,
    check_contexts_isolated,
    check_deterministic,
    check_exact_without_caching,
    check_non_finite_fallback,
    check_policy_contract,
    check_remove_restores,
    check_summary_and_flops,
    no_cache_params,
)

__all__ = [
    "DEFAULT_STEPS",
    "FAMILY_CASES",
    "AdapterContract",
    "AdapterLike",
    "BasisContract",
    "ModelCase",
    "PolicyContract",
    "PolicyLike",
    "caching_params",
    "cast_floating",
    "check_adapter_batches",
    "check_adapter_contexts_isolated",
    "check_adapter_contract",
    "check_adapter_exact_at_interval_one",
    "check_adapter_flops",
    "check_adapter_lighter_units",
    "check_adapter_remove_restores",
    "check_adapter_selected",
    "check_adapter_skips_forecast_modules",
    "check_bad_config_refused",
    "check_basis_contract",
    "check_basis_identity",
    "check_basis_properties",
    "check_batches",
    "check_caches",
    "check_contexts_isolated",
    "check_deterministic",
    "check_exact_without_caching",
    "check_finite_forecasts",
    "check_forecast_layout",
    "check_invalid_arguments_rejected",
    "check_linear_in_ladder",
    "check_non_finite_fallback",
    "check_policy_contract",
    "check_remove_restores",
    "check_reset_equals_fresh",
    "check_summary_and_flops",
    "check_weights",
    "main_output",
    "no_cache_params",
]
