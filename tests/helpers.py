"""Tiny random-weight diffusers models, pipelines and loops shared by the tests (no hub, CPU, fast).

Every factory is seeded, so two calls build identical models. Inputs are plain dicts of keyword
arguments for the model's forward; loops return the stacked outputs of every step so a test can
compare whole trajectories with ``torch.equal``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
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

from hicache_sdk.bench.policy_calls import encoderless_flux_pipeline

__all__ = [
    "FLUX_IN_CHANNELS",
    "FLUX_TEXT_DIM",
    "CallCounter",
    "flux_inputs",
    "flux_modules",
    "flux_pipeline",
    "flux_prompt",
    "full_flux_pipeline",
    "pipeline_call",
    "pixart_inputs",
    "run_loop",
    "sd3_inputs",
    "timesteps",
    "tiny_flux",
    "tiny_pixart",
    "tiny_sd3",
    "tiny_wan",
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
def tiny_flux(seed: int = 0, *, num_layers: int = 2, num_single_layers: int = 2) -> FluxTransformer2DModel:
    """A FluxTransformer2DModel with 2 heads of 8 channels and random weights, in eval mode."""
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
        guidance_embeds=False,
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


def tiny_pixart(seed: int = 0) -> PixArtTransformer2DModel:
    """A PixArtTransformer2DModel (adaLN-single blocks returning one tensor)."""
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
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
