"""Context-parallel generation on several processes: what the SDK adds in communication, and the agreement.

Run ``python -m hicache_sdk.bench.parallel`` (``--nproc 2`` processes; gloo on CPU, NCCL on GPUs; it
is also the launcher: it spawns the processes itself). Each process enables diffusers' Ulysses
context parallelism on the embedded digits model (:func:`~hicache_sdk.distributed.enable_context_parallel`,
with its CPU shim) and runs every policy of :data:`POLICIES` on the same samples. Per policy it
prints, per step and per process, the all-reduces the SDK made, their bytes and their wall time,
and that time's share of the step; the peak cache bytes of each process; whether every process
took the same decisions at every step; and the largest difference from a one-process run of the
same policy. diffusers' own all-to-alls are not counted: they are the parallelism's, with or
without a cache.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..distributed import free_port
from ..models import load_digits_model, sample
from .methods import PAPER_SETTING, parse_method

__all__ = ["POLICIES", "main", "measure"]

#: The methods measured (``policy[+basis][:key=value,...]``, with the paper setting where it applies).
POLICIES: tuple[str, ...] = (
    "fora",
    "taylorseer",
    "taylorseer+hermite",
    "clusca",
    "first_block",
    "easycache",
    "speca",
    "pab",
)


def _accelerator(method: str) -> Any:
    acc = parse_method(method).accelerator(PAPER_SETTING)
    assert acc is not None
    return acc


def _generate(method: str | None, digits: list[int], seeds: list[int], steps: int, device: str) -> dict[str, Any]:
    model = _MODEL["digits"]
    if method is None:
        start = time.perf_counter()
        out = sample(model, digits, seeds, steps=steps, device=device)
        return {"output": out.cpu(), "seconds": time.perf_counter() - start}
    decisions: list[tuple[str, int, str, str]] = []
    with _accelerator(method).apply(model.transformer) as handle:
        reduce = handle.runtime.reduce
        handle.add_observer(lambda c, s, k, how, o: decisions.append((c, s, k, how)))
        start = time.perf_counter()
        out = sample(model, digits, seeds, steps=steps, device=device)
        seconds = time.perf_counter() - start
        summary = handle.summary()
    return {
        "output": out.cpu(),
        "seconds": seconds,
        "decisions": decisions,
        "reductions": getattr(reduce, "calls", 0),
        "reduced_bytes": getattr(reduce, "bytes", 0),
        "reduce_seconds": getattr(reduce, "seconds", 0.0),
        "peak_cache_bytes": summary.peak_cache_bytes,
    }


_MODEL: dict[str, Any] = {}


def _rank(rank: int, nproc: int, port: int, args: argparse.Namespace, out: str) -> None:
    from ..distributed import enable_context_parallel

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    backend = "nccl" if args.device == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, rank=rank, world_size=nproc)
    device = f"cuda:{rank}" if args.device == "cuda" else "cpu"
    if args.device == "cuda":
        torch.cuda.set_device(rank)
    torch.set_num_threads(max(1, args.threads))
    try:
        _MODEL["digits"] = load_digits_model(device=device)
        enable_context_parallel(_MODEL["digits"].transformer, ulysses_degree=nproc)
        digits, seeds = list(range(args.samples)), [0] * args.samples
        results = {}
        for method in args.methods:
            runs = [_generate(method, digits, seeds, args.steps, device) for _ in range(args.repeats)]
            results[method] = {**runs[-1], "seconds": [r["seconds"] for r in runs]}
        gathered: list[Any] = [None] * nproc
        torch.distributed.all_gather_object(gathered, results)
        if rank == 0:
            torch.save(gathered, out)
    finally:
        torch.distributed.destroy_process_group()


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the processes, then the one-process references; one row per method."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "ranks.pt")
        mp.spawn(_rank, args=(args.nproc, free_port(), args, out), nprocs=args.nproc)
        ranks = torch.load(out, weights_only=False)
    _MODEL["digits"] = load_digits_model()
    digits, seeds = list(range(args.samples)), [0] * args.samples
    rows = []
    for method in args.methods:
        alone = _generate(method, digits, seeds, args.steps, "cpu")
        per_rank = [r[method] for r in ranks]
        first = per_rank[0]
        step_seconds = statistics.median(first["seconds"]) / args.steps
        rows.append(
            {
                "method": method,
                "same_decisions": all(r["decisions"] == first["decisions"] for r in per_rank),
                "decisions_as_one_process": [d[1:] for d in first["decisions"]] == [d[1:] for d in alone["decisions"]],
                "reductions_per_step": [r["reductions"] / args.steps for r in per_rank],
                "bytes_per_step": [r["reduced_bytes"] / args.steps for r in per_rank],
                "reduce_ms_per_step": [1e3 * r["reduce_seconds"] / args.steps for r in per_rank],
                "share": max(r["reduce_seconds"] for r in per_rank) / args.steps / step_seconds,
                "step_ms": 1e3 * step_seconds,
                "peak_cache_mib": [r["peak_cache_bytes"] / 2**20 for r in per_rank],
                "one_process_cache_mib": alone.get("peak_cache_bytes", 0) / 2**20,
                "max_diff": float((first["output"] - alone["output"]).abs().max()),
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Launch the processes and print the table as Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nproc", type=int, default=2, help="processes, one shard of the tokens each (default 2)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--samples", type=int, default=4, help="digits 0..samples-1 (CFG doubles the batch)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--methods", nargs="+", default=list(POLICIES))
    args = parser.parse_args(argv)
    for method in args.methods:
        _accelerator(method)  # a bad method fails here, before any process starts
    rows = measure(args)
    print(
        f"Context parallelism (Ulysses) over {args.nproc} processes ({args.device}, "
        f"{'nccl' if args.device == 'cuda' else 'gloo'}), embedded digits model, {args.steps} steps, "
        f"{args.samples} samples (batch {2 * args.samples}), median of {args.repeats} repeats, "
        f"torch {torch.__version__}"
    )
    print()
    print(
        "| method | same decisions on every rank | as one process | all-reduces / step | bytes / step "
        "| all-reduce ms / step | share of step | step ms | peak cache MiB per rank (one process) | max abs diff |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        ranks = ", ".join(f"{v:.2f}" for v in r["peak_cache_mib"])
        print(
            f"| {r['method']} | {'yes' if r['same_decisions'] else 'NO'} | "
            f"{'yes' if r['decisions_as_one_process'] else 'no'} | {max(r['reductions_per_step']):.2f} | "
            f"{max(r['bytes_per_step']):.1f} | {max(r['reduce_ms_per_step']):.3f} | {r['share']:.2%} | "
            f"{r['step_ms']:.1f} | {ranks} ({r['one_process_cache_mib']:.2f}) | {r['max_diff']:.2e} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
