"""Every registered adapter passes the adapter contract on a tiny random-weight model of its family."""

from __future__ import annotations

import attrs
import pytest
from hicache_sdk.adapters.families import FAMILIES

from hicache_sdk import get_registry
from hicache_sdk.family import family_adapter
from hicache_sdk.granularity import GRANULARITIES
from hicache_sdk.testing import adapter_contract
from hicache_sdk.testing.families import FAMILY_CASES
from hicache_sdk.testing.model_case import ModelCase

#: The family the generic adapter is checked on: one no built-in adapter serves.
GENERIC_CASE = "cogview4"
ADAPTERS = sorted(get_registry().entries("adapter"))


def case_of(adapter: str) -> ModelCase:
    return FAMILY_CASES[GENERIC_CASE if adapter == "generic" else adapter]


def other_of(adapter: str) -> ModelCase | None:
    """A model of another family, which the adapter must refuse (``generic`` fits them all)."""
    if adapter == "generic":
        return None
    return FAMILY_CASES["wan" if adapter != "wan" else "flux"]


def test_every_built_in_adapter_has_a_family_case() -> None:
    assert set(ADAPTERS) - {"generic"} <= set(FAMILY_CASES)


@pytest.mark.parametrize(
    "rule", [r for r in dir(adapter_contract) if r.startswith("check_adapter_") and r != "check_adapter_contract"]
)
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_adapter_contract(adapter: str, rule: str) -> None:
    check = getattr(adapter_contract, rule)
    if rule == "check_adapter_selected":
        check(adapter, case_of(adapter), other_of(adapter))
    else:
        check(adapter, case_of(adapter))


def test_the_lighter_units_rule_names_a_granularity_declared_wrongly() -> None:
    """Declaring a granularity the model cannot serve breaks the rule (Z-Image returns a list, not one output);
    declaring fewer than the model could serve keeps it (the others are refused, as declared)."""
    zimage = next(f for f in FAMILIES if f.name == "zimage")
    overclaims = family_adapter(attrs.evolve(zimage, granularities=GRANULARITIES))
    with pytest.raises(AssertionError, match=r"lighter units: zimage declares units='output', which its model"):
        adapter_contract.check_adapter_lighter_units(overclaims, case_of("zimage"))
    qwen = next(f for f in FAMILIES if f.name == "qwenimage")
    adapter_contract.check_adapter_lighter_units(
        family_adapter(attrs.evolve(qwen, granularities=("modules",))), case_of("qwenimage")
    )
