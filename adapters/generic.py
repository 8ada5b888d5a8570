"""Generic adapter: the residual (output - input) of every transformer block is one unit.

Coarser than a family-specific adapter (a whole block is skipped on forecast steps, gates
included) but it fits any diffusers transformer that keeps its blocks in lists such as
``transformer_blocks``, ``single_transformer_blocks`` or ``blocks``. How a block's outputs map to
its inputs is data (:data:`OUTPUT_LAYOUTS`); unknown blocks that return one tensor are taken to
return ``hidden_states``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from hicache_sdk import hookimpl
from hicache_sdk.adapter import Adapter, BlockBinding
from hicache_sdk.errors import AdapterMismatchError
from hicache_sdk.runtime import Runtime

__all__ = ["BLOCK_LISTS", "OUTPUT_LAYOUTS", "REVERSED_TIMESTEPS", "TIMESTEP_SCALES", "GenericAdapter"]

#: Attributes holding block lists, in the order a model runs them.
BLOCK_LISTS: tuple[str, ...] = (
    "transformer_blocks",
    "single_transformer_blocks",
    "blocks",
    "temporal_transformer_blocks",
    "double_stream_blocks",
    "single_stream_blocks",
    "noise_refiner",
    "context_refiner",
    "layers",
)

#: The timestep a model class receives at noise level 1 (others: 1000, the diffusers default).
TIMESTEP_SCALES: dict[str, float] = {
    "FluxTransformer2DModel": 1.0,
    "ChromaTransformer2DModel": 1.0,
    "QwenImageTransformer2DModel": 1.0,
    "Flux2Transformer2DModel": 1.0,
    "ZImageTransformer2DModel": 1.0,
}

#: Model classes whose timestep counts time the other way: ``timestep_scale * (1 - sigma)``.
REVERSED_TIMESTEPS: frozenset[str] = frozenset({"ZImageTransformer2DModel"})

#: Input argument each output of a block class is the updated version of (``None`` entries allowed).
OUTPUT_LAYOUTS: dict[str, tuple[str, ...]] = {
    "FluxTransformerBlock": ("encoder_hidden_states", "hidden_states"),
    "FluxSingleTransformerBlock": ("encoder_hidden_states", "hidden_states"),
    "JointTransformerBlock": ("encoder_hidden_states", "hidden_states"),
    "QwenImageTransformerBlock": ("encoder_hidden_states", "hidden_states"),
    "HunyuanVideoTransformerBlock": ("hidden_states", "encoder_hidden_states"),
    "HunyuanVideoSingleTransformerBlock": ("hidden_states", "encoder_hidden_states"),
    "CogVideoXBlock": ("hidden_states", "encoder_hidden_states"),
    "CogView4TransformerBlock": ("hidden_states", "encoder_hidden_states"),
    "ChromaTransformerBlock": ("encoder_hidden_states", "hidden_states"),
    "Flux2TransformerBlock": ("encoder_hidden_states", "hidden_states"),
    "Flux2SingleTransformerBlock": ("encoder_hidden_states", "hidden_states"),
    "HunyuanVideo15TransformerBlock": ("hidden_states", "encoder_hidden_states"),
    "HiDreamBlock": ("hidden_states", "encoder_hidden_states"),
    "ZImageTransformerBlock": ("x",),
}


def _block_lists(model: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
    found = []
    for attr in BLOCK_LISTS:
        blocks = getattr(model, attr, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0:
            found.append((attr, blocks))
    return found


def _layout(block: torch.nn.Module, output: Any) -> tuple[str, ...]:
    # a subclass of a known block (a user's tweak) keeps its parent's layout
    known = (OUTPUT_LAYOUTS[c.__name__] for c in type(block).__mro__ if c.__name__ in OUTPUT_LAYOUTS)
    layout = next(known, None)
    if isinstance(output, torch.Tensor):  # one output: hidden_states, or the block's only listed input
        return layout if layout is not None and len(layout) == 1 else ("hidden_states",)
    if layout is None or len(layout) != len(output):
        raise AdapterMismatchError(
            f"the generic adapter does not know how the {len(output)} outputs of {type(block).__name__} "
            "map to its inputs; add an entry to hicache_sdk.adapters.generic.OUTPUT_LAYOUTS or use an "
            "adapter written for this model"
        )
    return layout


def _block_forward(
    runtime: Runtime, key: str, index: int, layouts: dict[str, tuple[str | None, ...]]
) -> Callable[..., Any]:
    """The runtime-aware forward of one block; ``layouts[key]`` records which input each output updates.

    A ``None`` entry in the recorded layout is an output the block returns as ``None`` (e.g. the
    text stream of SD3's last block, ``context_pre_only``); a forecast returns ``None`` there too.
    """
    signature: list[inspect.Signature] = []

    def forward(block: torch.nn.Module, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not signature:  # the class's forward: a patched instance forward may take (*args, **kwargs)
            signature.append(inspect.signature(type(block).forward))
        inputs = signature[0].bind_partial(block, *args, **kwargs).arguments
        computed: list[Any] = []

        def compute() -> tuple[torch.Tensor, ...]:
            output = original(*args, **kwargs)
            computed.append(output)
            outputs = (output,) if isinstance(output, torch.Tensor) else tuple(output)
            layout = _layout(block, output)
            layouts[key] = tuple(None if value is None else name for name, value in zip(layout, outputs, strict=True))
            residuals = []
            for name, value in zip(layout, outputs, strict=True):
                if value is None:
                    continue
                source = inputs.get(name)
                if not isinstance(source, torch.Tensor) or source.shape != value.shape:
                    raise AdapterMismatchError(
                        f"{type(block).__name__} output {name!r} of shape {tuple(value.shape)} has no input "
                        "of the same shape to form a residual with"
                    )
                residuals.append(value - source)
            return tuple(residuals)

        residuals = runtime.unit(key, compute, streams=None, block=index, kind="block")
        if computed:  # the block ran: return its exact output
            output = computed[0]
            outputs = [output] if isinstance(output, torch.Tensor) else list(output)
        else:
            rebuilt = iter(residuals)
            outputs = [None if name is None else inputs[name] + next(rebuilt) for name in layouts[key]]
            output = outputs[0] if len(outputs) == 1 else tuple(outputs)
        image = "hidden_states" if "hidden_states" in layouts[key] else layouts[key][0]
        if image is not None and isinstance(inputs.get(image), torch.Tensor):
            runtime.block(index, inputs[image], outputs[layouts[key].index(image)])
        return output

    return forward


class GenericAdapter(Adapter):
    """Whole-block residual units on any transformer with block lists (the fallback adapter)."""

    name = "generic"
    priority = -100

    def __init__(self, model: torch.nn.Module) -> None:
        if not self.fits(model):
            raise AdapterMismatchError(
                f"{type(model).__name__} has no non-empty block list ({', '.join(BLOCK_LISTS)}); "
                "no adapter can find its cacheable units"
            )
        super().__init__(model)
        self._layouts: dict[str, tuple[str | None, ...]] = {}

    @classmethod
    def fits(cls, model: torch.nn.Module) -> bool:
        return bool(_block_lists(model))

    def bindings(self, runtime: Runtime) -> list[BlockBinding]:
        blocks = [(f"{attr}.{i}", block) for attr, found in _block_lists(self.model) for i, block in enumerate(found)]
        return [
            BlockBinding(key, block, _block_forward(runtime, key, index, self._layouts))
            for index, (key, block) in enumerate(blocks)
        ]

    @property
    def num_blocks(self) -> int:
        return sum(len(found) for _, found in _block_lists(self.model))

    @property
    def timestep_scale(self) -> float:
        """From :data:`TIMESTEP_SCALES` by the model's class (1000 for classes it does not list)."""
        return TIMESTEP_SCALES.get(type(self.model).__name__, 1000.0)

    def noise_level(self, timestep: float) -> float | None:
        level = timestep / self.timestep_scale
        return 1.0 - level if type(self.model).__name__ in REVERSED_TIMESTEPS else level

    @property
    def note(self) -> str:
        return f"generic adapter: whole-block residual units of {type(self.model).__name__}"


@hookimpl
def hicache_register_adapters(register: Callable[[type[Adapter]], None]) -> None:
    register(GenericAdapter)
