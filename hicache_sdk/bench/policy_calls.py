"""Micro-benchmark: what each policy runs and saves on a small random-weight FluxPipeline with true CFG.

Per policy (none, fora, taylorseer, taylorseer+hermite, clusca, clusca+hermite; N=7, W=3, m=2 by
default; 50 steps) it prints the attention and MLP module calls of one generation (both CFG
branches), the counted FLOPs speedup from the run summary, the median wall-clock ratio against no
cache over interleaved repeats, and the relative L2 distance of the latents to no cache. Random
weights say nothing about quality; the distances only show that forecasts happened.

Run ``python -m hicache_sdk.bench.policy_calls --help`` for the options.
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

from ..accelerator import Accelerator, compose

__all__ = ["METHODS", "Method", "MethodRow", "main", "run"]


@attrs.frozen
class Method:
    """A label and the ``compose`` arguments (``policy=None``: no cache)."""

    label: str
    policy: str | None = None
    basis: str = "taylor"
    ordered: bool = True  # the policy takes ``max_order``


METHODS: tuple[Method, ...] = (
    Method("none"),
    Method("fora", "fora", ordered=False),
    Method("taylorseer", "taylorseer"),
    Method("taylorseer+hermite", "taylorseer", "hermite"),
    Method("clusca", "clusca"),
    Method("clusca+hermite", "clusca", "hermite"),
)


@attrs.frozen
class MethodRow:
    """One line of the report."""

    label: str
    attention_calls: int
    mlp_calls: int
    mlp_tokens: int
    full_steps: int
    flops_speedup: float
    wall_ratio: float
    wall_seconds: float
    relative_l2: float


def encoderless_flux_pipeline(transformer: Any) -> Any:
    """A FluxPipeline around ``transformer`` without text encoders, tokenizers or VAE.

    Call it with prompt embeddings and ``output_type="latent"``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_pipeline(*, hidden_heads: int, head_dim: int, double: int, single: int, text_dim: int, seed: int) -> Any:
    """A FluxPipeline around a random FluxTransformer2DModel, without text encoders or VAE."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    axis = head_dim // 4
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=head_dim,
        num_attention_heads=hidden_heads,
        joint_attention_dim=text_dim,
        pooled_projection_dim=text_dim,
        axes_dims_rope=(head_dim - 2 * ((3 * axis) // 2), (3 * axis) // 2, (3 * axis) // 2),
    ).eval()
    return encoderless_flux_pipeline(transformer)


def embeddings(*, text_tokens: int, text_dim: int, seed: int) -> dict[str, torch.Tensor]:
    """Prompt and negative-prompt embeddings for true CFG."""
    g = torch.Generator().manual_seed(seed)
    return {
        "prompt_embeds": torch.randn(1, text_tokens, text_dim, generator=g),
        "pooled_prompt_embeds": torch.randn(1, text_dim, generator=g),
        "negative_prompt_embeds": torch.randn(1, text_tokens, text_dim, generator=g),
        "negative_pooled_prompt_embeds": torch.randn(1, text_dim, generator=g),
    }


@contextmanager
def module_calls(transformer: torch.nn.Module) -> Iterator[dict[str, int]]:
    """Count attention calls, MLP calls and the token rows the MLPs see, with forward pre-hooks."""
    counts = {"attention": 0, "mlp": 0, "mlp_tokens": 0}

    def hook(kind: str) -> Callable[..., None]:
        def count(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            counts[kind] += 1
            if kind == "mlp":
                counts["mlp_tokens"] += int(args[0].shape[0] * args[0].shape[1])

        return count

    handles = []
    for name, module in transformer.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "attn":
            handles.append(module.register_forward_pre_hook(hook("attention")))
        elif leaf in ("ff", "ff_context", "proj_mlp"):
            handles.append(module.register_forward_pre_hook(hook("mlp")))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def accelerator(method: Method, interval: int, warmup: int, order: int) -> Accelerator:
    """The composed accelerator of a cached method."""
    if method.policy is None:
        raise ValueError(f"method {method.label!r} uses no cache")
    params: dict[str, Any] = {"interval": interval, "warmup": warmup}
    if method.ordered:
        params["max_order"] = order
    return compose(method.policy, basis=method.basis, **params)


def run(
    pipe: Any,
    inputs: dict[str, torch.Tensor],
    *,
    methods: Sequence[Method] = METHODS,
    steps: int = 50,
    size: int = 256,
    interval: int = 7,
    warmup: int = 3,
    order: int = 2,
    repeats: int = 3,
) -> list[MethodRow]:
    """Count, then time ``repeats`` interleaved rounds of every method; one row per method."""

    def generate() -> torch.Tensor:
        out = pipe(
            **inputs,
            true_cfg_scale=4.0,
            height=size,
            width=size,
            num_inference_steps=steps,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )
        return out.images

    counted: dict[str, tuple[dict[str, int], Any, torch.Tensor]] = {}
    for method in methods:  # also the warm-up: FLOPs are measured at the first full step
        with module_calls(pipe.transformer) as counts:
            if method.policy is None:
                latents, summary = generate(), None
            else:
                with accelerator(method, interval, warmup, order).apply(pipe) as handle:
                    latents = generate()
                summary = handle.summary()
        counted[method.label] = (dict(counts), summary, latents)

    seconds: dict[str, list[float]] = {m.label: [] for m in methods}
    for _ in range(repeats):
        for method in methods:
            if method.policy is None:
                seconds[method.label].append(_elapsed(generate)[0])
            else:
                with accelerator(method, interval, warmup, order).apply(pipe):
                    seconds[method.label].append(_elapsed(generate)[0])

    baseline_label = next(m.label for m in methods if m.policy is None)
    baseline = counted[baseline_label][2]
    rows = []
    for method in methods:
        counts, summary, latents = counted[method.label]
        ratios = [t / b for t, b in zip(seconds[method.label], seconds[baseline_label], strict=True)]
        rows.append(
            MethodRow(
                label=method.label,
                attention_calls=counts["attention"],
                mlp_calls=counts["mlp"],
                mlp_tokens=counts["mlp_tokens"],
                full_steps=steps if summary is None else summary.full_steps,
                flops_speedup=1.0 if summary is None else summary.flops_speedup,
                wall_ratio=statistics.median(ratios),
                wall_seconds=statistics.median(seconds[method.label]),
                relative_l2=float((latents - baseline).norm() / baseline.norm()),
            )
        )
    return rows


def _elapsed(function: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = function()
    return time.perf_counter() - start, out


def format_rows(rows: Sequence[MethodRow]) -> str:
    """The report table."""
    head = (
        f"{'method':<20} {'attn calls':>10} {'MLP calls':>9} {'MLP tokens':>10} {'full':>4} "
        f"{'FLOPs x':>7} {'wall/none':>9} {'wall s':>7} {'rel L2':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.label:<20} {r.attention_calls:>10} {r.mlp_calls:>9} {r.mlp_tokens:>10} {r.full_steps:>4} "
            f"{r.flops_speedup:>7.2f} {r.wall_ratio:>9.3f} {r.wall_seconds:>7.2f} {r.relative_l2:>8.4f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hicache_sdk.bench.policy_calls", description=(__doc__ or "").split("\n", 1)[0]
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--interval", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--order", type=int, default=2, help="max_order of taylorseer and clusca")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds (at least 3)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels: (size / 16)^2 tokens")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--double", type=int, default=2, help="double-stream blocks")
    parser.add_argument("--single", type=int, default=4, help="single-stream blocks")
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error(f"--repeats must be at least 3, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
    text_dim = args.heads * args.head_dim
    pipe = build_pipeline(
        hidden_heads=args.heads,
        head_dim=args.head_dim,
        double=args.double,
        single=args.single,
        text_dim=text_dim,
        seed=args.seed,
    )
    inputs = embeddings(text_tokens=args.text_tokens, text_dim=text_dim, seed=args.seed)
    tokens = (args.size // 16) ** 2
    print(
        f"FluxPipeline, random weights: hidden {text_dim} ({args.heads} x {args.head_dim}), {args.double} double + "
        f"{args.single} single blocks, {tokens} image + {args.text_tokens} text tokens, true CFG, {args.steps} steps; "
        f"N={args.interval} W={args.warmup} m={args.order}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); median of {args.repeats} interleaved repeats"
    )
    rows = run(
        pipe,
        inputs,
        steps=args.steps,
        size=args.size,
        interval=args.interval,
        warmup=args.warmup,
        order=args.order,
        repeats=args.repeats,
    )
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
