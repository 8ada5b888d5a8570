"""Flux adapter: the paper-faithful units of ``FluxTransformer2DModel``.

Double-stream blocks: image and text attention (one joint attention call, two streams), image
MLP and text MLP, all cached *before* their gates. Single-stream blocks: the fused output
projection (attention and MLP together), before its gate. On every step, forecast or not, the
block computes its adaLN modulation from the current timestep and applies the current gates; on a
forecast step the attention and MLP modules do not run. The MLPs expose a token path (recompute
on chosen tokens) for token-level policies such as ClusCa, and every unit can run on a sub-batch
(per-sample decisions). After each block its image tokens in and out are shown to the policy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.models.transformers.transformer_flux import (
    FluxSingleTransformerBlock,
    FluxTransformer2DModel,
    FluxTransformerBlock,
)

from hicache_sdk import hookimpl
from hicache_sdk.adapter import Adapter, BlockBinding
from hicache_sdk.errors import AdapterMismatchError
from hicache_sdk.policy import TokenPath
from hicache_sdk.runtime import Runtime

__all__ = ["FluxAdapter"]


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, j]]`` for ``x (B, L, D)`` and ``index (B, K)``."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


def _token_path(
    module: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, kind: Any, name: str
) -> TokenPath:
    return TokenPath(compute=lambda index: module(gather_tokens(inputs, index)), kind=kind, module=name)


def _rows(module: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> Callable[[torch.Tensor], Any]:
    """The unit computed for the samples in ``index`` only."""
    return lambda index: module(inputs.index_select(0, index))


def _attention_pair(outputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if len(outputs) != 2:
        raise AdapterMismatchError(
            "the flux adapter caches image and text attention; this attention returned "
            f"{len(outputs)} outputs (IP-Adapter inputs are not supported while caching)"
        )
    return outputs[0], outputs[1]


def _double_block_forward(runtime: Runtime, key: str, index: int) -> Callable[..., Any]:
    def forward(
        block: FluxTransformerBlock,
        original: Callable[..., Any],
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        norm_hidden, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden_states, emb=temb)
        norm_context, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(
            encoder_hidden_states, emb=temb
        )
        attention_kwargs = joint_attention_kwargs or {}
        tokens_in = hidden_states

        def attention(image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return _attention_pair(
                block.attn(
                    hidden_states=image,
                    encoder_hidden_states=text,
                    image_rotary_emb=image_rotary_emb,
                    **attention_kwargs,
                )
            )

        attn_image, attn_text = runtime.unit(
            f"{key}.attn",
            lambda: attention(norm_hidden, norm_context),
            streams=("img", "txt"),
            batch_rows=lambda index: attention(norm_hidden.index_select(0, index), norm_context.index_select(0, index)),
            block=index,
            kind="attention",
        )
        hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_image
        norm_hidden = block.norm2(hidden_states)
        norm_hidden = norm_hidden * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        (ff_image,) = runtime.unit(
            f"{key}.ff",
            lambda: block.ff(norm_hidden),
            token_paths=(_token_path(block.ff, norm_hidden, "image", "ff"),),
            batch_rows=_rows(block.ff, norm_hidden),
            block=index,
            kind="mlp",
        )
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * ff_image

        encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * attn_text
        norm_context = block.norm2_context(encoder_hidden_states)
        norm_context = norm_context * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        (ff_text,) = runtime.unit(
            f"{key}.ff_context",
            lambda: block.ff_context(norm_context),
            token_paths=(_token_path(block.ff_context, norm_context, "text", "ff_context"),),
            batch_rows=_rows(block.ff_context, norm_context),
            block=index,
            kind="mlp",
        )
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * ff_text
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        runtime.block(index, tokens_in, hidden_states)
        return encoder_hidden_states, hidden_states

    return forward


def _single_block_forward(runtime: Runtime, key: str, index: int) -> Callable[..., Any]:
    def forward(
        block: FluxSingleTransformerBlock,
        original: Callable[..., Any],
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text_length = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        residual = hidden_states
        norm_hidden, gate = block.norm(hidden_states, emb=temb)
        attention_kwargs = joint_attention_kwargs or {}

        def compute(normed: torch.Tensor) -> torch.Tensor:
            mlp = block.act_mlp(block.proj_mlp(normed))
            attn = block.attn(hidden_states=normed, image_rotary_emb=image_rotary_emb, **attention_kwargs)
            return block.proj_out(torch.cat([attn, mlp], dim=2))

        (fused,) = runtime.unit(
            f"{key}.proj_out",
            lambda: compute(norm_hidden),
            batch_rows=_rows(compute, norm_hidden),
            block=index,
            kind="fused",
        )
        hidden_states = residual + gate.unsqueeze(1) * fused
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        runtime.block(index, residual[:, text_length:], hidden_states[:, text_length:])
        return hidden_states[:, :text_length], hidden_states[:, text_length:]

    return forward


def _is_stock(block: torch.nn.Module, cls: type) -> bool:
    """An instance of ``cls`` whose forward is diffusers' own (what this adapter re-expresses)."""
    return isinstance(block, cls) and getattr(type(block), "forward", None) is getattr(cls, "forward", None)


class FluxAdapter(Adapter):
    """Units of ``FluxTransformer2DModel``: 4 streams per double-stream block, 1 per single-stream block."""

    name = "flux"
    priority = 100
    provides_token_paths = True
    provides_batch_split = True

    def __init__(self, model: torch.nn.Module) -> None:
        if not self.fits(model):
            raise AdapterMismatchError(
                f"the flux adapter needs a FluxTransformer2DModel with diffusers' stock Flux blocks, "
                f"got {type(model).__name__}"
            )
        super().__init__(model)

    @classmethod
    def fits(cls, model: torch.nn.Module) -> bool:
        if not isinstance(model, FluxTransformer2DModel):
            return False
        double = getattr(model, "transformer_blocks", [])
        single = getattr(model, "single_transformer_blocks", [])
        return all(_is_stock(b, FluxTransformerBlock) for b in double) and all(
            _is_stock(b, FluxSingleTransformerBlock) for b in single
        )

    @classmethod
    def claims(cls, model: torch.nn.Module) -> bool:
        return isinstance(model, FluxTransformer2DModel)

    @classmethod
    def mismatch(cls, model: torch.nn.Module) -> str | None:
        if cls.fits(model):
            return None
        if not isinstance(model, FluxTransformer2DModel):
            return f"the flux adapter serves FluxTransformer2DModel, not {type(model).__name__}"
        return "the flux adapter needs diffusers' stock Flux blocks (a block's forward was modified)"

    @property
    def observed_blocks(self) -> int:
        """The double-stream blocks (each shows its image hidden states to the policy)."""
        return len(getattr(self.model, "transformer_blocks", []))

    @property
    def num_blocks(self) -> int:
        model: Any = self.model
        return len(model.transformer_blocks) + len(model.single_transformer_blocks)

    @property
    def timestep_scale(self) -> float:
        """Flux takes the noise level itself (the pipeline passes ``t / 1000``)."""
        return 1.0

    def bindings(self, runtime: Runtime) -> list[BlockBinding]:
        model: Any = self.model
        double, single = list(model.transformer_blocks), list(model.single_transformer_blocks)
        bindings = [
            BlockBinding(
                f"transformer_blocks.{i}",
                block,
                _double_block_forward(runtime, f"transformer_blocks.{i}", i),
            )
            for i, block in enumerate(double)
        ]
        bindings += [
            BlockBinding(
                f"single_transformer_blocks.{i}",
                block,
                _single_block_forward(runtime, f"single_transformer_blocks.{i}", len(double) + i),
            )
            for i, block in enumerate(single)
        ]
        return bindings


@hookimpl
def hicache_register_adapters(register: Callable[[type[Adapter]], None]) -> None:
    register(FluxAdapter)
