"""Forwards of single-stream blocks whose attention and MLP meet in one projection.

In these blocks (Chroma's and HunyuanVideo's single-stream blocks, like Flux's) the attention
output and the MLP's hidden activations are concatenated and projected by ``proj_out`` before
the gate. The papers' unit is that projection's output: on a forecast step, attention, MLP and
``proj_out`` all skip. No single submodule computes it, so these two forwards are written against
the runtime: they re-express the stock forward (same operations in the same order, so interval 1
is bit-identical to the stock block) with the fused computation as one unit of kind ``"fused"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hicache_sdk.hooks import BlockForward
from hicache_sdk.runtime import Runtime

__all__ = ["chroma_single_forward", "hunyuan_video_single_forward"]


def _rows(tensor: torch.Tensor | None, index: torch.Tensor, batch: int) -> torch.Tensor | None:
    """``tensor`` restricted to the samples in ``index`` when its first dimension is the batch."""
    if tensor is None or tensor.dim() == 0 or tensor.shape[0] != batch:
        return tensor
    return tensor.index_select(0, index)


def _clip_fp16(hidden_states: torch.Tensor) -> torch.Tensor:
    return hidden_states.clip(-65504, 65504) if hidden_states.dtype == torch.float16 else hidden_states


def _fused_unit(
    runtime: Runtime,
    key: str,
    index: int,
    compute: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    normed: torch.Tensor,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """The fused output projection ``compute(normed, mask)`` as the unit ``<key>.proj_out`` (sub-batches split both)."""
    batch = normed.shape[0]
    (fused,) = runtime.unit(
        f"{key}.proj_out",
        lambda: compute(normed, mask),
        batch_rows=lambda rows: compute(normed.index_select(0, rows), _rows(mask, rows, batch)),
        block=index,
        kind="fused",
        inputs=(tuple(normed.shape), normed.dtype),
    )
    return fused


def chroma_single_forward(runtime: Runtime, key: str, index: int) -> BlockForward:
    """``ChromaSingleTransformerBlock``: text and image tokens arrive concatenated."""

    def forward(
        block: Any,
        original: Callable[..., Any],
        hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        norm_hidden, gate = block.norm(hidden_states, emb=temb)
        attention_kwargs = joint_attention_kwargs or {}
        if attention_mask is not None:
            attention_mask = attention_mask[:, None, None, :] * attention_mask[:, None, :, None]

        def compute(normed: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            mlp = block.act_mlp(block.proj_mlp(normed))
            attn = block.attn(
                hidden_states=normed, image_rotary_emb=image_rotary_emb, attention_mask=mask, **attention_kwargs
            )
            return block.proj_out(torch.cat([attn, mlp], dim=2))

        fused = _fused_unit(runtime, key, index, compute, norm_hidden, attention_mask)
        hidden_states = _clip_fp16(residual + gate.unsqueeze(1) * fused)
        runtime.block(index, residual, hidden_states)
        return hidden_states

    return forward


def hunyuan_video_single_forward(runtime: Runtime, key: str, index: int) -> BlockForward:
    """``HunyuanVideoSingleTransformerBlock``: image then text tokens, attention on the two parts."""

    def forward(
        block: Any,
        original: Callable[..., Any],
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text_length = encoder_hidden_states.shape[1]
        image_in = hidden_states
        hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        residual = hidden_states
        norm_hidden, gate = block.norm(hidden_states, emb=temb)

        def compute(normed: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            mlp = block.act_mlp(block.proj_mlp(normed))
            attn, context_attn = block.attn(
                hidden_states=normed[:, :-text_length, :],
                encoder_hidden_states=normed[:, -text_length:, :],
                attention_mask=mask,
                image_rotary_emb=image_rotary_emb,
            )
            return block.proj_out(torch.cat([torch.cat([attn, context_attn], dim=1), mlp], dim=2))

        fused = _fused_unit(runtime, key, index, compute, norm_hidden, attention_mask)
        hidden_states = gate.unsqueeze(1) * fused + residual
        image, text = hidden_states[:, :-text_length, :], hidden_states[:, -text_length:, :]
        runtime.block(index, image_in, image)
        return image, text

    return forward
