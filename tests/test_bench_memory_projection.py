"""The memory projection (``python -m hicache_sdk.bench.memory_projection``): unit maps and bytes, on meta models."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import FluxTransformer2DModel

from hicache_sdk.accelerator import compose, handle_of
from hicache_sdk.bench.memory_projection import (
    MODELS,
    ProjectionRow,
    build_model,
    flux_spec,
    hunyuan_video_spec,
    main,
    projection,
    projection_markdown,
    unit_layouts,
    wan_spec,
)

#: A Flux small enough to count by hand: inner width 16, 2 double blocks and 1 single block.
TINY_FLUX: dict[str, Any] = {
    "in_channels": 16,
    "num_layers": 2,
    "num_single_layers": 1,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "pooled_projection_dim": 16,
    "guidance_embeds": True,
    "axes_dims_rope": (2, 2, 4),
}
TINY_SMALL = {"num_attention_heads": 2, "attention_head_dim": 8}
# 64x64 pixels: an 8x8 latent packed 2x2 -> 16 image tokens of width 16; 6 text tokens
TINY_TOKENS, TEXT, WIDTH = 16, 6, 16


def tiny_flux(**config: Any) -> Any:
    return flux_spec({**TINY_FLUX, **config}, name="tiny flux", width=64, height=64, text_tokens=TEXT)


@pytest.fixture(scope="module")
def tiny_rows() -> list[ProjectionRow]:
    return projection(models=[tiny_flux()], formats=("fp32", "bf16", "bf16+fp8", "fp8"))


def _row(rows: list[ProjectionRow], units: str, fmt: str) -> ProjectionRow:
    (row,) = [r for r in rows if r.units == units and r.format == fmt]
    return row


def test_tiny_flux_bytes_match_a_count_by_hand(tiny_rows: list[ProjectionRow]) -> None:
    # per double block: attention img (16 x 16) and txt (6 x 16), ff (16 x 16), ff_context (6 x 16);
    # the single block's proj_out: (16 + 6) x 16. 3 terms per stream (max_order 2).
    double_rows, single_rows = 2 * TINY_TOKENS + 2 * TEXT, TINY_TOKENS + TEXT
    rows = 2 * double_rows + single_rows  # 110 token rows of width 16
    elements = rows * WIDTH
    assert _row(tiny_rows, "modules", "fp32").bytes == 3 * 4 * elements == 21120
    assert _row(tiny_rows, "modules", "bf16").bytes == 3 * 2 * elements
    assert _row(tiny_rows, "modules", "fp8").bytes == 3 * (elements + 4 * rows)  # one float32 scale per row
    assert _row(tiny_rows, "modules", "bf16+fp8").bytes == 2 * elements + 2 * (elements + 4 * rows)
    # one residual per block: (text, image) streams of the block's input shapes
    assert _row(tiny_rows, "block", "fp32").bytes == 3 * 4 * 3 * (TINY_TOKENS + TEXT) * WIDTH
    # one cumulative residual per block list (double, single): (text, image) streams each
    assert _row(tiny_rows, "range", "fp32").bytes == 2 * 3 * 4 * (TINY_TOKENS + TEXT) * WIDTH
    # the model's output: (1, 16 tokens, 16 packed channels)
    assert _row(tiny_rows, "output", "fp32").bytes == 3 * 4 * TINY_TOKENS * 16
    modules = _row(tiny_rows, "modules", "fp32")
    assert (modules.num_units, modules.num_streams, modules.contexts) == (2 * 3 + 1, 2 * 4 + 1, 1)


def test_bytes_scale_with_bytes_per_element(tiny_rows: list[ProjectionRow]) -> None:
    for units in ("modules", "block", "range", "output"):
        fp32, bf16 = _row(tiny_rows, units, "fp32"), _row(tiny_rows, units, "bf16")
        assert fp32.bytes == 2 * bf16.bytes
        assert (fp32.num_units, fp32.num_streams) == (bf16.num_units, bf16.num_streams)


def test_projection_agrees_with_the_sdk_accounting_of_a_real_run(tiny_rows: list[ProjectionRow]) -> None:
    # a plain-dtype ladder allocates its max_order + 1 terms at the first anchor: after one real step on
    # the CPU the runtime's own byte count is the full ladder the projection computes
    spec = tiny_flux()
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**spec.config).eval()
    inputs = {
        k: torch.randn(v.shape) if isinstance(v, torch.Tensor) and v.device.type == "meta" else v
        for k, v in spec.inputs(torch.float32).items()
    }
    for units in ("modules", "block", "range", "output"):
        handle = compose("taylorseer", interval=7, warmup=3, max_order=2, units=units, cache_dtype="fp32").apply(model)
        with torch.no_grad():
            model(**inputs)
        (context,) = handle.runtime.contexts.values()
        assert context.nbytes == _row(tiny_rows, units, "fp32").bytes, units
        handle.remove()


def test_flux_dev_unit_map_and_granularities() -> None:
    # the real FLUX.1-dev config at 1024x1024, on meta (about 4 s)
    rows = projection(models=["flux"], formats=("bf16",), units=("modules", "output"))
    modules, output = _row(rows, "modules", "bf16"), _row(rows, "output", "bf16")
    # per double block: attn (img + txt streams), ff, ff_context; per single block: proj_out
    assert modules.num_units == 19 * 3 + 38 == 95
    assert modules.num_streams == 19 * 4 + 38 == 114
    # 19 x (4096 + 512 + 4096 + 512) + 38 x (512 + 4096) token rows of width 3072, 3 terms of 2 bytes
    assert modules.bytes == 3 * 2 * 3072 * (19 * 9216 + 38 * 4608)
    assert (output.num_units, output.num_streams) == (1, 1)
    assert output.bytes == 3 * 2 * 4096 * 64  # the packed latent prediction
    assert output.bytes * 1000 < modules.bytes


def test_layouts_come_from_the_sdk_units_on_meta() -> None:
    spec = tiny_flux()
    model = build_model(spec)
    assert all(p.device.type == "meta" for p in model.parameters())
    layouts = unit_layouts(model, spec.inputs(torch.bfloat16), "modules")
    assert layouts["transformer_blocks.0.attn"] == ((1, TINY_TOKENS, WIDTH), (1, TEXT, WIDTH))
    assert layouts["single_transformer_blocks.0.proj_out"] == ((1, TINY_TOKENS + TEXT, WIDTH),)
    assert handle_of(model) is None  # nothing left attached


def test_video_families_and_their_contexts() -> None:
    tiny_wan = {"num_layers": 2, "ffn_dim": 32, "text_dim": 16, "freq_dim": 16, "rope_max_seq_len": 32, **TINY_SMALL}
    tiny_hv = {"num_layers": 2, "num_single_layers": 1, "num_refiner_layers": 1, "rope_axes_dim": (2, 2, 4)}
    tiny_hv |= {"text_embed_dim": 16, "pooled_projection_dim": 16, **TINY_SMALL}
    wan = wan_spec({**MODELS["wan"].config, **tiny_wan}, width=32, height=32, frames=5, text_tokens=4)
    hv = hunyuan_video_spec({**MODELS["hunyuanvideo"].config, **tiny_hv}, width=32, height=32, frames=5, text_tokens=4)
    rows = projection(models=[wan, hv], formats=("bf16",), units=("modules",))
    wan_row, hv_row = rows
    video_tokens = 2 * 2 * 2  # latent 2 frames x 4 x 4, patch 1x2x2
    # Wan: self-attention, cross-attention, FFN per block, each (1, tokens, 16); two contexts (CFG)
    assert (wan_row.num_units, wan_row.num_streams, wan_row.contexts) == (6, 6, 2)
    assert wan_row.bytes == 2 * 6 * 3 * 2 * video_tokens * 16
    # HunyuanVideo: 2 double blocks of 4 streams, 1 single block's fused projection; one context
    assert (hv_row.num_units, hv_row.num_streams, hv_row.contexts) == (7, 9, 1)
    double = 2 * (2 * video_tokens + 2 * 4)
    assert hv_row.bytes == 3 * 2 * (double + video_tokens + 4) * 16


def test_markdown_names_every_model_and_format(tiny_rows: list[ProjectionRow]) -> None:
    rows = [
        ProjectionRow(spec.name, spec.resolution, units, fmt, 3 << 30, 1, 2, spec.contexts, 2)
        for spec in MODELS.values()
        for units in ("modules", "output")
        for fmt in ("fp32", "bf16")
    ]
    text = projection_markdown([*rows, *tiny_rows])
    for name in (*(spec.name for spec in MODELS.values()), "tiny flux"):
        assert f"### {name}" in text
    assert "| units | units per context | streams per context | fp32 | bf16 |" in text
    assert "| modules | 1 | 2 | 3.00 | 3.00 |" in text
    assert "2 contexts (x2)" in text and "not a measurement" in text
    tiny = text[text.index("### tiny flux") :]
    assert "| modules | 7 | 9 | 20.6 KiB |" in tiny  # a size below 0.01 GiB is not shown as 0.00
    assert "0.00" not in tiny


def test_main_checks_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--max-order", "-1"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        main(["--models", "sdxl"])
    assert "sdxl" in capsys.readouterr().err
