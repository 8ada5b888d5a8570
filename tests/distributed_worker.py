"""Two gloo processes on CPU running one generation under diffusers' context parallelism (Ulysses).

Run as ``python distributed_worker.py SCENARIO OUT_FILE [PORT]``: it spawns two ranks, each attaches
the SDK to a context-parallel model and runs a bare denoising loop; rank 0 saves, with
``torch.save``, the outputs and the per-step decisions of both ranks. The test that calls it
compares them with a one-process run and applies a timeout, so that a hang fails fast.

CPU: diffusers' ``enable_parallelism`` divides by the accelerator count; the SDK's
:func:`hicache_sdk.distributed.enable_context_parallel` is the documented shim that runs it on CPU.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

#: scenario name -> (model, steps, compose arguments per run); each run is one generation
SCENARIOS: dict[str, dict[str, Any]] = {}


def cpu_context_parallel(model: torch.nn.Module, world: int) -> None:
    """Ulysses over ``world`` processes (on CPU through the SDK's documented shim)."""
    from hicache_sdk.distributed import enable_context_parallel

    enable_context_parallel(model, ulysses_degree=world)


def build(name: str) -> tuple[torch.nn.Module, dict[str, Any], float]:
    """The model, the loop's inputs and its timestep scale."""
    from helpers import flux_inputs, tiny_flux, tiny_wan, wan_inputs

    if name == "flux":
        return tiny_flux(), flux_inputs(batch=1, side=8, text=6), 1.0
    if name == "wan":
        return tiny_wan(), wan_inputs(batch=1), 1000.0
    raise ValueError(name)


def _recorder(decisions: list[tuple[str, int, str, str]]) -> Any:
    return lambda context, step, key, how, outputs: decisions.append((context, step, key, how))


def _recording(reduce: Any, local: list[torch.Tensor]) -> Any:
    """``reduce``, keeping each local statistic before the reduction."""

    def recorded(statistic: torch.Tensor) -> torch.Tensor:
        local.append(statistic.detach().clone())
        return reduce(statistic)

    return recorded


def run(model_name: str, runs: list[dict[str, Any]], steps: int) -> list[dict[str, Any]]:
    """Each run: compose, attach, loop; the outputs, decisions and summary figures."""
    from helpers import run_loop

    import hicache_sdk as sdk

    if model_name == "digits":  # the embedded trained model, through its own sampler (CFG in one batch)
        from hicache_sdk.models import load_digits_model, sample

        digits = load_digits_model()
        model: torch.nn.Module = digits.transformer

        def loop() -> torch.Tensor:
            return sample(digits, [3, 8], [0, 1], steps=steps)

    else:
        model, inputs, scale = build(model_name)

        def loop() -> torch.Tensor:
            return run_loop(model, inputs, steps=steps, scale=scale)

    if dist.is_initialized():
        cpu_context_parallel(model, dist.get_world_size())
    results = []
    for params in runs:
        params = dict(params)
        policy = params.pop("policy")
        decisions: list[tuple[str, int, str, str]] = []
        local: list[torch.Tensor] = []  # the statistics each process reduced, before the reduction
        with sdk.compose(policy, **params).apply(model) as handle:
            handle.add_observer(_recorder(decisions))
            handle.runtime.reduce = _recording(handle.runtime.reduce, local)
            out = loop()
            summary = handle.summary()
        results.append(
            {
                "output": out,
                "decisions": decisions,
                "reductions": summary.reductions,
                "reduced_bytes": summary.reduced_bytes,
                "cache_bytes": summary.peak_cache_bytes,
                "forecast_steps": summary.forecast_steps,
                "local": local,
            }
        )
    return results


def cfg_loop(policy: dict[str, Any], steps: int, parallel: bool) -> dict[str, Any]:
    """Classifier-free guidance on the trained digits model: both branches in one process, or one per rank.

    Each rank computes its own branch (rank 0 ``cond``, rank 1 ``uncond``) with its own cache,
    then the two velocities are exchanged to take the guided step; no cache state is shared.
    """
    import hicache_sdk as sdk
    from hicache_sdk.models import DEFAULT_GUIDANCE, load_digits_model
    from hicache_sdk.models.digits import pack_images, predict_velocity, sigma_schedule

    digits = load_digits_model()
    generator = torch.Generator().manual_seed(0)
    x = pack_images(torch.randn(2, 1, 32, 32, generator=generator))
    labels = {"cond": torch.tensor([3, 8]), "uncond": torch.full((2,), 10)}
    mine = ["cond", "uncond"][dist.get_rank()] if parallel else None
    sigmas = sigma_schedule(steps)
    params = dict(policy)
    decisions: list[tuple[str, int, str, str]] = []
    with sdk.compose(params.pop("policy"), **params).apply(digits.transformer) as handle:
        handle.reset(num_steps=steps)
        handle.add_observer(_recorder(decisions))
        for i in range(steps):
            s = sigmas[i].expand(2)
            velocity = {}
            for name in [mine] if mine else ["cond", "uncond"]:
                with digits.transformer.cache_context(name):
                    velocity[name] = predict_velocity(digits, x, labels[name], s)
            if mine:
                both: list[Any] = [None, None]
                dist.all_gather_object(both, velocity[mine])
                velocity = {"cond": both[0], "uncond": both[1]}
            guided = velocity["uncond"] + DEFAULT_GUIDANCE * (velocity["cond"] - velocity["uncond"])
            x = x + (sigmas[i + 1] - sigmas[i]) * guided
        summary = handle.summary()
    return {"output": x, "decisions": decisions, "reductions": summary.reductions, "contexts": summary.contexts}


def non_finite_on_one_rank(steps: int) -> list[dict[str, Any]]:
    """Rank 1 alone forecasts one attention unit as nan once: every rank must recompute that step together."""
    from helpers import flux_inputs, run_loop, tiny_flux

    import hicache_sdk as sdk
    from hicache_sdk.policy import Policy

    model, inputs = tiny_flux(), flux_inputs(batch=1, side=8, text=6)
    cpu_context_parallel(model, dist.get_world_size())
    forecast = Policy.forecast
    poisoned: list[str] = []

    def poison(self: Policy, ctx: Any, unit: Any, token_paths: Any) -> tuple[torch.Tensor, ...]:
        outputs = forecast(self, ctx, unit, token_paths)
        if dist.get_rank() == 1 and not poisoned and unit.key.endswith(".attn"):
            poisoned.append(unit.key)
            return tuple(torch.full_like(o, float("nan")) for o in outputs)
        return outputs

    Policy.forecast = poison  # type: ignore[method-assign]
    decisions: list[tuple[str, int, str, str]] = []
    try:
        with sdk.compose("taylorseer", interval=3, max_order=1).apply(model) as handle:
            handle.add_observer(_recorder(decisions))
            out = run_loop(model, inputs, steps=steps)
            summary = handle.summary()
    finally:
        Policy.forecast = forecast  # type: ignore[method-assign]
    return [{"output": out, "decisions": decisions, "notes": summary.notes, "poisoned": poisoned}]


def bad_inputs() -> list[dict[str, Any]]:
    """What each process says of three bad setups: configurations that differ by rank, and sequences that do
    not divide among the processes (at the model's input for Flux, inside the model for Wan)."""
    from helpers import flux_inputs, tiny_flux, tiny_wan, wan_inputs

    import hicache_sdk as sdk
    from hicache_sdk.distributed import enable_context_parallel

    said = []
    flux, wan, uneven = tiny_flux(), tiny_wan(), tiny_flux()
    cpu_context_parallel(flux, dist.get_world_size())
    cpu_context_parallel(wan, dist.get_world_size())
    enable_context_parallel(uneven, ulysses_degree=dist.get_world_size(), ulysses_anything=True)
    attempts = [
        (flux, {"interval": 3 + dist.get_rank()}, flux_inputs(side=4)),
        (flux, {"interval": 3}, flux_inputs(side=3)),
        (wan, {"interval": 3}, {**wan_inputs(), "hidden_states": torch.randn(1, 4, 1, 6, 6)}),
        (uneven, {"interval": 3}, flux_inputs(side=3)),
    ]
    for model, params, inputs in attempts:
        try:
            with sdk.compose("taylorseer", **params).apply(model):
                model(**inputs, timestep=torch.tensor([1.0]))
            said.append({"error": None})
        except Exception as error:
            said.append({"error": type(error).__name__, "message": str(error)})
    return said


def _rank(rank: int, world: int, model_name: str, runs: list[dict[str, Any]], steps: int, out: str, port: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", port
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        if model_name == "bad":
            mine = bad_inputs()
        elif model_name == "nonfinite":
            mine = non_finite_on_one_rank(steps)
        elif model_name == "cfg":
            mine = [cfg_loop(params, steps, parallel=True) for params in runs]
        else:
            mine = run(model_name, runs, steps)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            torch.save(gathered, out)
    finally:
        dist.destroy_process_group()


def spawn(model_name: str, runs: list[dict[str, Any]], steps: int, out: str, port: str) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(2, model_name, runs, steps, out, port), nprocs=2)


if __name__ == "__main__":
    import json

    spec = json.loads(sys.argv[1])
    spawn(spec["model"], spec["runs"], spec["steps"], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "29541")
