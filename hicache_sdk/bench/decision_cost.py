"""What a dynamic policy's decisions cost, against a full step's wall time, on the embedded model.

Run ``python -m hicache_sdk.bench.decision_cost`` (``--help`` for options). For each policy, each
repeat times one uncached generation and one cached generation back to back (a pair shares the
machine's load). In the cached one the policy's decision points (``plan_step``, ``on_block``,
``decide``, ``verify``, ``end_step``) are timed: everything the probe and the decision add, host
synchronisations included (the probe blocks' units compute anyway: they are model work). The
figure is, per pair, the decision time per step over the uncached generation's time per step;
the median over pairs is printed with its spread.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import attrs
import torch

from ..accelerator import compose
from ..models import DigitsModel, load_digits_model, sample
from ..policy import Policy
from .methods import parse_method

__all__ = ["DECISION_POINTS", "DEFAULT_POLICIES", "DecisionCost", "decision_cost", "main"]

#: the policy methods timed as decision work
DECISION_POINTS = ("plan_step", "on_block", "decide", "verify", "end_step")
#: the dynamic built-ins with their defaults, and the frontier's cache-dit-like first_block setting
DEFAULT_POLICIES: tuple[str, ...] = (
    "first_block",
    "first_block:per_sample=True",
    "easycache",
    "speca",
    "pab",
)


@attrs.frozen
class DecisionCost:
    """Decision time per step against a full step, over interleaved repeats."""

    method: str
    steps: int
    decision_seconds: tuple[float, ...]  # per repeat, the whole generation's decision time
    full_seconds: tuple[float, ...]  # per repeat, the uncached generation's time
    forecast_steps: int

    @property
    def shares(self) -> tuple[float, ...]:
        """Per pair: decision time per step / uncached time per step."""
        return tuple(d / f for d, f in zip(self.decision_seconds, self.full_seconds, strict=True))

    @property
    def share(self) -> float:
        """The median of :attr:`shares`."""
        return statistics.median(self.shares)


@contextmanager
def _timed_decisions(policy: Policy) -> Iterator[list[float]]:
    """Time ``policy``'s decision points (instance attributes shadow the class's; removed after)."""
    spent = [0.0]
    originals = {name: getattr(policy, name) for name in DECISION_POINTS}

    def timer(method: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start

        return wrapper

    for name, method in originals.items():
        setattr(policy, name, timer(method))
    try:
        yield spent
    finally:
        for name in DECISION_POINTS:
            delattr(policy, name)


def decision_cost(
    model: DigitsModel,
    method: str,
    *,
    digits: Sequence[int],
    seeds: Sequence[int],
    steps: int = 50,
    repeats: int = 5,
) -> DecisionCost:
    """Measure ``method`` (``policy[+basis][:key=value,...]``) against uncached generations, interleaved."""
    spec = parse_method(method)
    assert spec.policy is not None
    accelerator = compose(spec.policy, basis=spec.basis, **spec.params)
    decisions, fulls = [], []
    forecast_steps = 0
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            sample(model, digits, seeds, steps=steps)
            fulls.append(time.perf_counter() - start)
            with accelerator.apply(model.transformer) as handle:
                with _timed_decisions(handle.runtime.policy) as spent:
                    sample(model, digits, seeds, steps=steps)
            decisions.append(spent[0])
            forecast_steps = handle.summary().forecast_steps
    return DecisionCost(method, steps, tuple(decisions), tuple(fulls), forecast_steps)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hicache_sdk.bench.decision_cost", description=__doc__)
    parser.add_argument("methods", nargs="*", default=list(DEFAULT_POLICIES), help="policy[+basis][:key=value,...]")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--samples", type=int, default=20, help="digits 0..9 cycled, seeds 0, 1, ...")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.steps < 1 or args.samples < 1 or args.threads < 1:
        parser.error("--repeats, --steps, --samples and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    digits = [i % 10 for i in range(args.samples)]
    seeds = [i // 10 for i in range(args.samples)]
    model = load_digits_model()
    print(f"decision cost per step / uncached step time, {args.samples} samples, {args.steps} steps, median of")
    print(f"{args.repeats} interleaved pairs [min, max]; torch {torch.__version__}, {args.threads} threads")
    for method in args.methods:
        cost = decision_cost(model, method, digits=digits, seeds=seeds, steps=args.steps, repeats=args.repeats)
        shares = cost.shares
        print(
            f"{method:40s} {cost.share:7.2%}  [{min(shares):.2%}, {max(shares):.2%}]  "
            f"({cost.forecast_steps} of {cost.steps} steps forecast)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
