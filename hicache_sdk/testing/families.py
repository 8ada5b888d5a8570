"""One tiny random-weight model of every diffusers DiT family, and the arguments of one denoising step.

:data:`FAMILY_CASES` maps a family name to a :class:`~hicache_sdk.testing.model_case.ModelCase`. Every
model has 2 blocks per block list (Z-Image: one refiner block of each kind), 2 heads of 8 channels and
small text embeddings, and is built from its config with seeded random weights (no download); one
forward at batch 2 takes milliseconds on a CPU. The inputs follow what each family's diffusers
pipeline passes to its transformer (ids, masks, image shapes, pooled embeddings, guidance), with the
timestep in the family's own convention at noise level ``sigma``:

* ``sigma`` itself: Flux, Chroma, Flux.2 and Qwen-Image (their pipelines pass ``t / 1000``);
* ``1 - sigma``: Z-Image (its pipeline passes ``(1000 - t) / 1000``);
* ``1000 * sigma``: every other family.

Text masks leave the last token of every odd sample unused (padding), so the masking paths run.
:func:`cast_inputs` casts the floating tensors of a case's inputs (for a bf16 run of ``model.to(dtype)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import (
    ChromaTransformer2DModel,
    CogVideoXTransformer3DModel,
    CogView4Transformer2DModel,
    DiTTransformer2DModel,
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    HiDreamImageTransformer2DModel,
    HunyuanVideo15Transformer3DModel,
    HunyuanVideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    PixArtTransformer2DModel,
    QwenImageTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
    ZImageTransformer2DModel,
)

from .model_case import ModelCase, cast_floating

__all__ = ["FAMILY_CASES", "cast_inputs"]

HEADS = 2
HEAD_DIM = 8
HIDDEN = HEADS * HEAD_DIM  # 16
TEXT_DIM = 16  # width of every text / pooled / image embedding fed to a model
TEXT = 6  # text tokens
LATENT = 4  # latent channels
SIDE = 8  # latent height and width (patch 2: 4 x 4 = 16 image tokens)
FRAMES = 2  # latent frames of the video families
ROPE_3D = (2, 2, 4)  # rope channels per (frame/text, height, width) axis: they add up to HEAD_DIM


# -- helpers -----------------------------------------------------------------------------------
def _generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


#: How :func:`_samples` draws one sample's tensor: standard normal values of a shape, or a function of the generator.
Draw = tuple[int, ...] | Callable[[torch.Generator], torch.Tensor]


def _samples(seed: int, batch: int, **draws: Draw) -> dict[str, torch.Tensor]:
    """One ``(batch, ...)`` tensor per keyword, drawn sample after sample from one generator seeded with ``seed``.

    All of sample ``i``'s values are drawn before sample ``i + 1``'s, so a sample does not depend on
    ``batch``: the first sample of a batch of 2 is the sample of a batch of 1.
    """
    g = _generator(seed)
    rows = [
        {name: draw(g) if callable(draw) else torch.randn(draw, generator=g) for name, draw in draws.items()}
        for _ in range(batch)
    ]
    return {name: torch.stack([row[name] for row in rows]) for name in draws}


def _timestep(batch: int, value: float) -> torch.Tensor:
    """The timestep ``value`` for each of ``batch`` samples: a float32 tensor of shape ``(batch,)``."""
    return torch.full((batch,), float(value))


def _text_mask(batch: int, length: int = TEXT) -> torch.Tensor:
    """A long ``(batch, length)`` tokenizer mask: every odd sample leaves its last token unused."""
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1::2, -1] = 0
    return mask


def _image_ids(height: int, width: int, axes: int = 3) -> torch.Tensor:
    """Flux-style position ids of ``height x width`` image tokens: ``(h*w, axes)``, (row, col) on axes 1 and 2."""
    ids = torch.zeros(height, width, axes)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, axes)


def _builder(cls: type[torch.nn.Module], **config: Any) -> Callable[[], torch.nn.Module]:
    """A ``build()`` that seeds torch, constructs ``cls(**config)`` and returns it in float32 eval mode."""

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return cls(**config).float().eval()

    build.__doc__ = f"A tiny random-weight {cls.__name__}."
    return build


def cast_inputs(kwargs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """A copy of forward arguments with every floating tensor cast to ``dtype``; integer and bool tensors are kept.

    Float position ids (Flux, Chroma) are cast too, as their pipelines cast them to the model's dtype.
    """
    return {name: cast_floating(value, dtype) for name, value in kwargs.items()}


# -- Flux, Chroma, Flux.2, Qwen-Image: packed latents, timestep = sigma ----------------------------
PACKED = LATENT * 4  # 2 x 2 latent pixels packed into one token
PACKED_SIDE = SIDE // 2
PACKED_TOKENS = PACKED_SIDE**2  # 16


def _packed(seed: int, batch: int, **extra: Draw) -> dict[str, torch.Tensor]:
    """Packed ``(B, tokens, channels)`` latents and ``(B, TEXT, TEXT_DIM)`` text embeddings (and ``extra``)."""
    return _samples(seed, batch, hidden_states=(PACKED_TOKENS, PACKED), encoder_hidden_states=(TEXT, TEXT_DIM), **extra)


def _flux_inputs(batch: int, sigma: float, seed: int) -> dict[str, Any]:
    """FluxPipeline's call (guidance embeddings off, as FLUX.1-schnell: no ``guidance``)."""
    return {
        **_packed(seed, batch, pooled_projections=(TEXT_DIM,)),
        "timestep": _timestep(batch, sigma),
        "img_ids": _image_ids(PACKED_SIDE, PACKED_SIDE),
        "txt_ids": torch.zeros(TEXT, 3),
        "return_dict": False,
    }


def _chroma_inputs(batch: int, sigma: float, seed: int) -> dict[str, Any]:
    """ChromaPipeline's call: a float mask that keeps the first padding token, extended over the image tokens."""
    lengths = _text_mask(batch).sum(dim=1)
    text_mask = (torch.arange(TEXT)[None, :] <= lengths[:, None]).float()
    return {
        **_packed(seed, batch),
        "timestep": _timestep(batch, sigma),
        "img_ids": _image_ids(PACKED_SIDE, PACKED_SIDE),
        "txt_ids": torch.zeros(TEXT, 3),
        "attention_mask": torch.cat([text_mask, torch.ones(batch, PACKED_TOKENS)], dim=1),
        "return_dict": False,
    }


def _flux2_inputs(batch: int, sigma: float, seed: int) -> dict[str, Any]:
    """Flux2Pipeline's call: per-sample 4-axis (t, h, w, l) ids and guidance (its guidance embeddings are on)."""
    one = torch.arange(1)
    img_ids = torch.cartesian_prod(one, torch.arange(PACKED_SIDE), torch.arange(PACKED_SIDE), one)
    txt_ids = torch.cartesian_prod(one, one, one, torch.arange(TEXT))
    return {
        **_packed(seed, batch),
        "timestep": _timestep(batch, sigma),
        "guidance": torch.full((batch,), 4.0),
        "img_ids": img_ids.expand(batch, -1, -1).clone(),
        "txt_ids": txt_ids.expand(batch, -1, -1).clone(),
        "return_dict": False,
    }


def _qwenimage_inputs(batch: int, sigma: float, seed: int) -> dict[str, Any]:
    """QwenImagePipeline's call: a long text mask and one ``[(frames, h, w)]`` image shape list per sample."""
    return {
        **_packed(seed, batch),
        "encoder_hidden_states_mask": _text_mask(batch),
        "timestep": _timestep(batch, sigma),
        "img_shapes": [[(1, PACKED_SIDE, PACKED_SIDE)]] * batch,
        "return_dict": False,
    }


# -- video families, timestep = 1000 sigma ---------------------------------------------------------
def _wan_inputs(batch: int, sigma: float, seed: int) -> dict[str, Any]:
    """WanPipeline's call (text to video)."""
    return {
        **_samples(seed, batch, hidden_states=(LATENT, FRAMES, SIDE, SIDE), encoder_hidden_states=(TEXT, TEXT_DIM)),
        "timestep": _timestep(batch, 1000 * sigma),
        "return_dict": False,
    }


def _hunyuanvideo_inputs(batch: int, sigma: float, seed: int) -> dict[str, Any]:
    """HunyuanVideoPipeline's call: a float text mask, a pooled CLIP embedding, guidance scale x 1000."""
    drawn = _samples(
        seed,
        batch,
        hidden_states=(LATENT, FRAMES, SIDE, SIDE),
        encoder_hidden_states=(TEXT, TEXT_DIM),
        pooled_projections=(TEXT_DIM,),
    )
    return {
        **drawn,
        "encoder_attention_mask": _text_mask(batch).float(),
        "timestep": _timestep(batch, 1000 * sigma),
        "guidance": torch.full((batch,), 6000.0),
        "return_dict": False,
    }


HV15_SIDE = 4  # patch 1: 2 x 4 x 4 = 32 video tokens
HV15_IMAGE_TOKENS = 4


def _hunyuanvideo15_inputs(batch: int, sigma: float, seed: int) -> dict[str, Any]:
    """HunyuanVideo15Pipeline's text-to-video call: latents + zero condition latents + zero mask, zero image."""
    drawn = _samples(
        seed,
        batch,
        hidden_states=(LATENT, FRAMES, HV15_SIDE, HV15_SIDE),
        encoder_hidden_states=(TEXT, TEXT_DIM),
        encoder_hidden_states_2=(TEXT, TEXT_DIM),
    )
    condition = torch.zeros(batch, LATENT + 1, FRAMES, HV15_SIDE, HV15_SIDE)
    return {
        **drawn,
        "hidden_states": torch.cat([drawn["hidden_states"], condition], dim=1),
        "encoder_attention_mask": _text_mask(batch).float(),
        "encoder_attention_mask_2": _text_mask(batch).float(),
        "image_embeds": torch.zeros(batch, HV15_IMAGE_TOKENS, TEXT_DIM),
        "timestep": _timestep(batch, 1000 * sigma),
        "return_dict": False,
    }


def _cogvideox_inputs(batch: int, sigma: float, seed: int) -> dict[str, Any]:
    """CogVideoXPipeline's call (the 2B layout: no rotary embedding); latents are ``(B, F, C, H, W)``."""
    return {
        **_samples(seed, batch, hidden_states=(FRAMES, LATENT, SIDE, SIDE), encoder_hidden_states=(TEXT, TEXT_DIM)),
        "timestep": _timestep(batch, 1000 * sigma),
        "return_dict": False,
    }


LTX_CHANNELS = 8
LTX_SIDE = 4  # patch 1: 2 x 4 x 4 = 32 video tokens


def _ltx_inputs(batch: int, sigma: float, seed: int) -> dict[str, Any]:
    """LTXPipeline's call: packed ``(B, F*H*W, C)`` latents, a bool text mask, the latent grid and rope scale."""
    drawn = _samples(
        seed,
        batch,
        hidden_states=(FRAMES * LTX_SIDE * LTX_SIDE, LTX_CHANNELS),
        encoder_hidden_states=(TEXT, TEXT_DIM),
    )
    return {
        **drawn,
        "encoder_attention_mask": _text_mask(batch).bool(),
        "timestep": _timestep(batch, 1000 * sigma),
        "num_frames": FRAMES,
        "height": LTX_SIDE,
        "width": LTX_SIDE,
        "rope_interpolation_scale": (8 / 25, 32, 32),  # (VAE temporal ratio / frame rate, spatial, spatial)
        "return_dict": False,
    }


# -- image families, timestep = 1000 sigma (Z-Image: 1 - sigma) ------------------------------------
def _image(seed: int, batch: int, **extra: Draw) -> dict[str, torch.Tensor]:
    """``(B, LATENT, SIDE, SIDE)`` latents and ``(B, TEXT, TEXT_DIM)`` text embeddings (and ``extra``)."""
    return _samples(seed, batch, hidden_states=(LATENT, SIDE, SIDE), encoder_hidden_states=(TEXT, TEXT_DIM), **extra)


def _sd3_inputs(batch: int, sigma: float, seed: int) -> dict[str, Any]:
    """StableDiffusion3Pipeline's call."""
    return {
        **_image(seed, batch, pooled_projections=(TEXT_DIM,)),
        "timestep": _timestep(batch, 1000 * sigma),
        "return_dict": False,
    }


def _pixart_inputs(batch: int, sigma: float, seed: int) -> dict[str, Any]:
    """PixArtAlphaPipeline's call: a long text mask and empty micro-conditions."""
    return {
        **_image(seed, batch),
        "encoder_attention_mask": _text_mask(batch),
        "timestep": _timestep(batch, 1000 * sigma),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        "return_dict": False,
    }


DIT_CLASSES = 10


def _class_label(g: torch.Generator) -> torch.Tensor:
    """One class label in ``range(DIT_CLASSES)`` drawn from ``g``."""
    return torch.randint(0, DIT_CLASSES, (), generator=g)


def _dit_inputs(batch: int, sigma: float, seed: int) -> dict[str, Any]:
    """DiTPipeline's call: class-conditional, one long class label per sample."""
    return {
        **_samples(seed, batch, hidden_states=(LATENT, SIDE, SIDE), class_labels=_class_label),
        "timestep": _timestep(batch, 1000 * sigma),
        "return_dict": False,
    }


def _sana_inputs(batch: int, sigma: float, seed: int) -> dict[str, Any]:
    """SanaPipeline's call: a long text mask (``timestep_scale`` 1)."""
    return {
        **_image(seed, batch),
        "encoder_attention_mask": _text_mask(batch),
        "timestep": _timestep(batch, 1000 * sigma),
        "return_dict": False,
    }


HIDREAM_LLAMA_LAYERS = 2  # hidden states of the Llama encoder, picked per block by ``llama_layers``


def _hidream_inputs(batch: int, sigma: float, seed: int) -> dict[str, Any]:
    """HiDreamImagePipeline's call: T5 embeddings, stacked Llama hidden states ``(layers, B, L, D)``, pooled CLIP."""
    drawn = _samples(
        seed,
        batch,
        hidden_states=(LATENT, SIDE, SIDE),
        encoder_hidden_states_t5=(TEXT, TEXT_DIM),
        encoder_hidden_states_llama3=(HIDREAM_LLAMA_LAYERS, TEXT, TEXT_DIM),
        pooled_embeds=(TEXT_DIM,),
    )
    return {
        **drawn,
        "encoder_hidden_states_llama3": drawn["encoder_hidden_states_llama3"].transpose(0, 1).contiguous(),
        "timesteps": _timestep(batch, 1000 * sigma),
        "return_dict": False,
    }


def _cogview4_inputs(batch: int, sigma: float, seed: int) -> dict[str, Any]:
    """CogView4Pipeline's call: original size, target size and crop corner in pixels, one row per sample."""
    pixels = torch.tensor([[SIDE * 8.0, SIDE * 8.0]]).repeat(batch, 1)
    return {
        **_image(seed, batch),
        "timestep": _timestep(batch, 1000 * sigma),
        "original_size": pixels,
        "target_size": pixels.clone(),
        "crop_coords": torch.zeros(batch, 2),
        "return_dict": False,
    }


def _zimage_inputs(batch: int, sigma: float, seed: int) -> dict[str, Any]:
    """ZImagePipeline's call: lists of per-sample ``(C, 1, H, W)`` latents and unpadded text embeddings."""
    drawn = _samples(seed, batch, x=(LATENT, 1, SIDE, SIDE), cap_feats=(TEXT, TEXT_DIM))
    lengths = _text_mask(batch).sum(dim=1).tolist()
    return {
        "x": list(drawn["x"].unbind(0)),
        "t": _timestep(batch, 1 - sigma),
        "cap_feats": [text[:n] for text, n in zip(drawn["cap_feats"], lengths, strict=True)],
        "return_dict": False,
    }


# -- the cases -------------------------------------------------------------------------------------
_FLUX_LIKE = {
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": HEAD_DIM,
    "num_attention_heads": HEADS,
    "joint_attention_dim": TEXT_DIM,
}

FAMILY_CASES: dict[str, ModelCase] = {
    case.family: case
    for case in (
        ModelCase(
            "flux",
            _builder(
                FluxTransformer2DModel,
                in_channels=PACKED,
                pooled_projection_dim=TEXT_DIM,
                guidance_embeds=False,
                axes_dims_rope=ROPE_3D,
                **_FLUX_LIKE,
            ),
            _flux_inputs,
        ),
        ModelCase(
            "chroma",
            _builder(
                ChromaTransformer2DModel,
                in_channels=PACKED,
                axes_dims_rope=ROPE_3D,
                approximator_num_channels=16,
                approximator_hidden_dim=32,
                approximator_layers=1,
                **_FLUX_LIKE,
            ),
            _chroma_inputs,
        ),
        ModelCase(
            "flux2",
            _builder(
                Flux2Transformer2DModel,
                in_channels=PACKED,
                timestep_guidance_channels=16,
                axes_dims_rope=(2, 2, 2, 2),
                guidance_embeds=True,
                **_FLUX_LIKE,
            ),
            _flux2_inputs,
        ),
        ModelCase(
            "qwenimage",
            _builder(
                QwenImageTransformer2DModel,
                patch_size=2,
                in_channels=PACKED,
                out_channels=LATENT,
                num_layers=2,
                attention_head_dim=HEAD_DIM,
                num_attention_heads=HEADS,
                joint_attention_dim=TEXT_DIM,
                axes_dims_rope=ROPE_3D,
            ),
            _qwenimage_inputs,
        ),
        ModelCase(
            "wan",
            _builder(
                WanTransformer3DModel,
                patch_size=(1, 2, 2),
                num_attention_heads=HEADS,
                attention_head_dim=HEAD_DIM,
                in_channels=LATENT,
                out_channels=LATENT,
                text_dim=TEXT_DIM,
                freq_dim=16,
                ffn_dim=32,
                num_layers=2,
                rope_max_seq_len=32,
            ),
            _wan_inputs,
        ),
        ModelCase(
            "hunyuanvideo",
            _builder(
                HunyuanVideoTransformer3DModel,
                in_channels=LATENT,
                out_channels=LATENT,
                num_attention_heads=HEADS,
                attention_head_dim=HEAD_DIM,
                num_layers=2,
                num_single_layers=2,
                num_refiner_layers=1,
                patch_size=2,
                patch_size_t=1,
                guidance_embeds=True,
                text_embed_dim=TEXT_DIM,
                pooled_projection_dim=TEXT_DIM,
                rope_axes_dim=ROPE_3D,
            ),
            _hunyuanvideo_inputs,
        ),
        ModelCase(
            "hunyuanvideo15",
            _builder(
                HunyuanVideo15Transformer3DModel,
                in_channels=2 * LATENT + 1,
                out_channels=LATENT,
                num_attention_heads=HEADS,
                attention_head_dim=HEAD_DIM,
                num_layers=2,
                num_refiner_layers=1,
                patch_size=1,
                patch_size_t=1,
                text_embed_dim=TEXT_DIM,
                text_embed_2_dim=TEXT_DIM,
                image_embed_dim=TEXT_DIM,
                rope_axes_dim=ROPE_3D,
                task_type="t2v",
            ),
            _hunyuanvideo15_inputs,
        ),
        ModelCase(
            "sd3",
            _builder(
                SD3Transformer2DModel,
                sample_size=SIDE,
                patch_size=2,
                in_channels=LATENT,
                num_layers=2,
                attention_head_dim=HEAD_DIM,
                num_attention_heads=HEADS,
                joint_attention_dim=TEXT_DIM,
                caption_projection_dim=HIDDEN,
                pooled_projection_dim=TEXT_DIM,
                out_channels=LATENT,
                pos_embed_max_size=16,
            ),
            _sd3_inputs,
        ),
        ModelCase(
            "pixart",
            _builder(
                PixArtTransformer2DModel,
                num_attention_heads=HEADS,
                attention_head_dim=HEAD_DIM,
                in_channels=LATENT,
                out_channels=2 * LATENT,
                num_layers=2,
                cross_attention_dim=HIDDEN,
                caption_channels=TEXT_DIM,
                sample_size=SIDE,
                patch_size=2,
                norm_type="ada_norm_single",
                use_additional_conditions=False,
            ),
            _pixart_inputs,
        ),
        ModelCase(
            "dit",
            _builder(
                DiTTransformer2DModel,
                num_attention_heads=HEADS,
                attention_head_dim=HEAD_DIM,
                in_channels=LATENT,
                out_channels=2 * LATENT,
                num_layers=2,
                sample_size=SIDE,
                patch_size=2,
                num_embeds_ada_norm=DIT_CLASSES,
            ),
            _dit_inputs,
        ),
        ModelCase(
            "cogvideox",
            _builder(
                CogVideoXTransformer3DModel,
                num_attention_heads=HEADS,
                attention_head_dim=HEAD_DIM,
                in_channels=LATENT,
                out_channels=LATENT,
                time_embed_dim=HIDDEN,
                text_embed_dim=TEXT_DIM,
                num_layers=2,
                sample_width=SIDE,
                sample_height=SIDE,
                sample_frames=4 * (FRAMES - 1) + 1,
                patch_size=2,
                max_text_seq_length=TEXT,
            ),
            _cogvideox_inputs,
        ),
        ModelCase(
            "ltx",
            _builder(
                LTXVideoTransformer3DModel,
                in_channels=LTX_CHANNELS,
                out_channels=LTX_CHANNELS,
                num_attention_heads=HEADS,
                attention_head_dim=HEAD_DIM,
                cross_attention_dim=HIDDEN,
                num_layers=2,
                caption_channels=TEXT_DIM,
            ),
            _ltx_inputs,
        ),
        ModelCase(
            "sana",
            _builder(
                SanaTransformer2DModel,
                in_channels=LATENT,
                out_channels=LATENT,
                num_attention_heads=HEADS,
                attention_head_dim=HEAD_DIM,
                num_layers=2,
                num_cross_attention_heads=HEADS,
                cross_attention_head_dim=HEAD_DIM,
                cross_attention_dim=HIDDEN,
                caption_channels=TEXT_DIM,
                sample_size=SIDE,
                patch_size=1,
            ),
            _sana_inputs,
        ),
        ModelCase(
            "zimage",
            _builder(
                ZImageTransformer2DModel,
                in_channels=LATENT,
                dim=HIDDEN,
                n_layers=2,
                n_refiner_layers=1,
                n_heads=HEADS,
                n_kv_heads=HEADS,
                cap_feat_dim=TEXT_DIM,
                axes_dims=list(ROPE_3D),
                axes_lens=[64, 32, 32],
            ),
            _zimage_inputs,
        ),
        ModelCase(
            "hidream",
            _builder(
                HiDreamImageTransformer2DModel,
                patch_size=2,
                in_channels=LATENT,
                num_layers=2,
                num_single_layers=2,
                attention_head_dim=HEAD_DIM,
                num_attention_heads=HEADS,
                caption_channels=[TEXT_DIM, TEXT_DIM],
                text_emb_dim=TEXT_DIM,
                axes_dims_rope=(4, 2, 2),  # (t, h, w) as the stock (64, 32, 32)
                max_resolution=(SIDE, SIDE),
                llama_layers=[0, 1, 0, 1],
            ),
            _hidream_inputs,
        ),
        ModelCase(
            "cogview4",
            _builder(
                CogView4Transformer2DModel,
                patch_size=2,
                in_channels=LATENT,
                out_channels=LATENT,
                num_layers=2,
                attention_head_dim=HEAD_DIM,
                num_attention_heads=HEADS,
                text_embed_dim=TEXT_DIM,
                time_embed_dim=HIDDEN,
                condition_dim=8,
                pos_embed_max_size=16,
                sample_size=SIDE,
            ),
            _cogview4_inputs,
        ),
    )
}
