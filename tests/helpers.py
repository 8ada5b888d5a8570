"""Tiny random-weight diffusers models, pipelines and loops shared by the tests (no hub, CPU, fast).

Every factory is seeded, so two calls build identical models. Inputs are plain dicts of keyword
arguments for the model's forward; loops return the stacked outputs of every step so a test can
compare whole trajectories with ``torch.equal``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
)

import hicache_sdk as sdk
from hicache_sdk.bench.policy_calls import encoderless_flux_pipeline

__all__ = [
    "FLUX_IN_CHANNELS",
    "FLUX_TEXT_DIM",
    "CallCounter",
    "ClusCaRefresh",
    "ClusCaTrace",
    "ReferenceLadder",
    "UnitRecorder",
    "cli_status",
    "cluster_means",
    "example_on_path",
    "flux_inputs",
    "flux_modules",
    "flux_pipeline",
    "flux_prompt",
    "full_flux_pipeline",
    "install_example",
    "l1_kmeans",
    "pipeline_call",
    "pixart_inputs",
    "refuse_json_token",
    "replay_clusca_image_mlp",
    "run_loop",
    "sd3_inputs",
    "timesteps",
    "tiny_flux",
    "tiny_pixart",
    "tiny_sd3",
    "tiny_wan",
    "trace_clusca",
    "wan_inputs",
]

# These models are tiny: one thread is 10-100x faster than several fighting over a shared machine's cores.
torch.set_num_threads(1)

FLUX_IN_CHANNELS = 16  # FluxPipeline packs 4 latent channels x 2 x 2 into one token
FLUX_TEXT_DIM = 16
FLUX_POOLED_DIM = 16


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- Flux --------------------------------------------------------------------------------------
def tiny_flux(
    seed: int = 0, *, num_layers: int = 2, num_single_layers: int = 2, guidance_embeds: bool = False
) -> FluxTransformer2DModel:
    """A FluxTransformer2DModel with 2 heads of 8 channels and random weights, in eval mode.

    ``guidance_embeds=True`` makes it guidance-distilled, as FLUX.1-dev.
    """
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=FLUX_IN_CHANNELS,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=FLUX_TEXT_DIM,
        pooled_projection_dim=FLUX_POOLED_DIM,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )
    return model.eval()


def flux_inputs(*, batch: int = 1, side: int = 4, text: int = 6, seed: int = 0) -> dict[str, Any]:
    """Forward arguments of :func:`tiny_flux` for ``side x side`` image tokens (timestep excluded)."""
    g = _seeded(seed)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    return {
        "hidden_states": torch.randn(batch, side * side, FLUX_IN_CHANNELS, generator=g),
        "encoder_hidden_states": torch.randn(batch, text, FLUX_TEXT_DIM, generator=g),
        "pooled_projections": torch.randn(batch, FLUX_POOLED_DIM, generator=g),
        "img_ids": img_ids.reshape(-1, 3),
        "txt_ids": torch.zeros(text, 3),
    }


def flux_pipeline(transformer: FluxTransformer2DModel | None = None) -> FluxPipeline:
    """A FluxPipeline without text encoders, tokenizers or VAE: call it with embeddings, latent output."""
    pipe: FluxPipeline = encoderless_flux_pipeline(transformer if transformer is not None else tiny_flux())
    return pipe


def full_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """A complete FluxPipeline built offline: CLIP and T5 encoders, in-memory tokenizers and a VAE.

    Call it with prompt strings, ``height = width = 32`` (64 image tokens) and ``max_sequence_length=8``.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    words = ["a", "cat", "dog", "photo", "of", "the"]
    clip_vocab = {w: i for i, w in enumerate(["<|startoftext|>", "<|endoftext|>", *(w + "</w>" for w in words)])}
    clip_tokenizer = CLIPTokenizer(vocab=clip_vocab, merges=[], model_max_length=16)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *(("\u2581" + w, -1.0) for w in words)]
    t5_tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0)
    torch.manual_seed(seed)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_vocab),
            hidden_size=FLUX_POOLED_DIM,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(pieces), d_model=FLUX_TEXT_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2, pad_token_id=0
        )
    )
    vae = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 16],
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=1.0,
        shift_factor=0.0,
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae.eval(),
        text_encoder=clip.eval(),
        tokenizer=clip_tokenizer,
        text_encoder_2=t5.eval(),
        tokenizer_2=t5_tokenizer,
        transformer=tiny_flux(seed, num_layers=1, num_single_layers=1),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_prompt(*, batch: int = 1, text: int = 6, seed: int = 0, negative: bool = False) -> dict[str, torch.Tensor]:
    """``prompt_embeds``/``pooled_prompt_embeds`` (or the ``negative_`` pair) for :func:`flux_pipeline`."""
    g = _seeded(seed)
    prefix = "negative_" if negative else ""
    return {
        f"{prefix}prompt_embeds": torch.randn(batch, text, FLUX_TEXT_DIM, generator=g),
        f"{prefix}pooled_prompt_embeds": torch.randn(batch, FLUX_POOLED_DIM, generator=g),
    }


def pipeline_call(
    pipe: FluxPipeline, *, steps: int, cfg: bool = False, batch: int = 1, size: int = 64, seed: int = 0
) -> torch.Tensor:
    """Packed latents of one seeded pipeline call (``size x size`` pixels: ``(size / 16)^2`` tokens).

    With ``cfg`` the call uses true CFG (``true_cfg_scale=2`` and negative embeddings), so the
    transformer runs in the contexts ``"cond"`` and ``"uncond"``.
    """
    extra: dict[str, Any] = {}
    if cfg:
        extra = {"true_cfg_scale": 2.0, **flux_prompt(batch=batch, seed=seed + 1, negative=True)}
    result = pipe(
        **flux_prompt(batch=batch, seed=seed),
        **extra,
        height=size,
        width=size,
        num_inference_steps=steps,
        output_type="latent",
        generator=_seeded(seed),
    )
    return result.images


# -- other diffusers transformers (generic adapter) ------------------------------------------
def tiny_sd3(seed: int = 0) -> SD3Transformer2DModel:
    """An SD3Transformer2DModel with 2 joint blocks (the last one ``context_pre_only``)."""
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        out_channels=4,
    )
    return model.eval()


def sd3_inputs(*, batch: int = 1, seed: int = 0) -> dict[str, Any]:
    g = _seeded(seed)
    return {
        "hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(batch, 6, 16, generator=g),
        "pooled_projections": torch.randn(batch, 16, generator=g),
    }


def tiny_pixart(seed: int = 0, *, out_channels: int = 4) -> PixArtTransformer2DModel:
    """A PixArtTransformer2DModel (adaLN-single blocks returning one tensor); 8 output channels learn a variance."""
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=out_channels,
        num_layers=2,
        cross_attention_dim=16,
        caption_channels=16,
        sample_size=8,
        patch_size=2,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    )
    return model.eval()


def pixart_inputs(*, batch: int = 1, seed: int = 0) -> dict[str, Any]:
    g = _seeded(seed)
    return {
        "hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(batch, 6, 16, generator=g),
    }


def tiny_wan(seed: int = 0) -> WanTransformer3DModel:
    """A WanTransformer3DModel with 2 blocks (its list is ``blocks``)."""
    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        rope_max_seq_len=32,
    )
    return model.eval()


def wan_inputs(*, batch: int = 1, seed: int = 0) -> dict[str, Any]:
    g = _seeded(seed)
    return {
        "hidden_states": torch.randn(batch, 4, 2, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(batch, 6, 16, generator=g),
    }


# -- loops ------------------------------------------------------------------------------------
def timesteps(steps: int, scale: float = 1.0) -> list[float]:
    """``steps`` decreasing noise levels from ``scale`` towards 0 (a fresh generation each pass)."""
    return [scale * (1.0 - s / steps) for s in range(steps)]


def run_loop(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    *,
    steps: int,
    contexts: Iterable[str] | None = None,
    context_inputs: dict[str, dict[str, Any]] | None = None,
    scale: float = 1.0,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """A bare Euler loop over ``model``; returns every model output stacked ``(steps, n_ctx, ...)``.

    With ``contexts`` each step calls the model once per name inside ``model.cache_context(name)``
    (as diffusers pipelines do for CFG), with ``inputs`` updated by ``context_inputs[name]``; without,
    there is one call per step and no context. The state advances by the first context's output.
    """
    names = list(contexts) if contexts is not None else [None]
    per_context = context_inputs or {}
    latent = inputs["hidden_states"].clone()
    levels = timesteps(steps, scale)
    outputs = []
    with torch.no_grad():
        for step, level in enumerate(levels):
            if on_step is not None:
                on_step(step)
            row = []
            for name in names:
                call = {**inputs, **per_context.get(name or "", {}), "hidden_states": latent}
                batch = latent.shape[0]
                scope = model.cache_context(name) if name is not None else nullcontext()  # type: ignore[operator]
                with scope:
                    out = model(**call, timestep=torch.full((batch,), level), return_dict=False)[0]
                row.append(out)
            outputs.append(torch.stack(row))
            nxt = levels[step + 1] if step + 1 < steps else 0.0
            latent = latent + (nxt - level) * row[0].reshape(latent.shape)
    return torch.stack(outputs)


# -- counting ---------------------------------------------------------------------------------
class CallCounter:
    """Counts forward calls (and the token rows they see) of named submodules, with forward hooks.

    ``calls[name]`` is the number of calls; ``rows[name]`` lists, per call, the number of tokens per
    sample (``input.shape[1]``) and ``batches[name]`` the batch size of each call.
    """

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.calls: dict[str, int] = dict.fromkeys(modules, 0)
        self.rows: dict[str, list[int]] = {name: [] for name in modules}
        self.batches: dict[str, list[int]] = {name: [] for name in modules}
        self._modules = modules
        self._handles: list[Any] = []

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            first = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            self.calls[name] += 1
            self.rows[name].append(int(first.shape[1]) if first.dim() > 2 else int(first.shape[0]))
            self.batches[name].append(int(first.shape[0]))

        return hook

    @contextmanager
    def counting(self) -> Iterator[CallCounter]:
        self._handles = [
            m.register_forward_pre_hook(self._hook(name), with_kwargs=True) for name, m in self._modules.items()
        ]
        try:
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    def reset(self) -> None:
        for name in self.calls:
            self.calls[name] = 0
            self.rows[name].clear()
            self.batches[name].clear()


def flux_modules(model: FluxTransformer2DModel) -> dict[str, torch.nn.Module]:
    """The attention and MLP submodules of every Flux block, by dotted name."""
    found: dict[str, torch.nn.Module] = {}
    for i, block in enumerate(model.transformer_blocks):
        for part in ("attn", "ff", "ff_context"):
            found[f"transformer_blocks.{i}.{part}"] = getattr(block, part)
    for i, block in enumerate(model.single_transformer_blocks):
        for part in ("attn", "proj_mlp", "proj_out"):
            found[f"single_transformer_blocks.{i}.{part}"] = getattr(block, part)
    return found


# -- observing a cached run through its public API ----------------------------------------------
class UnitRecorder:
    """An observer for ``handle.add_observer``: every served unit output, cloned.

    ``events[(context, key, step)] = (how, outputs)`` with ``how`` one of ``"computed"``,
    ``"forecast"``, ``"fallback"`` and one tensor per stream in ``outputs``.
    """

    def __init__(self) -> None:
        self.events: dict[tuple[str, str, int], tuple[str, tuple[torch.Tensor, ...]]] = {}

    def __call__(self, context: str, step: int, key: str, how: str, outputs: tuple[torch.Tensor, ...]) -> None:
        self.events[context, key, step] = (how, tuple(t.detach().clone() for t in outputs))

    def keys(self, context: str = "default") -> list[str]:
        """Unit keys served in ``context``, in the order they were first served."""
        return list(dict.fromkeys(k for c, k, _ in self.events if c == context))

    def steps(self, key: str, how: str | None = None, context: str = "default") -> list[int]:
        """Steps at which ``key`` was served (as ``how``, if given), in order."""
        return sorted(s for (c, k, s), (h, _) in self.events.items() if c == context and k == key and how in (None, h))

    def how(self, key: str, step: int, context: str = "default") -> str:
        return self.events[context, key, step][0]

    def outputs(self, key: str, step: int, context: str = "default") -> tuple[torch.Tensor, ...]:
        return self.events[context, key, step][1]


class ReferenceLadder:
    """``D^0 .. D^m`` of one stream rebuilt in float64 from its anchors, by the documented rule.

    docs/concepts.md, "Anchor and ladder": at an anchor ``s_j``, ``new D^0 = F(s_j)`` and
    ``new D^{i+1} = (new D^i - old D^i) / (s_j - s_{j-1})``, growing one order per anchor up to
    ``max_order``; before step ``W - 1`` the ladder restarts at every anchor (the warm-up rule).
    ``terms[0]`` may be edited between anchors (ClusCa's refresh); the edit persists.
    """

    def __init__(self, max_order: int, warmup: int) -> None:
        self.max_order = max_order
        self.warmup = warmup
        self.terms: list[torch.Tensor] = []
        self.last: int | None = None
        self.spacing: int | None = None

    def anchor(self, step: int, value: torch.Tensor) -> None:
        new = [value.double()]
        if self.terms and step >= self.warmup - 1:
            assert self.last is not None
            spacing = step - self.last
            for i in range(min(len(self.terms), self.max_order)):
                new.append((new[i] - self.terms[i]) / spacing)
            self.spacing = spacing
        else:
            self.spacing = None
        self.terms = new
        self.last = step

    def weights(self, step: int, basis: Any) -> tuple[float, ...]:
        assert self.last is not None
        return tuple(basis.weights(step - self.last, len(self.terms) - 1, float(self.spacing or 1)))

    def forecast(self, step: int, basis: Any) -> torch.Tensor:
        """``sum_i w_i D^i`` in float64 (docs/concepts.md, "Basis")."""
        weights = self.weights(step, basis)
        return sum((w * t for w, t in zip(weights[1:], self.terms[1:], strict=True)), weights[0] * self.terms[0])


# -- ClusCa, observed from outside ----------------------------------------------------------------
class ClusCaTrace:
    """What a ClusCa run shows from outside: outputs, summary, submodule calls and served units.

    ``image_mlp[b][s]`` is what block ``b``'s image MLP module returned at step ``s``: the whole
    ``(B, L, D)`` output at a full step, the ``(B, K, D)`` fresh tokens (row ``c`` for cluster ``c``)
    at a forecast step. ``block_images[b][s]`` is the image hidden states block ``b`` returned.
    """

    def __init__(self, model: FluxTransformer2DModel) -> None:
        self.model = model
        self.counter = CallCounter(flux_modules(model))
        self.units = UnitRecorder()
        self.image_mlp: dict[int, dict[int, torch.Tensor]] = {i: {} for i in range(len(model.transformer_blocks))}
        self.block_images: dict[int, dict[int, torch.Tensor]] = {i: {} for i in range(len(model.transformer_blocks))}
        self.output = torch.empty(0)
        self.summary: Any = None

    def full_steps(self, key: str = "transformer_blocks.0.ff") -> list[int]:
        return self.units.steps(key, "computed")

    def anchor_before(self, step: int) -> int:
        """The newest full step before ``step``."""
        return max(s for s in self.full_steps() if s < step)


def trace_clusca(model: FluxTransformer2DModel, inputs: dict[str, Any], *, steps: int, **params: Any) -> ClusCaTrace:
    """Run ``compose("clusca", **params)`` on a bare loop (one context) and record what it shows."""
    trace = ClusCaTrace(model)
    step = [0]

    def keep_mlp(block: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
            trace.image_mlp[block][step[0]] = output.detach().clone()

        return hook

    def keep_images(block: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            trace.block_images[block][step[0]] = output[1].detach().clone()

        return hook

    hooks = [b.ff.register_forward_hook(keep_mlp(i)) for i, b in enumerate(model.transformer_blocks)]
    hooks += [b.register_forward_hook(keep_images(i)) for i, b in enumerate(model.transformer_blocks)]
    try:
        with sdk.compose("clusca", **params).apply(model) as handle, trace.counter.counting():
            handle.add_observer(trace.units)
            trace.output = run_loop(model, inputs, steps=steps, on_step=lambda s: step.__setitem__(0, s))
    finally:
        for h in hooks:
            h.remove()
    trace.summary = handle.summary()
    return trace


class ClusCaRefresh:
    """Per forecast step of one image MLP unit: the tokens ClusCa recomputed and the cluster labels.

    ``chosen[s]`` is ``(B, K)``: the token that received cluster ``c``'s fresh value; ``labels[s]``
    is ``(B, L)``: each token's cluster, read from which fresh value it was pulled toward (``-1``
    where that cannot be read, i.e. for every token not recomputed when ``gamma == 0``).
    """

    def __init__(self) -> None:
        self.chosen: dict[int, torch.Tensor] = {}
        self.labels: dict[int, torch.Tensor] = {}


def replay_clusca_image_mlp(
    trace: ClusCaTrace,
    block: int,
    *,
    basis: Any,
    max_order: int,
    warmup: int,
    gamma: float,
    tol: float = 1e-4,
) -> ClusCaRefresh:
    """Check every forecast of block ``block``'s image MLP against ClusCa's documented refresh.

    plugins/clusca.py: at a forecast step the MLP runs on one token per cluster; those fresh values
    overwrite ``D^0`` at their tokens and every other token is pulled toward its cluster's fresh
    value, ``D^0_j <- D^0_j + gamma (f_c(j) - D^0_j)``; then the basis forecast runs on the updated
    ladder, and the edit persists. The ladder is rebuilt from the served anchors
    (:class:`ReferenceLadder`), the fresh values are the MLP module's own outputs. Which token
    was recomputed and which cluster each token belongs to are read off the served forecast; an
    assertion fails if no choice of them explains it within ``tol``.
    """
    key = f"transformer_blocks.{block}.ff"
    ladder = ReferenceLadder(max_order, warmup)
    refresh = ClusCaRefresh()
    for step in trace.units.steps(key):
        how, (served,) = trace.units.events["default", key, step]
        if how == "computed":
            ladder.anchor(step, served)
            continue
        assert how == "forecast", (key, step, how)
        assert ladder.weights(step, basis)[0] == 1.0  # every built-in basis keeps D^0 as is
        old = ladder.terms[0]
        new = served.double() - (ladder.forecast(step, basis) - old)  # the D^0 this forecast was made from
        fresh = trace.image_mlp[block][step].double()  # (B, K, D)
        batch, length, _ = old.shape
        k = fresh.shape[1]
        to_fresh = (new[:, :, None, :] - fresh[:, None, :, :]).abs().amax(-1)  # (B, L, K)
        is_fresh = to_fresh <= tol
        per_row = is_fresh.sum(dim=1)
        assert (per_row == 1).all(), f"step {step}: tokens holding each fresh value (one expected): {per_row.tolist()}"
        assert (is_fresh.sum(dim=2) <= 1).all(), f"step {step}: a token holds two fresh values"
        chosen = is_fresh.to(torch.int8).argmax(dim=1)  # (B, K)
        pulled = old[:, :, None, :] + gamma * (fresh[:, None, :, :] - old[:, :, None, :])  # (B, L, K, D)
        to_pulled = (new[:, :, None, :] - pulled).abs().amax(-1)  # (B, L, K)
        labels = torch.full((batch, length), -1, dtype=torch.long)
        expected = old.clone()
        for b in range(batch):
            for c in range(k):
                labels[b, chosen[b, c]] = c
                expected[b, chosen[b, c]] = fresh[b, c]
            for j in range(length):
                if labels[b, j] >= 0 or gamma == 0:
                    continue
                distances, nearest = to_pulled[b, j].sort()
                assert distances[0] <= tol, (
                    f"step {step}, sample {b}, token {j}: D^0 is not pulled toward any fresh value with "
                    f"gamma={gamma} (nearest off by {float(distances[0]):.3g})"
                )
                assert k == 1 or distances[1] > 10 * tol, f"step {step}, sample {b}, token {j}: ambiguous cluster"
                labels[b, j] = nearest[0]
                expected[b, j] = pulled[b, j, nearest[0]]
        off = float((new - expected).abs().max())
        assert off <= tol, f"step {step}: the forecast is off the replayed refresh by {off:.3g}"
        ladder.terms[0] = expected  # the refresh edits the ladder: the next step starts from it
        refresh.chosen[step] = chosen
        refresh.labels[step] = labels
    return refresh


def l1_kmeans(tokens: torch.Tensor, centroids: torch.Tensor, *, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A plain L1 k-means of one sample's tokens ``(L, D)`` from ``centroids (K, D)`` (the test's oracle).

    As documented for ClusCa's clustering: assign each token to the nearest centroid by L1
    distance, move each centroid to its members' mean (an empty cluster keeps its centroid); at
    most ``iterations`` rounds, stopping when no label changes.
    """
    x, c = tokens.double(), centroids.double().clone()
    labels = torch.full((x.shape[0],), -1, dtype=torch.long)
    for _ in range(iterations):
        new = (x[:, None, :] - c[None, :, :]).abs().sum(-1).argmin(dim=1)
        if torch.equal(new, labels):
            break
        labels = new
        for cluster in range(c.shape[0]):
            members = x[labels == cluster]
            if len(members):
                c[cluster] = members.mean(dim=0)
    return labels, c


def cluster_means(tokens: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Mean token ``(K, D)`` of each cluster of one sample (every cluster must have a member)."""
    counts = torch.bincount(labels, minlength=k)
    assert (counts > 0).all(), f"an empty cluster: members per cluster {counts.tolist()}"
    return torch.stack([tokens.double()[labels == c].mean(dim=0) for c in range(k)])


# -- example plugin distributions ----------------------------------------------------------------
def install_example(example: Path, module: str, root: Path) -> Path:
    """``example`` (a distribution folder) installed with pip, offline, into ``root / "target"``.

    Installed from a copy, so no build files are left in the repository.
    """
    source = root / "source"
    shutil.copytree(example, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    installed = root / "target"
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"]
    result = subprocess.run(
        [*command, "--target", str(installed), str(source)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (installed / module / "__init__.py").is_file()
    return installed


def _forget_module(module: str) -> None:
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        del sys.modules[name]


@contextmanager
def example_on_path(target: Path, module: str, monkeypatch: Any) -> Iterator[Path]:
    """``target`` on sys.path and a registry that has not seen it yet; both undone after."""
    from hicache_sdk.registry import AUTOLOAD_ENV, reset_registry

    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    monkeypatch.syspath_prepend(str(target))
    _forget_module(module)
    reset_registry()
    try:
        yield target
    finally:
        _forget_module(module)
        monkeypatch.undo()  # sys.path first, so the next registry cannot see the example
        reset_registry()


# -- the command line ------------------------------------------------------------------------------
def cli_status(argv: list[str]) -> int:
    """``hicache``'s exit status for ``argv``, argparse's own usage errors (SystemExit) included."""
    from hicache_sdk.cli import main

    try:
        return main(argv)
    except SystemExit as exc:
        assert isinstance(exc.code, int)
        return exc.code


def refuse_json_token(token: str) -> float:
    """``json.loads(..., parse_constant=refuse_json_token)``: NaN and Infinity are not JSON."""
    raise ValueError(f"non-standard JSON token {token}")
