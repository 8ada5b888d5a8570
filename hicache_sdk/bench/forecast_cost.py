"""Micro-benchmark: the cost of one forecast relative to one plain copy of the feature.

A forecast is ``sum_i w_i D^i`` over the unit's ladder (:meth:`DifferenceLadder.forecast`): one
copy of ``D^0`` into the output (converted to float32) and one multiply-add per further order. For
order 2 that is ~8 passes over a feature-sized tensor against 2 for a copy (one read, one write),
so expect a ratio near 4 in float32 when memory bound; bfloat16 storage reads half the bytes
of each ``D^i``. The basis only changes three host-side floats. Ladders held in fp8 (per-row or
per-tensor scales) or mixed (``bf16+fp8``) decode each order into float32 scratch, chunk by chunk
on CPU (:func:`~hicache_sdk.storage.weighted_decode`): their cost is compared with the same copy.

Run ``python -m hicache_sdk.bench.forecast_cost [--device cuda] [--repeats 21]``. Every repeat
times each variant once, in a rotating order (interleaved); the table shows medians and the ratio
of each median to the median of ``clone``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from ..basis import Basis
from ..compact_ladder import make_ladder
from ..ladder import DifferenceLadder
from ..plugins.bases import HermiteBasis, TaylorBasis
from ..storage import LadderStorage, parse_ladder_format

#: Storage of the ladders compared (``None``: the features' float32).
STORAGES: tuple[str | None, ...] = (None, "bf16", "bf16+fp8", "fp8", "fp8:tensor")

__all__ = ["main", "measure"]


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def run(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return run


def _ladder(features: Sequence[torch.Tensor], order: int, storage: str | None) -> DifferenceLadder:
    ladder = make_ladder(order, None if storage is None else LadderStorage(parse_ladder_format(storage)))
    for step, feature in enumerate(features):
        ladder.update(feature, step)
    assert ladder.order == order
    return ladder


def _forecaster(ladder: DifferenceLadder, step: int, basis: Basis) -> Callable[[], object]:
    return lambda: ladder.forecast(step, basis)


def measure(
    shape: Sequence[int] = (4096, 3072),
    order: int = 2,
    repeats: int = 15,
    device: str = "cpu",
    bases: Sequence[Basis] = (TaylorBasis(), HermiteBasis(sigma=0.5)),
) -> list[tuple[str, float, float]]:
    """``(variant, median seconds, median / median of clone)`` for ``clone`` and every basis x storage."""
    dev = torch.device(device)
    generator = torch.Generator(device=dev).manual_seed(0)
    features = [torch.randn(tuple(shape), generator=generator, device=dev) for _ in range(order + 1)]
    ladders = {storage or "fp32": _ladder(features, order, storage) for storage in STORAGES}
    source = features[-1]
    step = order + 2  # offset 2 from the newest anchor
    variants: dict[str, Callable[[], object]] = {"clone fp32": source.clone}
    for storage, ladder in ladders.items():
        for basis in bases:
            variants[f"{basis.name} order {order}, {storage} storage"] = _forecaster(ladder, step, basis)
    timer = _timer(dev)
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for name in names:  # warm-up: allocator, kernels, first-touch of pages
            timer(variants[name])
        for r in range(repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                times[name].append(timer(variants[name]))
    base = statistics.median(times["clone fp32"])
    return [(name, statistics.median(times[name]), statistics.median(times[name]) / base) for name in names]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096, help="tokens (default: FLUX at 1024^2)")
    parser.add_argument("--cols", type=int, default=3072, help="channels (default: FLUX's hidden size)")
    parser.add_argument("--order", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    rows = measure((args.rows, args.cols), args.order, args.repeats, args.device)
    threads = f", {torch.get_num_threads()} threads" if args.device == "cpu" else ""
    print(
        f"forecast cost: ladder of {args.order + 1} x ({args.rows}, {args.cols}) float32 features, "
        f"device {args.device}{threads}, torch {torch.__version__}, median of {args.repeats} interleaved repeats"
    )
    width = max(len(name) for name, _, _ in rows)
    print(f"{'variant':<{width}}  {'median ms':>9}  {'x clone':>7}")
    for name, seconds, ratio in rows:
        print(f"{name:<{width}}  {seconds * 1e3:>9.2f}  {ratio:>7.2f}")


if __name__ == "__main__":
    main()
