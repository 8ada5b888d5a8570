"""An example hicache-sdk plugin: ``cogview4``, a model adapter for diffusers' ``CogView4Transformer2DModel``.

hicache-sdk has no adapter of its own for CogView4. Installed, this distribution registers one
through its entry point in the ``hicache`` group (see ``pyproject.toml``);
``hicache_sdk.compose("taylorseer").apply(pipe)`` then chooses it for a ``CogView4Pipeline``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

from hicache_sdk import Adapter, TokenPath, hookimpl
from hicache_sdk.family import BlockSpec, Family, family_adapter, gather_tokens
from hicache_sdk.hooks import BlockForward
from hicache_sdk.runtime import Runtime

__all__ = ["COGVIEW4", "CogView4Adapter", "cogview4_block_forward", "hicache_register_adapters"]
__version__ = "0.1.0"


def _rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """``value`` restricted to the samples in ``rows`` when its first dimension is the batch, else as is."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.index_select(0, rows)
    return value


def _token_path(
    ff: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor, kind: Literal["image", "text"], stream: str
) -> TokenPath:
    """Recomputes ``ff`` on chosen tokens of its input ``tokens`` (``index (B, K)``), for policies such as ClusCa."""
    return TokenPath(compute=lambda index: ff(gather_tokens(tokens, index)), kind=kind, stream=stream, module="ff")


def cogview4_block_forward(runtime: Runtime, key: str, index: int) -> BlockForward:
    """``CogView4TransformerBlock``'s forward, with its attention and its feed-forward served by the runtime.

    The block calls one feed-forward module, ``ff``, twice: on the image tokens, then on the text
    tokens. A unit declared on ``ff`` would be asked for twice per step under one key, so this
    forward serves both calls as one unit with two streams. Every other line is the stock forward's,
    in its order: with every unit computed, the block's outputs are the stock block's bit for bit.
    """

    def forward(
        block: Any,
        original: Callable[..., Any],
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        attention_mask: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens_in, batch = hidden_states, hidden_states.shape[0]
        # the modulation, from the current timestep: computed at every step, forecast or not
        (
            norm_image,
            gate_msa,
            shift_mlp,
            scale_mlp,
            gate_mlp,
            norm_text,
            c_gate_msa,
            c_shift_mlp,
            c_scale_mlp,
            c_gate_mlp,
        ) = block.norm1(hidden_states, encoder_hidden_states, temb)
        extra = attention_kwargs or {}

        def attention(image: torch.Tensor, text: torch.Tensor, mask: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return block.attn1(
                hidden_states=image,
                encoder_hidden_states=text,
                image_rotary_emb=image_rotary_emb,
                attention_mask=mask,
                **extra,
            )

        # unit 1: the joint attention, before its gates; it returns the image and the text tokens
        attn_image, attn_text = runtime.unit(
            f"{key}.attn1",
            lambda: attention(norm_image, norm_text, attention_mask),
            streams=("img", "txt"),
            batch_rows=lambda rows: attention(
                norm_image.index_select(0, rows), norm_text.index_select(0, rows), _rows(attention_mask, rows, batch)
            ),
            block=index,
            kind="attention",
            inputs=(tuple(norm_image.shape), tuple(norm_text.shape), norm_image.dtype),
        )
        hidden_states = hidden_states + attn_image * gate_msa.unsqueeze(1)
        encoder_hidden_states = encoder_hidden_states + attn_text * c_gate_msa.unsqueeze(1)

        mlp_image = block.norm2(hidden_states) * (1 + scale_mlp.unsqueeze(1)) + shift_mlp.unsqueeze(1)
        mlp_text = block.norm2_context(encoder_hidden_states)
        mlp_text = mlp_text * (1 + c_scale_mlp.unsqueeze(1)) + c_shift_mlp.unsqueeze(1)

        def mlp(image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return block.ff(image), block.ff(text)

        # unit 2: both calls of the feed-forward, before their gates; it maps tokens one by one
        ff_image, ff_text = runtime.unit(
            f"{key}.ff",
            lambda: mlp(mlp_image, mlp_text),
            streams=("img", "txt"),
            token_paths=(
                _token_path(block.ff, mlp_image, "image", "img"),
                _token_path(block.ff, mlp_text, "text", "txt"),
            ),
            batch_rows=lambda rows: mlp(mlp_image.index_select(0, rows), mlp_text.index_select(0, rows)),
            block=index,
            kind="mlp",
            inputs=(tuple(mlp_image.shape), tuple(mlp_text.shape), mlp_image.dtype),
        )
        hidden_states = hidden_states + ff_image * gate_mlp.unsqueeze(1)
        encoder_hidden_states = encoder_hidden_states + ff_text * c_gate_mlp.unsqueeze(1)

        runtime.block(index, tokens_in, hidden_states)  # the block's image tokens, shown to the policy
        return hidden_states, encoder_hidden_states

    return forward


#: Where the cacheable units of CogView4 are: one list of blocks of one class.
COGVIEW4 = Family(
    "cogview4",
    models=("CogView4Transformer2DModel",),
    block_lists=("transformer_blocks",),
    blocks=(BlockSpec("CogView4TransformerBlock", forward=cogview4_block_forward),),
    timestep_scale=1000.0,  # CogView4Pipeline passes the scheduler's timestep: 1000 x the noise level
    observed_lists=("transformer_blocks",),  # ClusCa may cluster the image tokens of any block
    token_paths=True,  # the feed-forward maps tokens one by one, and its image tokens are the block's
    source="the joint attention and the shared feed-forward of each block (image and text), before their gates",
)

#: The adapter class that hicache-sdk instantiates for each CogView4 model it attaches to.
CogView4Adapter = family_adapter(COGVIEW4)


@hookimpl
def hicache_register_adapters(register: Callable[[type[Adapter]], None]) -> None:
    """Register this distribution's adapter with hicache-sdk."""
    register(CogView4Adapter)
