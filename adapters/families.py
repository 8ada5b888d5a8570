"""The built-in families: where the papers' units are in each diffusers DiT, declared as data.

Each :class:`~hicache_sdk.family.Family` lists the cacheable submodules of its blocks: attention,
cross-attention and feed-forward outputs, taken before the gates the block applies (the block
still computes its modulation and applies the current gates at every step). Joint attentions
return an image and a text stream; feed-forwards that map tokens one by one offer a token path
(ClusCa). ``source`` names the reference code whose units these are.
"""

from __future__ import annotations

from collections.abc import Callable

from hicache_sdk import hookimpl
from hicache_sdk.adapter import Adapter
from hicache_sdk.family import BlockSpec, Family, Unit, family_adapter

from .fused_blocks import chroma_single_forward, hunyuan_video_single_forward

__all__ = ["FAMILIES"]


def _joint_attention(module: str = "attn") -> Unit:
    return Unit(module, "attention", streams=("img", "txt"))


def _mlp(module: str, tokens: str = "image", stream: str = "img") -> Unit:
    return Unit(module, "mlp", streams=(stream,), tokens=tokens)  # type: ignore[arg-type]


#: A double-stream block of the MMDiT kind: joint attention, image MLP ``ff``, text MLP ``ff_context``.
def _double_stream(block: str, image_output: int) -> BlockSpec:
    return BlockSpec(
        block,
        units=(_joint_attention(), _mlp("ff"), _mlp("ff_context", "text", "txt")),
        image_output=image_output,
    )


#: Self-attention, cross-attention to the text, MLP (PixArt, DiT, LTX-Video, Sana, Wan).
def _cross_attention_block(block: str, ff: str = "ff", *, token_wise: bool = True, **names: str) -> BlockSpec:
    return BlockSpec(
        block,
        units=(
            Unit(names.get("attn1", "attn1"), "attention"),
            Unit(names.get("attn2", "attn2"), "cross_attention", optional=True),
            Unit(ff, "mlp", tokens="image" if token_wise else None),
        ),
    )


FAMILIES: tuple[Family, ...] = (
    Family(
        "qwenimage",
        models=("QwenImageTransformer2DModel",),
        block_lists=("transformer_blocks",),
        blocks=(
            BlockSpec(
                "QwenImageTransformerBlock",
                units=(
                    Unit("attn", "attention", ("img", "txt")),
                    _mlp("img_mlp"),
                    _mlp("txt_mlp", "text", "txt"),
                ),
                image_output=1,
            ),
        ),
        timestep_scale=1.0,
        observed_lists=("transformer_blocks",),
        token_paths=True,
        source="Cache4Diffusion's Qwen-Image TaylorSeer forward and the HiCache Qwen-Image code: image and text "
        "attention, image and text MLPs, before their gates",
    ),
    Family(
        "wan",
        models=("WanTransformer3DModel",),
        block_lists=("blocks",),
        blocks=(_cross_attention_block("WanTransformerBlock", "ffn"),),
        observed_lists=("blocks",),
        token_paths=True,
        source="TaylorSeer-Wan2.1 (wan_attention_forward): self-attention, cross-attention, FFN",
    ),
    Family(
        "hunyuanvideo",
        models=("HunyuanVideoTransformer3DModel",),
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        blocks=(
            _double_stream("HunyuanVideoTransformerBlock", image_output=0),
            BlockSpec("HunyuanVideoSingleTransformerBlock", forward=hunyuan_video_single_forward),
        ),
        observed_lists=("transformer_blocks",),
        token_paths=True,
        source="TaylorSeer-HunyuanVideo (MMDoubleStreamBlock, MMSingleStreamBlock): image and text attention and "
        "MLPs; the single-stream block's fused output projection",
    ),
    Family(
        "hunyuanvideo15",
        models=("HunyuanVideo15Transformer3DModel",),
        block_lists=("transformer_blocks",),
        blocks=(_double_stream("HunyuanVideo15TransformerBlock", image_output=0),),
        observed_lists=("transformer_blocks",),
        token_paths=True,
        source="no reference caching code for 1.5: TaylorSeer-HunyuanVideo's double-stream units",
    ),
    Family(
        "sd3",
        models=("SD3Transformer2DModel",),
        block_lists=("transformer_blocks",),
        blocks=(
            BlockSpec(
                "JointTransformerBlock",
                units=(
                    _joint_attention(),
                    Unit("attn2", "attention", optional=True),  # SD3.5's second self-attention
                    _mlp("ff"),
                    Unit("ff_context", "mlp", ("txt",), tokens="text", optional=True),  # not in the last block
                ),
                image_output=1,
            ),
        ),
        observed_lists=("transformer_blocks",),
        token_paths=True,
        source="no reference caching code for SD3: TaylorSeer-FLUX's double-stream units, on SD3's joint blocks",
    ),
    Family(
        "pixart",
        models=("PixArtTransformer2DModel",),
        block_lists=("transformer_blocks",),
        blocks=(_cross_attention_block("BasicTransformerBlock"),),
        observed_lists=("transformer_blocks",),
        token_paths=True,
        source="PixArt-Taylor (PixArtBlock, unofficial): self-attention, cross-attention, MLP",
    ),
    Family(
        "dit",
        models=("DiTTransformer2DModel",),
        block_lists=("transformer_blocks",),
        blocks=(_cross_attention_block("BasicTransformerBlock"),),
        observed_lists=("transformer_blocks",),
        token_paths=True,
        source="TaylorSeer-DiT (DiTBlock): attention and MLP of each class-conditional block",
    ),
    Family(
        "cogvideox",
        models=("CogVideoXTransformer3DModel",),
        block_lists=("transformer_blocks",),
        blocks=(
            BlockSpec(
                "CogVideoXBlock",
                units=(Unit("attn1", "attention", ("img", "txt")), Unit("ff", "mlp", ("all",))),
                image_output=0,
            ),
        ),
        source="no reference caching code for CogVideoX: joint attention and the MLP (on text and video tokens "
        "together), before their gates",
    ),
    Family(
        "ltx",
        models=("LTXVideoTransformer3DModel",),
        block_lists=("transformer_blocks",),
        blocks=(_cross_attention_block("LTXVideoTransformerBlock"),),
        observed_lists=("transformer_blocks",),
        token_paths=True,
        source="no reference caching code for LTX-Video: self-attention, cross-attention, MLP as in TaylorSeer-Wan2.1",
    ),
    Family(
        "sana",
        models=("SanaTransformer2DModel",),
        block_lists=("transformer_blocks",),
        blocks=(_cross_attention_block("SanaTransformerBlock", token_wise=False),),
        source="no reference caching code for Sana: linear self-attention, cross-attention, Mix-FFN (a convolution: "
        "no token path)",
    ),
    Family(
        "flux2",
        models=("Flux2Transformer2DModel",),
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        blocks=(
            _double_stream("Flux2TransformerBlock", image_output=1),
            BlockSpec("Flux2SingleTransformerBlock", units=(Unit("attn", "fused"),), image_output=1),
        ),
        timestep_scale=1.0,
        observed_lists=("transformer_blocks",),
        token_paths=True,
        source="no reference caching code for Flux.2: TaylorSeer-FLUX's units; the single block fuses attention and "
        "MLP in `attn`",
    ),
    Family(
        "zimage",
        models=("ZImageTransformer2DModel",),
        block_lists=("noise_refiner", "context_refiner", "layers"),
        blocks=(
            BlockSpec(
                "ZImageTransformerBlock",
                units=(
                    Unit("attention", "attention"),
                    Unit("feed_forward", "mlp"),
                ),
                image_input="x",
            ),
        ),
        timestep_scale=1.0,
        timestep_reversed=True,
        granularities=("modules", "block", "range"),
        granularity_note="its forward returns a list of tensors (one per image), not one output to cache",
        source="no reference caching code for Z-Image: attention and feed-forward of every block, before their "
        "output norms and gates",
    ),
    Family(
        "hidream",
        models=("HiDreamImageTransformer2DModel",),
        block_lists=("double_stream_blocks", "single_stream_blocks"),
        blocks=(
            BlockSpec(
                "HiDreamBlock",
                inner=("block", "HiDreamImageTransformerBlock"),
                units=(
                    Unit("block.attn1", "attention", ("img", "txt")),
                    _mlp("block.ff_i"),
                    _mlp("block.ff_t", "text", "txt"),
                ),
                image_output=0,
            ),
            BlockSpec(
                "HiDreamBlock",
                inner=("block", "HiDreamImageSingleTransformerBlock"),
                units=(
                    Unit("block.attn1", "attention"),
                    Unit("block.ff_i", "mlp"),
                ),
            ),
        ),
        observed_lists=("double_stream_blocks",),
        token_paths=True,
        granularities=("modules", "block", "output"),
        granularity_note="each block takes its own text embeddings (a new encoder_hidden_states per block), so a "
        "range's residual would mix them",
        source="TaylorSeer-HiDream (HiDreamImageTransformerBlock, HiDreamImageSingleTransformerBlock): attention and "
        "(MoE) MLPs of both block kinds",
    ),
    Family(
        "chroma",
        models=("ChromaTransformer2DModel",),
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        blocks=(
            _double_stream("ChromaTransformerBlock", image_output=1),
            BlockSpec("ChromaSingleTransformerBlock", forward=chroma_single_forward),
        ),
        timestep_scale=1.0,
        observed_lists=("transformer_blocks",),
        token_paths=True,
        source="no reference caching code for Chroma: TaylorSeer-FLUX's units (Chroma keeps Flux's blocks)",
    ),
)


@hookimpl
def hicache_register_adapters(register: Callable[[type[Adapter]], None]) -> None:
    for family in FAMILIES:
        register(family_adapter(family))
