"""The decision-cost benchmark runs and reports what it timed (its figures are for the docs, not asserted)."""

from __future__ import annotations

import pytest

from hicache_sdk.accelerator import handle_of
from hicache_sdk.bench.decision_cost import decision_cost, main
from hicache_sdk.models import load_digits_model


def test_decision_cost_times_the_decisions_of_a_policy_that_acts() -> None:
    model = load_digits_model()
    cost = decision_cost(model, "first_block:warmup=1,threshold=0.5", digits=[3], seeds=[0], steps=18, repeats=2)
    assert len(cost.shares) == 2 and all(0 < s < 1 for s in cost.shares)
    assert cost.forecast_steps > 0  # the decisions were really taken
    assert handle_of(model.transformer) is None  # nothing left attached


def test_decision_cost_script_checks_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--repeats", "0"])
    assert exit_info.value.code == 2
    assert "--repeats" in capsys.readouterr().err
