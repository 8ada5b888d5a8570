"""This SDK's own overhead: an all-full run against no SDK, and where a forecast step's time goes.

Two measurements on the embedded model:

- :func:`all_full_overhead`: the same generation with nothing attached and with a policy at N = 1
  (every step full, so the output must be identical), timed in interleaved pairs; the median of the
  pairs' time ratios is everything the SDK adds (hook dispatch, step decisions, the adapter's block
  forwards).
- :func:`step_shares`: one instrumented generation in which the runtime's entry points are timed,
  excluding the model work they call (a unit's ``compute`` and token paths); per step kind, the SDK's
  share of the step's wall time, against the rest (the model's mandatory work: embeddings,
  modulation, norms, gates, output layer, plus hook dispatch).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import attrs
import torch

from ..accelerator import Accelerator
from ..models import DigitsModel
from ..policy import TokenPath
from ..runtime import Runtime
from .methods import PAPER_SETTING, parse_method
from .runner import timed

__all__ = ["FullRunOverhead", "SdkClock", "StepShare", "all_full_overhead", "step_shares"]

Generate = Callable[[DigitsModel], torch.Tensor]
#: the runtime's entry points, timed by :class:`SdkClock`
ENTRY_POINTS = ("begin_step", "end_step", "_serve", "_record", "block")


@attrs.frozen
class FullRunOverhead:
    """An all-full (N = 1) run against no SDK."""

    method: str
    none_seconds: tuple[float, ...]
    sdk_seconds: tuple[float, ...]
    identical: bool  # outputs equal to no SDK, bit for bit
    clocked_seconds: float  # time inside the runtime's entry points in one (instrumented) generation

    @property
    def pair_ratios(self) -> tuple[float, ...]:
        """``sdk / none`` per interleaved pair: the two runs of a pair share the machine's load."""
        return tuple(s / n for s, n in zip(self.sdk_seconds, self.none_seconds, strict=True))

    @property
    def overhead(self) -> float:
        """The median over the pairs of ``sdk / none``, minus 1."""
        return statistics.median(self.pair_ratios) - 1.0


@attrs.frozen
class StepShare:
    """Medians over the steps of one kind (``"full"`` or ``"forecast"``) of one instrumented generation."""

    kind: str
    steps: int
    step_seconds: float
    sdk_seconds: float
    parts: dict[str, float]  # median seconds per entry point

    @property
    def share(self) -> float:
        """SDK time as a share of the step's wall time."""
        return self.sdk_seconds / self.step_seconds if self.step_seconds else float("nan")


class SdkClock:
    """Times a runtime's entry points per step, less the model work they call.

    Wraps the entry points on the runtime *instance* (the class is untouched) and times each
    transformer call with forward hooks; :meth:`remove` restores both.
    """

    def __init__(self, runtime: Runtime, transformer: torch.nn.Module) -> None:
        self.runtime = runtime
        self.steps: list[dict[str, Any]] = []
        self._model_work = 0.0
        for name in ENTRY_POINTS:
            setattr(runtime, name, self._timed(name, getattr(runtime, name)))
        self._handles = [
            transformer.register_forward_pre_hook(self._start),
            transformer.register_forward_hook(self._stop),
        ]

    def _start(self, *args: Any) -> None:
        self.steps.append({"start": time.perf_counter(), "kind": "outside", "parts": dict.fromkeys(ENTRY_POINTS, 0.0)})

    def _stop(self, *args: Any) -> None:
        self.steps[-1]["seconds"] = time.perf_counter() - self.steps[-1]["start"]

    def _paths(self, paths: Sequence[TokenPath]) -> tuple[TokenPath, ...]:
        def clocked(path: TokenPath) -> TokenPath:
            def compute(index: torch.Tensor) -> torch.Tensor:
                start = time.perf_counter()
                try:
                    return path.compute(index)
                finally:
                    self._model_work += time.perf_counter() - start

            return attrs.evolve(path, compute=compute)

        return tuple(clocked(p) for p in paths)

    def _timed(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if name == "_serve":  # (key, compute, streams, token_paths): token paths are model work
                args = (*args[:3], self._paths(args[3]))
            work, self._model_work = self._model_work, 0.0
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start - self._model_work
                self._model_work = work
                if self.steps:
                    self.steps[-1]["parts"][name] += spent
                if name == "begin_step" and self.runtime.current is not None and self.steps:
                    self.steps[-1]["kind"] = "full" if self.runtime.current.full else "forecast"

        return wrapper

    def shares(self) -> list[StepShare]:
        """Per step kind, medians of the step time, SDK time and each entry point's time."""
        result = []
        for kind in ("full", "forecast"):
            steps = [s for s in self.steps if s["kind"] == kind and "seconds" in s]
            if not steps:
                continue
            parts = {n: statistics.median(s["parts"][n] for s in steps) for n in ENTRY_POINTS}
            result.append(
                StepShare(
                    kind=kind,
                    steps=len(steps),
                    step_seconds=statistics.median(s["seconds"] for s in steps),
                    sdk_seconds=statistics.median(sum(s["parts"].values()) for s in steps),
                    parts=parts,
                )
            )
        return result

    def total(self) -> float:
        """Seconds inside the entry points over every step seen."""
        return sum(sum(s["parts"].values()) for s in self.steps)

    def remove(self) -> None:
        for name in ENTRY_POINTS:
            vars(self.runtime).pop(name, None)
        for handle in self._handles:
            handle.remove()


@contextmanager
def clocked(accelerator: Accelerator, model: DigitsModel) -> Iterator[SdkClock]:
    """``accelerator`` applied to ``model`` with an :class:`SdkClock` on its runtime."""
    with accelerator.apply(model.transformer) as handle:
        clock = SdkClock(handle.runtime, model.transformer)
        try:
            yield clock
        finally:
            clock.remove()


def _accelerator(method: str) -> Accelerator:
    accelerator = parse_method(method).accelerator(PAPER_SETTING)
    assert accelerator is not None, method
    return accelerator


def all_full_overhead(
    model: DigitsModel,
    generate: Generate,
    *,
    method: str = "taylorseer:interval=1",
    repeats: int = 5,
    device: str = "cpu",
) -> FullRunOverhead:
    """``method`` (which must compute every step) against no SDK, in ``repeats`` interleaved pairs."""
    accelerator = _accelerator(method)
    generate(model)  # warm-up
    with accelerator.apply(model.transformer):
        generate(model)
    none_times, sdk_times = [], []
    identical = True
    for repeat in range(repeats):
        order = ("none", "sdk") if repeat % 2 == 0 else ("sdk", "none")
        for which in order:
            if which == "none":
                reference, seconds = timed(lambda: generate(model), device)
                none_times.append(seconds)
            else:
                with accelerator.apply(model.transformer):
                    out, seconds = timed(lambda: generate(model), device)
                sdk_times.append(seconds)
                sdk_out = out
        identical &= torch.equal(reference, sdk_out)
    with clocked(accelerator, model) as clock:
        generate(model)
    return FullRunOverhead(
        method=accelerator.tag,
        none_seconds=tuple(none_times),
        sdk_seconds=tuple(sdk_times),
        identical=identical,
        clocked_seconds=clock.total(),
    )


def step_shares(model: DigitsModel, generate: Generate, method: str) -> tuple[str, list[StepShare]]:
    """The accelerator's tag and its per-step-kind time shares over one instrumented generation."""
    accelerator = _accelerator(method)
    with accelerator.apply(model.transformer):
        generate(model)  # warm-up, and this SDK's FLOP table
    with clocked(accelerator, model) as clock:
        generate(model)
    return accelerator.tag, clock.shares()
