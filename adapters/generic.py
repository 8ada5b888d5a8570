"""Generic adapter: the residual (output - input) of every transformer block is one unit.

Coarser than a family-specific adapter (a whole block is skipped on forecast steps, gates
included) but it fits any diffusers transformer that keeps its blocks in lists such as
``transformer_blocks``, ``single_transformer_blocks`` or ``blocks``. How a block's outputs map to
its inputs is data (:data:`OUTPUT_LAYOUTS`, shared with ``units="block"`` of any adapter, see
:mod:`hicache_sdk.granularity`); unknown blocks that return one tensor are taken to return
``hidden_states``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hicache_sdk import hookimpl
from hicache_sdk.adapter import Adapter, BlockBinding
from hicache_sdk.errors import AdapterMismatchError
from hicache_sdk.granularity import BLOCK_LISTS, OUTPUT_LAYOUTS, block_lists, residual_forward
from hicache_sdk.runtime import Runtime

__all__ = ["BLOCK_LISTS", "OUTPUT_LAYOUTS", "REVERSED_TIMESTEPS", "TIMESTEP_SCALES", "GenericAdapter"]

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
        return bool(block_lists(model))

    def bindings(self, runtime: Runtime) -> list[BlockBinding]:
        blocks = [(f"{attr}.{i}", block) for attr, found in block_lists(self.model) for i, block in enumerate(found)]
        return [
            BlockBinding(key, block, residual_forward(runtime, key, index, self._layouts))
            for index, (key, block) in enumerate(blocks)
        ]

    @property
    def num_blocks(self) -> int:
        return sum(len(found) for _, found in block_lists(self.model))

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
