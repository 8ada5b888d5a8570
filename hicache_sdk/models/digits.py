"""A tiny class-conditional pixel-space Flux DiT that draws 32x32 digits.

The network is diffusers' stock :class:`FluxTransformer2DModel` (2 double-stream and
2 single-stream blocks, hidden size 128) trained with rectified flow on the upscaled
scikit-learn digits. A 1x32x32 image is packed in 2x2 patches into 256 tokens of 4
channels; the class label becomes a few learned "text" tokens plus a pooled vector.

Flow convention: ``x_s = (1 - s) * x0 + s * noise`` with ``s`` in ``[0, 1]``; the
transformer predicts ``v = noise - x0`` and receives ``timestep = s`` (as diffusers'
``FluxPipeline`` passes ``t / 1000``). Pixels live in ``[-1, 1]`` inside the model;
:func:`sample` returns images in ``[0, 1]``.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from importlib import resources
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..accelerator import handle_of
from ..errors import HicacheError, InvalidParameterError
from .formats import DIGITS_DIT, WeightsError, read_tagged_config, save_tagged, weights_format

__all__ = [
    "DEFAULT_GUIDANCE",
    "DEFAULT_SHIFT",
    "DEFAULT_STEPS",
    "NULL_CLASS",
    "DigitConditioner",
    "DigitsConfig",
    "DigitsModel",
    "SaturatedOutputError",
    "WeightsError",
    "build_digits_model",
    "check_generation_args",
    "check_output",
    "default_weights_path",
    "euler_cfg",
    "image_ids",
    "initial_noise",
    "load_digits_model",
    "pack_images",
    "predict_velocity",
    "read_weights",
    "sample",
    "save_digits_model",
    "seeded_noise",
    "sigma_schedule",
    "text_ids",
    "unpack_tokens",
    "weights_format",
]

NUM_DIGITS = 10
NULL_CLASS = 10
"""Label of the empty (unconditional) class used for classifier-free guidance."""
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 3.0
"""Classifier-free guidance scale used by :func:`sample` unless told otherwise."""
DEFAULT_SHIFT = 1.0
"""Flux time shift of the sampling sigmas; 1.0 keeps them linear."""
WEIGHTS_PACKAGE = "hicache_sdk.models"
DIT_WEIGHTS = "weights/digits_flux.safetensors"
_FORMAT = DIGITS_DIT
# The file's only metadata entry is {_FORMAT: config JSON}: safetensors writes metadata in
# hash order, so a single entry keeps the bytes of a re-trained file identical.


class SaturatedOutputError(HicacheError, RuntimeError):
    """The sampler's images are non-finite or saturated: the model (weights, or a cache on it) draws no digits."""


SATURATION_MARGIN = 0.5
"""A pixel is saturated when, before the clamp to ``[0, 1]``, it lies more than this beyond the range."""
SATURATED_SHARE = 0.9
""":func:`sample` refuses a batch in which any image has more than this share of saturated pixels."""


@dataclass(frozen=True)
class DigitsConfig:
    """Shape of the digits DiT and its conditioner."""

    image_size: int = 32
    patch: int = 2
    hidden_heads: int = 4
    head_dim: int = 32
    num_layers: int = 2
    num_single_layers: int = 2
    joint_attention_dim: int = 64
    pooled_projection_dim: int = 64
    text_tokens: int = 4
    axes_dims_rope: tuple[int, int, int] = (8, 12, 12)

    @property
    def tokens_per_side(self) -> int:
        return self.image_size // self.patch

    @property
    def token_channels(self) -> int:
        return self.patch * self.patch

    def transformer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`diffusers.FluxTransformer2DModel`."""
        return {
            "patch_size": 1,
            "in_channels": self.token_channels,
            "out_channels": self.token_channels,
            "num_layers": self.num_layers,
            "num_single_layers": self.num_single_layers,
            "attention_head_dim": self.head_dim,
            "num_attention_heads": self.hidden_heads,
            "joint_attention_dim": self.joint_attention_dim,
            "pooled_projection_dim": self.pooled_projection_dim,
            "guidance_embeds": False,
            "axes_dims_rope": tuple(self.axes_dims_rope),
        }

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DigitsConfig:
        raw = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        if "axes_dims_rope" in raw:
            raw["axes_dims_rope"] = tuple(raw["axes_dims_rope"])
        return cls(**raw)


class DigitConditioner(nn.Module):
    """Learned embeddings of the 10 digits plus the null class (index 10).

    Gives Flux's ``encoder_hidden_states`` ``(B, text_tokens, joint_attention_dim)`` and
    ``pooled_projections`` ``(B, pooled_projection_dim)``.
    """

    def __init__(self, text_tokens: int, joint_attention_dim: int, pooled_projection_dim: int) -> None:
        super().__init__()
        self.text_tokens = text_tokens
        self.joint_attention_dim = joint_attention_dim
        self.tokens = nn.Embedding(NUM_DIGITS + 1, text_tokens * joint_attention_dim)
        self.pooled = nn.Embedding(NUM_DIGITS + 1, pooled_projection_dim)

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokens(labels).view(-1, self.text_tokens, self.joint_attention_dim)
        return tokens, self.pooled(labels)


class DigitsModel(nn.Module):
    """Container of the Flux ``transformer``, the label ``conditioner`` and the ``config``."""

    def __init__(self, config: DigitsConfig) -> None:
        from diffusers import FluxTransformer2DModel

        super().__init__()
        self.config = config
        self.transformer = FluxTransformer2DModel(**config.transformer_kwargs())
        self.conditioner = DigitConditioner(
            config.text_tokens, config.joint_attention_dim, config.pooled_projection_dim
        )


def build_digits_model(seed: int = 0, config: DigitsConfig | None = None) -> DigitsModel:
    """A digits model with random weights drawn from ``seed`` (fp32, CPU)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DigitsModel(config or DigitsConfig())


# ----------------------------------------------------------------------------- tokens


def pack_images(images: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """``(B, 1, H, W)`` images to ``(B, (H/p)*(W/p), p*p)`` tokens, Flux's 2x2 packing."""
    b, c, h, w = images.shape
    x = images.view(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack_tokens(tokens: torch.Tensor, size: int = 32, patch: int = 2) -> torch.Tensor:
    """Inverse of :func:`pack_images`: ``(B, N, p*p)`` tokens to ``(B, 1, size, size)``."""
    b, _, ch = tokens.shape
    c, side = ch // (patch * patch), size // patch
    x = tokens.view(b, side, side, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, size, size)


def image_ids(
    config: DigitsConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Flux image position ids ``(N, 3)``: ``(0, row, col)`` per token."""
    side = config.tokens_per_side
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


def text_ids(
    config: DigitsConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Flux text position ids ``(text_tokens, 3)``: all zeros."""
    return torch.zeros(config.text_tokens, 3, device=device, dtype=dtype)


def predict_velocity(model: DigitsModel, tokens: torch.Tensor, labels: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """One call of ``model.transformer`` on packed ``tokens`` at noise levels ``s`` (B,)."""
    encoder_hidden_states, pooled = model.conditioner(labels)
    dtype = tokens.dtype
    return model.transformer(
        hidden_states=tokens,
        encoder_hidden_states=encoder_hidden_states.to(dtype),
        pooled_projections=pooled.to(dtype),
        timestep=s.to(dtype),
        img_ids=image_ids(model.config, tokens.device, dtype),
        txt_ids=text_ids(model.config, tokens.device, dtype),
        return_dict=False,
    )[0]


# ----------------------------------------------------------------------------- sampling


def sigma_schedule(steps: int, shift: float = DEFAULT_SHIFT) -> torch.Tensor:
    """``steps + 1`` noise levels from 1 to 0, linear, then Flux-time-shifted by ``shift``."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if shift != 1.0:
        sigmas = shift * sigmas / (1.0 + (shift - 1.0) * sigmas)
    return sigmas


def _is_int_in(value: object, low: int, high: int) -> bool:
    """Whether ``value`` is an integer (not a bool) with ``low <= value < high``."""
    if isinstance(value, bool):
        return False
    try:
        return low <= operator.index(value) < high  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        return False


def _check_sample_args(
    model: DigitsModel, digits: Sequence[int], seeds: Sequence[int], steps: int, guidance: float, shift: float
) -> None:
    if not isinstance(model, DigitsModel):
        raise InvalidParameterError(f"model must be a DigitsModel, got {type(model).__name__}")
    check_generation_args(digits, seeds, steps, guidance, shift)


def check_generation_args(
    digits: Sequence[int], seeds: Sequence[int], steps: int, guidance: float, shift: float
) -> None:
    """Refuse sampler arguments that cannot run (:class:`InvalidParameterError`); shared by the embedded models."""
    if not _is_int_in(steps, 1, 2**31):
        raise InvalidParameterError(f"steps must be an integer >= 1, got {steps!r}")
    if len(digits) == 0:
        raise InvalidParameterError("digits must not be empty")
    if len(digits) != len(seeds):
        raise InvalidParameterError(f"digits and seeds must have the same length, got {len(digits)} and {len(seeds)}")
    bad = [d for d in digits if not _is_int_in(d, 0, NUM_DIGITS)]
    if bad:
        raise InvalidParameterError(f"digits must be integers in 0..9, got {bad[:5]}")
    bad_seeds = [s for s in seeds if not _is_int_in(s, 0, 2**63)]
    if bad_seeds:
        raise InvalidParameterError(f"seeds must be integers in [0, 2**63), got {bad_seeds[:5]}")
    if not math.isfinite(guidance):
        raise InvalidParameterError(f"guidance must be a finite number, got {guidance!r}")
    if not (math.isfinite(shift) and shift > 0):
        raise InvalidParameterError(f"shift must be a finite number > 0, got {shift!r}")


def _check_model_placement(transformer: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    param = next(transformer.parameters())
    same_device = param.device.type == device.type and (device.index is None or param.device.index == device.index)
    if not same_device or param.dtype != dtype:
        raise InvalidParameterError(
            f"model is on {param.device} / {param.dtype} but sampling was asked on {device} / {dtype}; "
            "load it with device=... and dtype=... (load_digits_model, load_video_model) or move it with model.to(...)"
        )


def initial_noise(seeds: Sequence[int], config: DigitsConfig) -> torch.Tensor:
    """Per-sample starting noise ``(n, 1, H, W)`` in fp32 on CPU, sample i from ``seeds[i]``."""
    return seeded_noise(seeds, (1, config.image_size, config.image_size))


def seeded_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise ``(n, *shape)`` in fp32 on CPU, sample i drawn from ``seeds[i]`` alone."""
    size = (1, *shape)
    return torch.cat([torch.randn(size, generator=torch.Generator().manual_seed(operator.index(s))) for s in seeds])


def sample(
    model: DigitsModel,
    digits: Sequence[int],
    seeds: Sequence[int],
    *,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    shift: float = DEFAULT_SHIFT,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> torch.Tensor:
    """Draw one image per ``(digit, seed)`` pair with Euler steps of the flow ODE.

    Goes from ``s = 1`` (noise) to ``s = 0`` over ``steps`` steps with classifier-free
    guidance; each step is ONE ``model.transformer`` call on the batch of conditional
    and null-class inputs (batch ``2 * n``). Returns ``(n, 1, 32, 32)`` images in ``[0, 1]``
    (fp32, on ``device``). The ODE state stays fp32; the transformer runs in ``dtype``,
    on which the model must already be. Sample i depends only on ``digits[i]`` and ``seeds[i]``.
    With an accelerator attached to ``model.transformer``, each call is one generation of
    ``steps`` steps (announced to it, so policies with an always-full ``tail`` work).

    The output is checked before the clamp: a model that draws no digits (e.g. weights scaled far
    up, finite and so accepted by :func:`load_digits_model`) gives huge or non-finite values that
    the clamp would turn into a silent all-black or all-white image. :class:`SaturatedOutputError`
    is raised instead when any pixel is non-finite, or when any image has more than
    :data:`SATURATED_SHARE` (90%) of its pixels more than :data:`SATURATION_MARGIN` (0.5) outside
    ``[0, 1]``. The shipped model stays far inside: its 50-step samples lie within about
    ``[-0.06, 1.2]``, and even a single Euler step puts only about 4% of the pixels that far out.
    """
    _check_sample_args(model, digits, seeds, steps, guidance, shift)
    device = torch.device(device)
    _check_model_placement(model.transformer, device, dtype)
    config = model.config
    x = pack_images(initial_noise(seeds, config), config.patch).to(device)  # the state stays fp32
    x = euler_cfg(
        lambda inputs, labels, s: predict_velocity(model, inputs, labels, s),
        model.transformer,
        x,
        digits,
        steps=steps,
        guidance=guidance,
        shift=shift,
        dtype=dtype,
        progress=progress,
    )
    images = (unpack_tokens(x, config.image_size, config.patch) + 1.0) / 2.0
    check_output(images, digits, seeds)
    return images.clamp(0.0, 1.0)


def euler_cfg(
    velocity: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    transformer: nn.Module,
    x: torch.Tensor,
    digits: Sequence[int],
    *,
    steps: int,
    guidance: float,
    shift: float,
    dtype: torch.dtype,
    progress: bool = False,
) -> torch.Tensor:
    """Integrate the flow ODE from ``s = 1`` to ``s = 0`` with classifier-free guidance; returns the final state.

    ``x`` is the fp32 starting noise (batch ``n``, on the sampling device); each step makes ONE call
    ``velocity(inputs, labels, s)`` on the conditional and null-class batch (``2 * n``, inputs in
    ``dtype``). An accelerator attached to ``transformer`` is told that a generation of ``steps``
    steps starts. Shared by the embedded models' samplers.
    """
    n, device = len(digits), x.device
    cond = torch.tensor([operator.index(d) for d in digits], dtype=torch.long, device=device)
    labels = torch.cat([cond, torch.full_like(cond, NULL_CLASS)])
    sigmas = sigma_schedule(steps, shift).tolist()
    iterator: Iterable[int] = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="sampling", unit="step")
    handle = handle_of(transformer)
    if handle is not None:  # a new generation of `steps` steps (for an always-full tail)
        handle.reset(num_steps=steps)
    with torch.no_grad():
        for i in iterator:
            s_now, s_next = sigmas[i], sigmas[i + 1]
            s = torch.full((2 * n,), s_now, device=device, dtype=dtype)
            v_cond, v_null = velocity(torch.cat([x, x]).to(dtype), labels, s).float().chunk(2)
            v = v_null + guidance * (v_cond - v_null)
            x = x + (s_next - s_now) * v
    return x


def check_output(images: torch.Tensor, digits: Sequence[int], seeds: Sequence[int]) -> None:
    """Raise :class:`SaturatedOutputError` for non-finite or saturated samples (see :func:`sample`)."""
    flat = images.flatten(1)
    digits, seeds = [operator.index(d) for d in digits], [operator.index(s) for s in seeds]
    finite = torch.isfinite(flat).all(dim=1)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0])
        raise SaturatedOutputError(
            f"the model's output is not finite in {int((~finite).sum())} of {len(flat)} samples (first: sample "
            f"{i}, digit {digits[i]}, seed {seeds[i]}): its weights (or a cache attached to it) do not produce images"
        )
    beyond = ((flat < -SATURATION_MARGIN) | (flat > 1.0 + SATURATION_MARGIN)).double().mean(dim=1)
    i = int(beyond.argmax())
    if float(beyond[i]) > SATURATED_SHARE:
        raise SaturatedOutputError(
            f"the model's output is saturated: {float(beyond[i]):.0%} of the pixels of sample {i} (digit "
            f"{digits[i]}, seed {seeds[i]}) lie more than {SATURATION_MARGIN} outside [0, 1] before clamping "
            f"(at most {SATURATED_SHARE:.0%} accepted), so the image would be clipped flat: its weights (or a "
            "cache attached to it) do not produce images"
        )


# ----------------------------------------------------------------------------- weights I/O


def default_weights_path(name: str) -> Path:
    """Path of a weights file shipped inside the package (``name`` relative to ``hicache_sdk/models``)."""
    return Path(str(resources.files(WEIGHTS_PACKAGE).joinpath(name)))


def read_weights(path: Path, expected: Mapping[str, torch.Size]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file and check it holds exactly ``expected`` names and shapes.

    Returns ``(tensors, metadata)``; raises :class:`WeightsError` naming the file otherwise.
    """
    from safetensors import safe_open

    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several error types for bad files
        raise WeightsError(f"weights file {path} is unreadable: {exc}") from exc
    _check_tensors(path, tensors, expected)
    return tensors, metadata


def _check_tensors(path: Path, tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size]) -> None:
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise WeightsError(
            f"weights file {path} does not match the model: {len(missing)} missing tensors {missing[:3]}, "
            f"{len(extra)} unexpected tensors {extra[:3]}"
        )
    wrong = [f"{k}: {tuple(t.shape)} != {tuple(expected[k])}" for k, t in tensors.items() if t.shape != expected[k]]
    if wrong:
        raise WeightsError(f"weights file {path} has tensors of the wrong shape: {wrong[:3]}")
    bad = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise WeightsError(f"weights file {path} has non-finite values in {bad[:3]}")


def save_digits_model(model: DigitsModel, path: str | PathLike[str]) -> None:
    """Write the model's weights (fp32) and config to a safetensors file."""
    save_tagged(model, path, _FORMAT, model.config.to_json())


def load_digits_model(
    path: str | PathLike[str] | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DigitsModel:
    """Load the digits DiT (shipped weights unless ``path`` is given), in eval mode, no grads."""
    file = Path(path) if path is not None else default_weights_path(DIT_WEIGHTS)
    config = _read_config(file)
    model = DigitsModel(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tensors, _ = read_weights(file, expected)
    model.load_state_dict(tensors, strict=True)
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model


def _read_config(file: Path) -> DigitsConfig:
    return read_tagged_config(file, _FORMAT, "digits-DiT", DigitsConfig.from_json)
