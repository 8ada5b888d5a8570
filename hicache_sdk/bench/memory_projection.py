"""Projected forecast-state bytes of real models: computed from their unit maps, not measured.

For each model at its usual resolution, each storage format of the ladders and each unit granularity,
this computes the bytes of forecast state ("cache bytes") the SDK would hold once every ladder is
full: ``max_order + 1`` terms (3 at the papers' setting ``max_order=2``) per output stream of every
unit, times the number of denoising contexts (classifier-free guidance run as two calls holds two
sets of ladders).

The unit map and the shape of every stream are the SDK's own: the model is built with diffusers
from its published config on the ``meta`` device (no weights, no memory), the accelerator is
applied with the requested ``units``, and ONE forward runs on meta inputs of the pipeline's shapes
at batch 1. That first step computes every unit in full (nothing is forecast), so each
:class:`~hicache_sdk.state.UnitState` records its ``layout``; bytes then come from
:meth:`LadderFormat.nbytes <hicache_sdk.storage.LadderFormat.nbytes>` (fp8 formats include their
float32 per-row or per-tensor scales). Nothing is allocated and no kernel runs, so this is a
projection: the real peak also holds what a policy keeps besides its ladders (none for TaylorSeer)
and the allocator's rounding.

The one tensor that is not on meta is the timestep: the SDK reads its value at every step (to track
the noise level), which a meta tensor cannot give. It is passed as a one-element CPU tensor and
moved to meta where the model's submodules receive it.

Run ``python -m hicache_sdk.bench.memory_projection`` (``--models``, ``--max-order``).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import attrs
import torch

from ..accelerator import compose
from ..granularity import GRANULARITIES
from ..storage import parse_ladder_format

__all__ = [
    "DEFAULT_FORMATS",
    "FLUX_DEV_CONFIG",
    "HUNYUAN_VIDEO_CONFIG",
    "MODELS",
    "WAN_T2V_14B_CONFIG",
    "ModelSpec",
    "ProjectionRow",
    "UnitLayouts",
    "build_model",
    "flux_spec",
    "hunyuan_video_spec",
    "main",
    "projection",
    "projection_markdown",
    "unit_layouts",
    "wan_spec",
]

#: The storage formats projected by default (``"bf16+fp8"``: ``D^0`` in bf16, higher orders in fp8 e4m3).
DEFAULT_FORMATS: tuple[str, ...] = ("fp32", "bf16", "bf16+fp8", "fp8")
_GIB = float(1 << 30)
_VAE_SPATIAL = 8  # the three models' VAEs downsample 8x in space
_VAE_TEMPORAL = 4  # and the video VAEs 4x in time (plus the first frame)

#: black-forest-labs/FLUX.1-dev, ``transformer/config.json`` (``FluxTransformer2DModel``).
FLUX_DEV_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}

#: Wan-AI/Wan2.1-T2V-14B-Diffusers, ``transformer/config.json`` (``WanTransformer3DModel``).
WAN_T2V_14B_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}

#: hunyuanvideo-community/HunyuanVideo, ``transformer/config.json`` (``HunyuanVideoTransformer3DModel``).
HUNYUAN_VIDEO_CONFIG: dict[str, Any] = {
    "in_channels": 16,
    "out_channels": 16,
    "num_attention_heads": 24,
    "attention_head_dim": 128,
    "num_layers": 20,
    "num_single_layers": 40,
    "num_refiner_layers": 2,
    "mlp_ratio": 4.0,
    "patch_size": 2,
    "patch_size_t": 1,
    "qk_norm": "rms_norm",
    "guidance_embeds": True,
    "text_embed_dim": 4096,
    "pooled_projection_dim": 768,
    "rope_theta": 256.0,
    "rope_axes_dim": (16, 56, 56),
}

#: ``inputs(dtype)``: the forward's keyword arguments, on meta except the timestep (a CPU tensor).
Inputs = Callable[[torch.dtype], dict[str, Any]]
#: Per unit key, the shape of each of its output streams.
UnitLayouts = dict[str, tuple[tuple[int, ...], ...]]


@attrs.frozen
class ModelSpec:
    """A model to project: its diffusers class and config, and the inputs of one step at its resolution.

    Attributes:
        name: shown in the table (``"FLUX.1-dev"``).
        model_class: the diffusers transformer class, by name (``"FluxTransformer2DModel"``).
        config: the keyword arguments of that class (its published ``config.json``).
        resolution: shown in the table (``"1024x1024"``).
        tokens: what the step sees, shown in the table (``"4096 image + 512 text tokens"``).
        inputs: the forward's keyword arguments at batch 1 for ``dtype``.
        contexts: denoising contexts a generation holds ladders for (2 with classifier-free guidance
            run as two calls, 1 for a guidance-distilled model).
        contexts_note: why that many contexts.
    """

    name: str
    model_class: str
    config: Mapping[str, Any]
    resolution: str
    tokens: str
    inputs: Inputs
    contexts: int = 1
    contexts_note: str = ""


@attrs.frozen
class ProjectionRow:
    """Projected forecast-state bytes of one model, granularity and storage format.

    ``bytes`` counts every context (``bytes == contexts * bytes_per_context``); ``num_units`` and
    ``num_streams`` are per context (a stream is one cached output: one ladder).
    """

    model: str
    resolution: str
    units: str
    format: str
    bytes: int
    num_units: int
    num_streams: int
    contexts: int
    max_order: int
    tokens: str = ""
    contexts_note: str = ""

    @property
    def bytes_per_context(self) -> int:
        """Bytes of one context's ladders."""
        return self.bytes // self.contexts

    @property
    def gib(self) -> float:
        """``bytes`` in GiB (2^30 bytes)."""
        return self.bytes / _GIB


# -- inputs of one step --------------------------------------------------------------------------------
def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _timestep(value: float) -> torch.Tensor:
    """A batch-1 timestep on the CPU: the SDK reads its value, which a meta tensor cannot give."""
    return torch.full((1,), float(value), dtype=torch.float32)


def _flux_inputs(
    dtype: torch.dtype, *, tokens: int, channels: int, text_tokens: int, text_dim: int, pooled_dim: int
) -> dict[str, Any]:
    """FluxPipeline's call: packed latents, text embeddings and ids, pooled CLIP, guidance, ``t / 1000``."""
    return {
        "hidden_states": _meta(1, tokens, channels, dtype=dtype),
        "encoder_hidden_states": _meta(1, text_tokens, text_dim, dtype=dtype),
        "pooled_projections": _meta(1, pooled_dim, dtype=dtype),
        "timestep": _timestep(1.0),
        "guidance": _meta(1, dtype=torch.float32),
        "img_ids": _meta(tokens, 3, dtype=dtype),
        "txt_ids": _meta(text_tokens, 3, dtype=dtype),
        "return_dict": False,
    }


def _wan_inputs(
    dtype: torch.dtype, *, latent: tuple[int, int, int, int], text_tokens: int, text_dim: int
) -> dict[str, Any]:
    """WanPipeline's text-to-video call: 5-D latents, umT5 embeddings, the timestep in ``0..1000``."""
    return {
        "hidden_states": _meta(1, *latent, dtype=dtype),
        "encoder_hidden_states": _meta(1, text_tokens, text_dim, dtype=dtype),
        "timestep": _timestep(1000.0),
        "return_dict": False,
    }


def _hunyuan_video_inputs(
    dtype: torch.dtype, *, latent: tuple[int, int, int, int], text_tokens: int, text_dim: int, pooled_dim: int
) -> dict[str, Any]:
    """HunyuanVideoPipeline's call: 5-D latents, Llama embeddings and mask, pooled CLIP, guidance x 1000."""
    return {
        "hidden_states": _meta(1, *latent, dtype=dtype),
        "encoder_hidden_states": _meta(1, text_tokens, text_dim, dtype=dtype),
        "encoder_attention_mask": _meta(1, text_tokens, dtype=dtype),
        "pooled_projections": _meta(1, pooled_dim, dtype=dtype),
        "timestep": _timestep(1000.0),
        "guidance": _meta(1, dtype=torch.float32),
        "return_dict": False,
    }


def _video_latent(width: int, height: int, frames: int, channels: int) -> tuple[int, int, int, int]:
    """``(channels, latent frames, latent height, latent width)`` of a video through a 4x/8x/8x VAE."""
    return channels, (frames - 1) // _VAE_TEMPORAL + 1, height // _VAE_SPATIAL, width // _VAE_SPATIAL


def flux_spec(
    config: Mapping[str, Any] = FLUX_DEV_CONFIG,
    *,
    name: str = "FLUX.1-dev",
    width: int = 1024,
    height: int = 1024,
    text_tokens: int = 512,
) -> ModelSpec:
    """A Flux model at ``width x height`` (a 16-channel latent packed 2x2 into tokens) with ``text_tokens`` T5 tokens.

    FLUX.1-dev is guidance-distilled: one context.
    """
    channels = int(config.get("in_channels", 64))
    tokens = (height // (2 * _VAE_SPATIAL)) * (width // (2 * _VAE_SPATIAL))
    inputs = functools.partial(
        _flux_inputs,
        tokens=tokens,
        channels=channels,
        text_tokens=text_tokens,
        text_dim=int(config.get("joint_attention_dim", 4096)),
        pooled_dim=int(config.get("pooled_projection_dim", 768)),
    )
    return ModelSpec(
        name,
        "FluxTransformer2DModel",
        dict(config),
        f"{width}x{height}",
        f"{tokens} image + {text_tokens} text tokens",
        inputs,
        contexts=1,
        contexts_note="guidance-distilled (guidance embedding, one call per step)",
    )


def wan_spec(
    config: Mapping[str, Any] = WAN_T2V_14B_CONFIG,
    *,
    name: str = "Wan 2.1 T2V 14B",
    width: int = 1280,
    height: int = 720,
    frames: int = 81,
    text_tokens: int = 512,
) -> ModelSpec:
    """A Wan model on ``frames`` frames of ``width x height`` with ``text_tokens`` umT5 tokens.

    Wan runs classifier-free guidance as two calls per step (contexts ``cond`` and ``uncond``): two contexts.
    """
    latent = _video_latent(width, height, frames, int(config.get("in_channels", 16)))
    p_t, p_h, p_w = config.get("patch_size", (1, 2, 2))
    tokens = (latent[1] // p_t) * (latent[2] // p_h) * (latent[3] // p_w)
    inputs = functools.partial(
        _wan_inputs, latent=latent, text_tokens=text_tokens, text_dim=int(config.get("text_dim", 4096))
    )
    return ModelSpec(
        name,
        "WanTransformer3DModel",
        dict(config),
        f"{width}x{height}, {frames} frames",
        f"{tokens} video + {text_tokens} text tokens",
        inputs,
        contexts=2,
        contexts_note="classifier-free guidance as two calls per step (cond, uncond)",
    )


def hunyuan_video_spec(
    config: Mapping[str, Any] = HUNYUAN_VIDEO_CONFIG,
    *,
    name: str = "HunyuanVideo",
    width: int = 1280,
    height: int = 720,
    frames: int = 129,
    text_tokens: int = 256,
) -> ModelSpec:
    """A HunyuanVideo model on ``frames`` frames of ``width x height`` with ``text_tokens`` Llama tokens.

    HunyuanVideo is guidance-distilled (true CFG off by default): one context.
    """
    latent = _video_latent(width, height, frames, int(config.get("in_channels", 16)))
    p, p_t = int(config.get("patch_size", 2)), int(config.get("patch_size_t", 1))
    tokens = (latent[1] // p_t) * (latent[2] // p) * (latent[3] // p)
    inputs = functools.partial(
        _hunyuan_video_inputs,
        latent=latent,
        text_tokens=text_tokens,
        text_dim=int(config.get("text_embed_dim", 4096)),
        pooled_dim=int(config.get("pooled_projection_dim", 768)),
    )
    return ModelSpec(
        name,
        "HunyuanVideoTransformer3DModel",
        dict(config),
        f"{width}x{height}, {frames} frames",
        f"{tokens} video + {text_tokens} text tokens",
        inputs,
        contexts=1,
        contexts_note="guidance-distilled (guidance embedding; true CFG off by default, one call per step)",
    )


#: The models projected by default, by the name ``--models`` takes.
MODELS: dict[str, ModelSpec] = {
    "flux": flux_spec(),
    "wan": wan_spec(),
    "hunyuanvideo": hunyuan_video_spec(),
}


# -- the SDK's unit map, on meta ------------------------------------------------------------------------
def build_model(spec: ModelSpec, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """``spec``'s transformer on the meta device in ``dtype`` (the class's fp32 modules kept in float32)."""
    import diffusers

    cls = getattr(diffusers, spec.model_class)
    with torch.device("meta"):
        model = cls(**spec.config)
    keep = tuple(getattr(cls, "_keep_in_fp32_modules", None) or ())
    for name, parameter in model.named_parameters():
        wanted = torch.float32 if any(k in name.split(".") for k in keep) else dtype
        parameter.data = parameter.data.to(wanted)
    return model.eval()


def _on_meta(value: Any) -> Any:
    return value.to("meta") if isinstance(value, torch.Tensor) and value.device.type != "meta" else value


def _move_to_meta(
    module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Forward pre-hook: a submodule receives its tensors on meta (the CPU timestep, where it is used)."""
    values = (*args, *kwargs.values())
    if not any(isinstance(v, torch.Tensor) and v.device.type != "meta" for v in values):
        return None
    return tuple(_on_meta(a) for a in args), {k: _on_meta(v) for k, v in kwargs.items()}


@contextmanager
def _timestep_to_meta(model: torch.nn.Module) -> Iterator[None]:
    """Within: every submodule of ``model`` (not ``model`` itself) moves a non-meta tensor argument to meta."""
    handles = [m.register_forward_pre_hook(_move_to_meta, with_kwargs=True) for m in model.modules() if m is not model]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def unit_layouts(model: torch.nn.Module, inputs: dict[str, Any], units: str, max_order: int = 2) -> UnitLayouts:
    """The shape of each output stream of each unit the SDK serves on ``model`` at ``units``, after one step.

    Applies TaylorSeer (``interval=7, warmup=3``) with ``units``, runs one forward (a full step: every
    unit computes), reads each unit's layout and removes the accelerator.
    """
    handle = compose("taylorseer", interval=7, warmup=3, max_order=max_order, units=units).apply(model)
    try:
        with torch.no_grad(), _timestep_to_meta(model):
            model(**inputs)
        contexts = list(handle.runtime.contexts.values())
        if len(contexts) != 1:
            raise RuntimeError(f"one forward made {len(contexts)} contexts, expected 1")
        return {key: tuple(tuple(shape) for shape, _, _ in unit.layout) for key, unit in contexts[0].units.items()}
    finally:
        handle.remove()


def _spec_of(model: str | ModelSpec) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    key = model.strip().lower()
    if key not in MODELS:
        raise ValueError(f"unknown model {model!r}; known: {sorted(MODELS)}")
    return MODELS[key]


def projection(
    models: Sequence[str | ModelSpec] = tuple(MODELS),
    formats: Sequence[str] = DEFAULT_FORMATS,
    units: Sequence[str] = GRANULARITIES,
    max_order: int = 2,
) -> list[ProjectionRow]:
    """Projected forecast-state bytes of each model (a name of :data:`MODELS` or a :class:`ModelSpec`),
    granularity and storage format, with full ladders of ``max_order + 1`` terms in every context."""
    ladder_formats = [(name, parse_ladder_format(name)) for name in formats]
    rows = []
    for model_or_name in models:
        spec = _spec_of(model_or_name)
        model = build_model(spec)
        for granularity in units:
            layouts = unit_layouts(model, spec.inputs(torch.bfloat16), granularity, max_order)
            shapes = [shape for streams in layouts.values() for shape in streams]
            for name, fmt in ladder_formats:
                per_context = sum(fmt.nbytes(shape, max_order) for shape in shapes)
                rows.append(
                    ProjectionRow(
                        model=spec.name,
                        resolution=spec.resolution,
                        units=granularity,
                        format=name,
                        bytes=spec.contexts * per_context,
                        num_units=len(layouts),
                        num_streams=len(shapes),
                        contexts=spec.contexts,
                        max_order=max_order,
                        tokens=spec.tokens,
                        contexts_note=spec.contexts_note,
                    )
                )
    return rows


# -- the table -------------------------------------------------------------------------------------------
def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _size(nbytes: int) -> str:
    """GiB with 2 decimals; below 0.01 GiB, MiB or KiB with 1 decimal (so that no cell reads 0.00)."""
    if nbytes >= 0.01 * _GIB:
        return f"{nbytes / _GIB:.2f}"
    if nbytes >= 0.1 * (1 << 20):
        return f"{nbytes / (1 << 20):.1f} MiB"
    return f"{nbytes / (1 << 10):.1f} KiB"


def projection_markdown(rows: Sequence[ProjectionRow]) -> str:
    """One Markdown table per model: a row per granularity, a column per storage format (GiB, 2 decimals)."""
    if not rows:
        return "(no rows)\n"
    max_orders = sorted({r.max_order for r in rows})
    lines = [
        "Projected forecast-state bytes in GiB (2^30 bytes; MiB or KiB where below 0.01 GiB) with full ladders: "
        f"max_order = {', '.join(map(str, max_orders))}, i.e. {', '.join(str(m + 1) for m in max_orders)} terms "
        "per cached stream; batch 1; every context of a step. Computed from the SDK's unit map on the meta "
        "device: a projection, not a measurement."
    ]
    for model in _unique(r.model for r in rows):
        mine = [r for r in rows if r.model == model]
        first = mine[0]
        heading = f"### {model}, {first.resolution}" + (f" ({first.tokens})" if first.tokens else "")
        contexts = f"{first.contexts} context{'' if first.contexts == 1 else 's'} (x{first.contexts})"
        why = f": {first.contexts_note}" if first.contexts_note else ""
        lines += ["", heading, "", f"{contexts}{why}.", ""]
        formats = _unique(r.format for r in mine)
        lines.append("| units | units per context | streams per context | " + " | ".join(formats) + " |")
        lines.append("|---|---:|---:|" + "---:|" * len(formats))
        for granularity in _unique(r.units for r in mine):
            cells = {r.format: r for r in mine if r.units == granularity}
            some = next(iter(cells.values()))
            values = " | ".join(_size(cells[f].bytes) if f in cells else "" for f in formats)
            lines.append(f"| {granularity} | {some.num_units} | {some.num_streams} | {values} |")
    lines += [
        "",
        "Notes: sizes are for every context together (the multiplier is given per model). fp32 and bf16 hold 4 "
        "and 2 bytes per element; fp8 is e4m3 with one float32 scale per token row; bf16+fp8 holds D^0 in bf16 "
        "and the higher orders in fp8. A stream is one cached output (one ladder): a joint attention unit has "
        "two (image, text). The meta forward's timestep is a CPU tensor (the SDK reads its value); every other "
        "tensor is on meta.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Print the projection table for the chosen models."""
    parser = argparse.ArgumentParser(
        prog="python -m hicache_sdk.bench.memory_projection", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument(
        "--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to project (default: all)"
    )
    parser.add_argument("--max-order", type=int, default=2, help="highest order of the ladders (default 2: 3 terms)")
    args = parser.parse_args(argv)
    if args.max_order < 0:
        parser.error("--max-order must be >= 0")
    rows = projection(models=args.models, max_order=args.max_order)
    print(projection_markdown(rows), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
