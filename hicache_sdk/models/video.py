"""A tiny class-conditional pixel-space Wan video DiT that draws 8-frame clips of moving digits.

The network is diffusers' stock :class:`WanTransformer3DModel` (4 blocks, hidden size 128,
patches of 1x2x2 pixels) trained with rectified flow on procedurally animated scikit-learn digits
(:mod:`.motion`: moving and bouncing, rotating, zooming). A clip is ``(1, 8, 16, 16)``
(channel, frames, height, width) and becomes 8 x 8 x 8 = 512 tokens of 4 pixels; the class label
becomes a few learned "text" tokens for the cross-attention. (scikit-learn's digits are 8x8: at
16x16 a digit keeps all its detail.) The frame classifier reads frames upscaled to 32x32
(:func:`classifier_frames`).

Flow convention as the digits model (:mod:`.digits`): ``x_s = (1 - s) * x0 + s * noise``, the
transformer predicts ``v = noise - x0`` and receives ``timestep = 1000 * s`` (as diffusers'
``WanPipeline`` passes the scheduler's timesteps). Pixels live in ``[-1, 1]`` inside the model;
:func:`sample_clips` returns clips in ``[0, 1]``, shape ``(n, 1, frames, size, size)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from os import PathLike
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidParameterError
from .digits import (
    DEFAULT_SHIFT,
    DEFAULT_STEPS,
    NUM_DIGITS,
    _check_model_placement,
    check_generation_args,
    check_output,
    default_weights_path,
    euler_cfg,
    read_weights,
    seeded_noise,
)
from .formats import VIDEO_DIT, read_tagged_config, save_tagged

__all__ = [
    "VIDEO_FORMAT",
    "VIDEO_GUIDANCE",
    "LabelTokens",
    "VideoConfig",
    "VideoModel",
    "build_video_model",
    "check_clip_shape",
    "classifier_frames",
    "clip_frames",
    "initial_clip_noise",
    "load_video_model",
    "predict_clip_velocity",
    "sample_clips",
    "save_video_model",
]

VIDEO_WEIGHTS = "weights/digits_wan_video.safetensors"
VIDEO_FORMAT = VIDEO_DIT
"""Metadata key of a video-DiT weights file (its value is the config JSON; the only entry)."""
VIDEO_GUIDANCE = 5.0
"""Classifier-free guidance scale of :func:`sample_clips` unless told otherwise (``WanPipeline``'s default)."""
TIMESTEP_SCALE = 1000.0
"""The transformer receives ``timestep = TIMESTEP_SCALE * s``."""


@dataclass(frozen=True)
class VideoConfig:
    """Shape of the video DiT, its clips and its label conditioner."""

    frames: int = 8
    frame_size: int = 16
    patch: tuple[int, int, int] = (1, 2, 2)
    heads: int = 4
    head_dim: int = 32
    num_layers: int = 4
    ffn_dim: int = 384
    text_dim: int = 64
    freq_dim: int = 64
    text_tokens: int = 4
    rope_max_seq_len: int = 32

    @property
    def clip_shape(self) -> tuple[int, int, int, int]:
        """``(channels, frames, height, width)`` of one clip."""
        return (1, self.frames, self.frame_size, self.frame_size)

    def transformer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`diffusers.WanTransformer3DModel`."""
        return {
            "patch_size": tuple(self.patch),
            "num_attention_heads": self.heads,
            "attention_head_dim": self.head_dim,
            "in_channels": 1,
            "out_channels": 1,
            "text_dim": self.text_dim,
            "freq_dim": self.freq_dim,
            "ffn_dim": self.ffn_dim,
            "num_layers": self.num_layers,
            "rope_max_seq_len": self.rope_max_seq_len,
        }

    def __post_init__(self) -> None:
        sizes = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "patch"}
        bad = [f"{k}={v!r}" for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        patch = self.patch
        if not (isinstance(patch, tuple) and len(patch) == 3 and all(type(p) is int and p >= 1 for p in patch)):
            bad.append(f"patch={patch!r}")
        if bad:
            raise ValueError(f"config values must be integers >= 1 (patch: three of them), got {', '.join(bad)}")
        if self.frames % patch[0] or self.frame_size % patch[1] or self.frame_size % patch[2]:
            raise ValueError(
                f"clips of {self.frames}x{self.frame_size}x{self.frame_size} do not split in {patch} patches"
            )
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head_dim must be even and >= 6 (Wan's 3-axis rotary embedding), got {self.head_dim}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VideoConfig:
        raw = json.loads(text)
        unknown = set(raw) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        if "patch" in raw:
            raw["patch"] = tuple(raw["patch"])
        return cls(**raw)


class LabelTokens(nn.Module):
    """Learned ``(text_tokens, text_dim)`` tokens per digit plus the null class (index 10)."""

    def __init__(self, text_tokens: int, text_dim: int) -> None:
        super().__init__()
        self.text_tokens, self.text_dim = text_tokens, text_dim
        self.tokens = nn.Embedding(NUM_DIGITS + 1, text_tokens * text_dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.tokens(labels).view(-1, self.text_tokens, self.text_dim)


class VideoModel(nn.Module):
    """Container of the Wan ``transformer``, the label ``conditioner`` and the ``config``."""

    def __init__(self, config: VideoConfig) -> None:
        from diffusers import WanTransformer3DModel

        super().__init__()
        self.config = config
        self.transformer = WanTransformer3DModel(**config.transformer_kwargs())
        self.conditioner = LabelTokens(config.text_tokens, config.text_dim)


def build_video_model(seed: int = 0, config: VideoConfig | None = None) -> VideoModel:
    """A video model with random weights drawn from ``seed`` (fp32, CPU)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VideoModel(config or VideoConfig())


def predict_clip_velocity(
    model: VideoModel, clips: torch.Tensor, labels: torch.Tensor, s: torch.Tensor
) -> torch.Tensor:
    """One call of ``model.transformer`` on clips ``(B, 1, F, H, W)`` at noise levels ``s`` (B,)."""
    dtype = clips.dtype
    return model.transformer(
        hidden_states=clips,
        timestep=(s * TIMESTEP_SCALE).to(dtype),
        encoder_hidden_states=model.conditioner(labels).to(dtype),
        return_dict=False,
    )[0]


def initial_clip_noise(seeds: Sequence[int], config: VideoConfig) -> torch.Tensor:
    """Per-sample starting noise ``(n, 1, F, H, W)`` in fp32 on CPU, sample i from ``seeds[i]``."""
    return seeded_noise(seeds, config.clip_shape)


def clip_frames(clips: torch.Tensor) -> torch.Tensor:
    """Clips ``(n, C, F, H, W)`` as their frames ``(n F, C, H, W)``, clip by clip."""
    n, c, f, h, w = clips.shape
    return clips.transpose(1, 2).reshape(n * f, c, h, w)


CLASSIFIER_SIZE = 32
"""Side of the frames the frame classifier reads (the digit classifier's network)."""


def classifier_frames(clips: torch.Tensor) -> torch.Tensor:
    """The frames of clips ``(n, 1, F, H, W)`` as the frame classifier reads them: ``(n F, 1, 32, 32)``.

    Frames are upscaled bilinearly to 32x32 (values keep their range).
    """
    frames = clip_frames(clips)
    if frames.shape[-1] == CLASSIFIER_SIZE and frames.shape[-2] == CLASSIFIER_SIZE:
        return frames
    return F.interpolate(frames, size=(CLASSIFIER_SIZE, CLASSIFIER_SIZE), mode="bilinear", align_corners=False)


def check_clip_shape(config: VideoConfig, frames: int | None, size: int | None) -> None:
    """Refuse a clip shape other than the model's (``None``: the model's) with :class:`InvalidParameterError`."""
    asked = (config.frames if frames is None else frames, config.frame_size if size is None else size)
    if asked != (config.frames, config.frame_size):
        raise InvalidParameterError(
            f"this video model was trained on {config.frames}-frame clips of {config.frame_size}x{config.frame_size} "
            f"pixels and draws nothing else; got {asked[0]} frames of {asked[1]}x{asked[1]}"
        )


def sample_clips(
    model: VideoModel,
    digits: Sequence[int],
    seeds: Sequence[int],
    *,
    steps: int = DEFAULT_STEPS,
    guidance: float = VIDEO_GUIDANCE,
    shift: float = DEFAULT_SHIFT,
    frames: int | None = None,
    size: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> torch.Tensor:
    """Draw one clip per ``(digit, seed)`` pair with Euler steps of the flow ODE.

    The sampler of :func:`hicache_sdk.models.sample` for clips: classifier-free guidance in ONE
    ``model.transformer`` call per step (batch ``2 * n``), the ODE state in fp32, the transformer in
    ``dtype`` (on which the model must already be), an attached accelerator told of each
    generation. Returns ``(n, 1, frames, size, size)`` clips in ``[0, 1]`` (fp32, on ``device``).
    ``frames`` and ``size`` default to the model's (8 and 16 for the shipped one): any other value raises
    :class:`~hicache_sdk.errors.InvalidParameterError`, since the model was trained on one clip shape.
    Non-finite or saturated output raises :class:`~hicache_sdk.models.SaturatedOutputError`.
    """
    if not isinstance(model, VideoModel):
        raise InvalidParameterError(f"model must be a VideoModel, got {type(model).__name__}")
    check_generation_args(digits, seeds, steps, guidance, shift)
    check_clip_shape(model.config, frames, size)
    device = torch.device(device)
    _check_model_placement(model.transformer, device, dtype)
    x = euler_cfg(
        lambda inputs, labels, s: predict_clip_velocity(model, inputs, labels, s),
        model.transformer,
        initial_clip_noise(seeds, model.config).to(device),
        digits,
        steps=steps,
        guidance=guidance,
        shift=shift,
        dtype=dtype,
        progress=progress,
    )
    clips = (x + 1.0) / 2.0
    check_output(clips, digits, seeds)
    return clips.clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- weights I/O


def save_video_model(model: VideoModel, path: str | PathLike[str]) -> None:
    """Write the model's weights (fp32) and config to a safetensors file."""
    save_tagged(model, path, VIDEO_FORMAT, model.config.to_json())


def load_video_model(
    path: str | PathLike[str] | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> VideoModel:
    """Load the video DiT (shipped weights unless ``path`` is given), in eval mode, no grads.

    Raises :class:`~hicache_sdk.models.WeightsError` for a missing, unreadable or corrupt file, and
    for a weights file of another model (e.g. the digits DiT), naming what the file holds.
    """
    file = Path(path) if path is not None else default_weights_path(VIDEO_WEIGHTS)
    config = read_tagged_config(file, VIDEO_FORMAT, "video-DiT", VideoConfig.from_json)
    model = VideoModel(config)
    tensors, _ = read_weights(file, {k: v.shape for k, v in model.state_dict().items()})
    model.load_state_dict(tensors, strict=True)
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model
