"""This SDK under ``torch.compile``: how often the transformer compiles, and how fast it runs.

Two phases, each with a fresh dynamo cache: the bare model, then the model with an accelerator
attached; in each, the transformer is called eagerly and through ``torch.compile(transformer)``
in interleaved repeats. A counting backend records every graph compiled. The runtime keeps its
per-step decisions out of the graphs, so the graphs compiled during the first generation (one per
piece between graph breaks, per block, plus a resume variant for forecast steps) are all there is:
later generations compile nothing.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import attrs
import torch

from ..accelerator import Accelerator
from ..models import DigitsModel
from .methods import PAPER_SETTING, parse_method
from .runner import timed

__all__ = ["CompileCounter", "CompilePhase", "measure_compile"]

Generate = Callable[[DigitsModel], torch.Tensor]


class CompileCounter:
    """A ``torch.compile`` backend that counts the graphs it compiles and hands them to ``backend``."""

    def __init__(self, backend: str = "inductor") -> None:
        self.backend = backend
        self.graphs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.graphs += 1
        return torch._dynamo.lookup_backend(self.backend)(graph, example_inputs)


@attrs.frozen
class CompilePhase:
    """Eager against compiled for one configuration (no cache, or one accelerator)."""

    method: str
    compiles_first: int  # graphs compiled during the first compiled generation
    compiles_later: int  # graphs compiled in all later generations (0: no recompilation)
    graph_breaks: int
    eager_seconds: tuple[float, ...]
    compiled_seconds: tuple[float, ...]
    max_abs_diff: float  # compiled against eager outputs

    @property
    def speedup(self) -> float:
        """Median eager time over median compiled time."""
        return statistics.median(self.eager_seconds) / statistics.median(self.compiled_seconds)


def _phase(
    model: DigitsModel, generate: Generate, accelerator: Accelerator | None, backend: str, repeats: int, device: str
) -> CompilePhase:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = CompileCounter(backend)
    original = model.transformer
    handle = accelerator.apply(original) if accelerator is not None else None
    try:
        generate(model)  # eager warm-up, and this SDK's FLOP table (never counted inside a graph)
        reference = generate(model)
        optimized = torch.compile(original, backend=counter)

        def compiled() -> torch.Tensor:
            model.transformer = optimized
            try:
                return generate(model)
            finally:
                model.transformer = original

        compiled()
        first = counter.graphs
        eager_times, compiled_times, diff = [], [], 0.0
        for repeat in range(repeats):
            for variant in ("eager", "compiled") if repeat % 2 == 0 else ("compiled", "eager"):
                if variant == "eager":
                    eager_times.append(timed(lambda: generate(model), device)[1])
                else:
                    out, seconds = timed(compiled, device)
                    compiled_times.append(seconds)
                    diff = max(diff, float((out - reference).abs().max()))
        breaks = int(sum(torch._dynamo.utils.counters["graph_break"].values()))
        return CompilePhase(
            method=handle.runtime.policy.tag if handle is not None else "no cache",
            compiles_first=first,
            compiles_later=counter.graphs - first,
            graph_breaks=breaks,
            eager_seconds=tuple(eager_times),
            compiled_seconds=tuple(compiled_times),
            max_abs_diff=diff,
        )
    finally:
        if handle is not None:
            handle.remove()
        torch._dynamo.reset()


def measure_compile(
    model: DigitsModel,
    generate: Generate,
    *,
    method: str = "taylorseer:interval=7",
    backend: str = "inductor",
    repeats: int = 3,
    device: str = "cpu",
) -> tuple[CompilePhase, CompilePhase]:
    """Eager against ``torch.compile(transformer)``, without cache and with ``method`` (a fresh compile each)."""
    accelerator = parse_method(method).accelerator(PAPER_SETTING)
    assert accelerator is not None, method
    return (
        _phase(model, generate, None, backend, repeats, device),
        _phase(model, generate, accelerator, backend, repeats, device),
    )
