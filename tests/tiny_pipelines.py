"""Tiny hub-free diffusers pipelines of the variants users run: img2img, inpainting, editing, Wan 2.2.

Every factory is seeded and builds its models from configs with random weights (no download). No
pipeline has a text encoder: call them with prompt embeddings. A pipeline that must encode an input
image has a tiny VAE (which :func:`flux_edit_call` can also decode with ``output_type="np"``); the
others have none and are called with ``output_type="latent"``.

Flux image pipelines take ``SIZE x SIZE`` pixels: their tiny VAE halves the side and the pipeline
packs 2 x 2 latent pixels into one token, so an image is ``(SIZE / 4)^2`` = 64 tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImageEditPipeline,
    UniPCMultistepScheduler,
    WanPipeline,
)
from helpers import FLUX_IN_CHANNELS, flux_prompt, tiny_flux, tiny_wan
from PIL import Image

from hicache_sdk.testing.families import FAMILY_CASES, TEXT_DIM

__all__ = [
    "SIZE",
    "WAN_FRAMES",
    "WAN_SIZE",
    "flux_edit_call",
    "flux_guidance_pipeline",
    "flux_img2img_pipeline",
    "flux_inpaint_pipeline",
    "flux_kontext_pipeline",
    "guidance_call",
    "input_image",
    "input_mask",
    "qwenimage_edit_call",
    "qwenimage_edit_pipeline",
    "tiny_flux_vae",
    "tiny_guidance_flux",
    "wan22_call",
    "wan22_pipeline",
    "wan_prompt",
]

SIZE = 32  # pixels per side of the Flux image pipelines' images (8 x 8 = 64 tokens)
WAN_SIZE = 64  # pixels per side of a Wan video: 8 x 8 latent pixels, 4 x 4 tokens per latent frame
WAN_FRAMES = 5  # 2 latent frames (the default temporal factor 4 without a VAE): 32 tokens


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def input_image(size: int = SIZE, seed: int = 0) -> Image.Image:
    """A seeded RGB noise image of ``size x size`` pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def input_mask(size: int = SIZE) -> Image.Image:
    """An inpainting mask: white (repaint) in the central half of the image, black (keep) around it."""
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return Image.fromarray(mask, mode="L")


# -- Flux --------------------------------------------------------------------------------------
def tiny_flux_vae(seed: int = 0) -> AutoencoderKL:
    """A 2-level AutoencoderKL with 4 latent channels (scale factor 2), as Flux pipelines pack them."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 16],
        latent_channels=FLUX_IN_CHANNELS // 4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=SIZE,
        scaling_factor=1.0,
        shift_factor=0.0,
    )
    return vae.eval()


def tiny_guidance_flux(seed: int = 0) -> FluxTransformer2DModel:
    """A guidance-distilled FluxTransformer2DModel (``guidance_embeds=True``, as FLUX.1-dev)."""
    return tiny_flux(seed, guidance_embeds=True)


def _flux_image_pipeline(cls: type[Any], seed: int) -> Any:
    pipe = cls(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_flux_vae(seed),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=tiny_flux(seed),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_img2img_pipeline(seed: int = 0) -> FluxImg2ImgPipeline:
    """A FluxImg2ImgPipeline with a tiny VAE (to encode the input image) and no text encoders."""
    pipe: FluxImg2ImgPipeline = _flux_image_pipeline(FluxImg2ImgPipeline, seed)
    return pipe


def flux_inpaint_pipeline(seed: int = 0) -> FluxInpaintPipeline:
    """A FluxInpaintPipeline with a tiny VAE (to encode the image and the masked image), no text encoders."""
    pipe: FluxInpaintPipeline = _flux_image_pipeline(FluxInpaintPipeline, seed)
    return pipe


def flux_kontext_pipeline(seed: int = 0) -> FluxKontextPipeline:
    """A FluxKontextPipeline: the reference image's tokens are concatenated to the latents' at every step."""
    pipe: FluxKontextPipeline = _flux_image_pipeline(FluxKontextPipeline, seed)
    return pipe


def flux_guidance_pipeline(seed: int = 0) -> FluxPipeline:
    """A FluxPipeline around :func:`tiny_guidance_flux`, without text encoders or VAE."""
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=tiny_guidance_flux(seed),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_edit_call(
    pipe: Any, *, steps: int, seed: int = 0, output_type: str = "latent", **kwargs: Any
) -> torch.Tensor | np.ndarray:
    """One seeded call of a Flux image pipeline on :func:`input_image`, without CFG unless ``kwargs`` ask.

    ``kwargs`` adds the variant's own arguments (``strength``, ``mask_image``, ``_auto_resize``...).
    Returns packed latents ``(1, 64, 16)``, or the decoded images with ``output_type="np"``.
    """
    result = pipe(
        **flux_prompt(seed=seed),
        image=input_image(seed=seed),
        height=SIZE,
        width=SIZE,
        num_inference_steps=steps,
        output_type=output_type,
        generator=_seeded(seed),
        **kwargs,
    )
    return result.images


def guidance_call(pipe: FluxPipeline, *, steps: int, guidance_scale: float = 3.5, seed: int = 0) -> torch.Tensor:
    """Packed latents ``(1, 16, 16)`` of a seeded 64 x 64 text-to-image call: embedded guidance, no negative prompt."""
    result = pipe(
        **flux_prompt(seed=seed),
        guidance_scale=guidance_scale,
        height=64,
        width=64,
        num_inference_steps=steps,
        output_type="latent",
        generator=_seeded(seed),
    )
    return result.images


# -- Qwen-Image-Edit -----------------------------------------------------------------------------
def qwenimage_edit_pipeline(seed: int = 0) -> QwenImageEditPipeline:
    """A QwenImageEditPipeline without the Qwen2.5-VL text encoder, tokenizer or processor.

    The pipeline resizes every reference image to about 1024 x 1024 pixels before encoding it (a
    tensor of latents cannot be passed: the pipeline reads the image's ``.size`` as PIL's), so its
    tiny VAE (4 latent channels, 4 spatial halvings: scale factor 16, 2 channels, no residual blocks
    per level) keeps that cheap: about a second on one CPU thread, for 32 x 32 = 1024 reference
    tokens. The transformer is the tiny Qwen-Image of :data:`FAMILY_CASES`.
    """
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=2,
        z_dim=4,
        dim_mult=[1, 1, 1, 1, 1],
        num_res_blocks=0,
        temperal_downsample=[False] * 4,
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    pipe = QwenImageEditPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae.eval(),
        text_encoder=None,
        tokenizer=None,
        processor=None,
        transformer=FAMILY_CASES["qwenimage"].build(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def qwenimage_edit_call(pipe: QwenImageEditPipeline, *, steps: int, seed: int = 0) -> torch.Tensor:
    """Packed latents of a seeded edit of a 64 x 64 :func:`input_image` into 64 x 64 pixels (4 tokens)."""
    g = _seeded(seed)
    result = pipe(
        image=input_image(64, seed),
        prompt_embeds=torch.randn(1, 6, TEXT_DIM, generator=g),
        prompt_embeds_mask=torch.ones(1, 6, dtype=torch.long),
        height=64,
        width=64,
        num_inference_steps=steps,
        true_cfg_scale=1.0,
        output_type="latent",
        generator=g,
    )
    return result.images


# -- Wan 2.2 -------------------------------------------------------------------------------------
def wan22_pipeline(seed: int = 0, *, boundary_ratio: float = 0.85) -> WanPipeline:
    """A Wan 2.2 WanPipeline: a high-noise ``transformer`` and a low-noise ``transformer_2``.

    The two experts are tiny Wan models with different seeds; ``transformer`` serves the steps
    whose timestep is at least ``boundary_ratio * 1000``. No VAE and no text encoder: call it with
    prompt embeddings and ``output_type="latent"``. The scheduler is Wan 2.2's (UniPC, flow shift 3):
    with 12 steps its timesteps are 999, 970, 937, 900, 857, 807, 750, ..., so the default ratio
    0.85 gives steps 0-4 to ``transformer`` and steps 5-11 to ``transformer_2``.
    """
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        transformer=tiny_wan(seed),
        transformer_2=tiny_wan(seed + 1),
        boundary_ratio=boundary_ratio,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_prompt(*, seed: int = 0, negative: bool = False) -> dict[str, torch.Tensor]:
    """``prompt_embeds`` (or ``negative_prompt_embeds``) of 6 tokens for :func:`wan22_pipeline`."""
    prefix = "negative_" if negative else ""
    return {f"{prefix}prompt_embeds": torch.randn(1, 6, 16, generator=_seeded(seed))}


def wan22_call(pipe: WanPipeline, *, steps: int, cfg: bool = True, seed: int = 0) -> torch.Tensor:
    """Latents ``(1, 4, 2, 8, 8)`` of a seeded call; with ``cfg``, guidance 4 / 3 with negative embeddings."""
    extra: dict[str, Any] = {}
    if cfg:
        extra = {**wan_prompt(seed=seed + 1, negative=True), "guidance_scale": 4.0, "guidance_scale_2": 3.0}
    else:
        extra = {"guidance_scale": 1.0, "guidance_scale_2": 1.0}
    result = pipe(
        **wan_prompt(seed=seed),
        **extra,
        height=WAN_SIZE,
        width=WAN_SIZE,
        num_frames=WAN_FRAMES,
        num_inference_steps=steps,
        output_type="latent",
        generator=_seeded(seed),
    )
    return result.frames
