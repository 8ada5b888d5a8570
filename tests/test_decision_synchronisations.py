"""Decisions read tensor values on the host at most once per decision point (one sync on a GPU).

No GPU here, so the rule is checked where it is decided: every way a tensor's value reaches the
host (``float()``, ``bool()``, ``int()``, ``.item()``, ``.tolist()``, ``.nonzero()``) is counted
while each decision point of each dynamic built-in runs, on the embedded trained model (random
weights barely move the signals, so the policies would hardly decide anything there).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import hicache_sdk as sdk
from hicache_sdk.models import load_digits_model, sample

HOST_READS = ("__float__", "__bool__", "__int__", "item", "tolist", "nonzero")
DECISION_POINTS = ("plan_step", "on_block", "decide", "verify", "end_step")
POLICIES = {
    "first_block": {"warmup": 2, "threshold": 0.3},
    "first_block-per-sample": {"warmup": 2, "threshold": 0.3, "per_sample": True},
    "easycache": {"warmup": 2, "threshold": 0.1},
    "speca": {"warmup": 2},
    "pab": {},
}


@contextlib.contextmanager
def counted_host_reads() -> Iterator[list[int]]:
    count = [0]
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(original: Any) -> Any:
        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            count[0] += 1
            return original(self, *args, **kwargs)

        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(original))
    try:
        yield count
    finally:
        for name in HOST_READS:
            delattr(torch.Tensor, name)


@pytest.mark.parametrize("case", sorted(POLICIES))
def test_each_decision_point_reads_the_host_at_most_once(case: str) -> None:
    policy_name = case.split("-")[0]
    accelerator = sdk.compose(policy_name, **POLICIES[case])
    model = load_digits_model()
    reads: dict[str, list[int]] = {name: [] for name in DECISION_POINTS}
    masks_read: list[int] = []
    with accelerator.apply(model.transformer) as handle:
        runtime = handle.runtime
        policy = runtime.policy
        for name in DECISION_POINTS:
            method = getattr(policy, name)

            def watched(*args: Any, _method: Any = method, _name: str = name, **kwargs: Any) -> Any:
                with counted_host_reads() as count:
                    result = _method(*args, **kwargs)
                reads[_name].append(count[0])
                return result

            setattr(policy, name, watched)
        rows_of = runtime._rows_of

        def watched_rows(*args: Any) -> Any:
            with counted_host_reads() as count:
                result = rows_of(*args)
            masks_read.append(count[0])
            return result

        runtime._rows_of = watched_rows  # type: ignore[method-assign]
        with torch.inference_mode():
            sample(model, [3, 7], [0, 0], steps=24)
    summary = handle.summary()
    assert summary.forecast_steps > 0, "the policy must decide something for the count to mean anything"
    for name, counts in reads.items():
        assert max(counts, default=0) <= 1, (name, counts)
    # a per-sample mask becomes a sub-batch with one read per step, whatever the number of units
    assert sum(masks_read) <= summary.steps
