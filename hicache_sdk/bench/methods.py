"""Method specifications for benchmarks: ``full`` or ``policy[+basis][:key=value,...]``."""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from ..accelerator import Accelerator, compose
from ..errors import InvalidParameterError, did_you_mean
from ..registry import get_registry

__all__ = [
    "BENCH_METHODS",
    "DEFAULT_METHODS",
    "DYNAMIC_METHODS",
    "FULL",
    "PAPER_SETTING",
    "MethodSpec",
    "parse_method",
    "parse_methods",
    "parse_params",
]

FULL = "full"
#: The comparison setting of the HiCache paper: N = 7, W = 3, m = 2, sigma = 0.5 (5.56x on 50 steps).
PAPER_SETTING: Mapping[str, Any] = {"interval": 7, "warmup": 3, "max_order": 2, "sigma": 0.5}
DEFAULT_METHODS: tuple[str, ...] = (
    FULL,
    "fora",
    "taylorseer",
    "taylorseer+hermite",
    "clusca",
    "clusca+hermite",
    "taylorseer+newton",
)
"""The rows on a step schedule: full compute and the paper's methods (with the exact ``newton`` basis)."""
DYNAMIC_METHODS: tuple[str, ...] = ("first_block", "easycache", "speca", "speca+hermite", "pab")
"""The rows that decide from what they observe, at their own thresholds (W and m from the shared setting)."""
BENCH_METHODS: tuple[str, ...] = DEFAULT_METHODS + DYNAMIC_METHODS
"""``hicache bench``'s rows, the same for every task so that the models can be read side by side."""


@attrs.frozen
class MethodSpec:
    """One row of a benchmark: a policy with a basis and its own parameters, or full compute."""

    label: str
    policy: str | None
    basis: str = "taylor"
    params: Mapping[str, Any] = attrs.field(factory=dict)

    @property
    def is_full(self) -> bool:
        return self.policy is None

    def accelerator(self, shared: Mapping[str, Any] = PAPER_SETTING) -> Accelerator | None:
        """The composed accelerator; ``shared`` settings apply where the policy or basis takes them."""
        if self.policy is None:
            return None
        registry = get_registry()
        policy_cls = registry.get("policy", self.policy).obj
        basis_cls = registry.get("basis", self.basis).obj
        accepted = {a.name for a in attrs.fields(policy_cls.Config)} | set(basis_cls.parameter_names())
        params = {k: v for k, v in shared.items() if k in accepted}
        params.update(self.params)
        return compose(self.policy, basis=self.basis, **params)


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_method(text: str) -> MethodSpec:
    """Parse ``full``, ``taylorseer``, ``clusca+hermite`` or ``taylorseer+hermite:sigma=0.3,interval=5``.

    Raises:
        UnknownPluginError: the policy or basis is not registered (with did-you-mean).
        InvalidParameterError: malformed text.
    """
    label = text.strip()
    if label == FULL:
        return MethodSpec(label=FULL, policy=None)
    head, _, tail = label.partition(":")
    policy, _, basis = head.partition("+")
    if not policy:
        raise InvalidParameterError(f"method {text!r}: expected 'full' or 'policy[+basis][:key=value,...]'")
    registry = get_registry()
    policies = registry.entries("policy")
    if policy not in policies:
        known = [FULL, *sorted(policies)]
        raise InvalidParameterError(
            f"unknown method {text!r}: expected 'full' or a registered policy ({', '.join(known)}) "
            f"optionally with +basis.{did_you_mean(policy, known)}"
        )
    basis = basis or "taylor"
    registry.get("basis", basis)
    return MethodSpec(label=label, policy=policy, basis=basis, params=parse_params(tail.split(",")))


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """``["sigma=0.3", "interval=5"]`` -> ``{"sigma": 0.3, "interval": 5}`` (values as Python literals)."""
    params: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in items)):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidParameterError(f"parameter {item!r} is not key=value")
        params[key.strip()] = _value(value.strip())
    return params


def parse_methods(texts: Sequence[str]) -> list[MethodSpec]:
    """Parse several specs; labels must be unique."""
    specs = [parse_method(t) for t in texts]
    labels = [s.label for s in specs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise InvalidParameterError(f"methods listed twice: {duplicates}")
    return specs
