"""The model-adapter interface: where the cacheable units of an architecture are."""

from __future__ import annotations

import abc
from typing import ClassVar, cast

import attrs
import torch

from .granularity import GRANULARITIES, block_lists
from .hooks import BlockForward
from .runtime import Runtime

__all__ = ["Adapter", "BlockBinding"]


@attrs.frozen
class BlockBinding:
    """One module (a block, or a unit submodule of a block) whose forward the adapter replaces while attached.

    ``forward(module, original_forward, *args, **kwargs)`` receives the module and its own
    forward (a bound method) with the arguments of the call.
    """

    name: str
    block: torch.nn.Module
    forward: BlockForward


class Adapter(abc.ABC):
    """Base class of model adapters.

    An adapter knows one family of transformers: :meth:`fits` recognises it, :meth:`bindings`
    gives, for each block, a forward written against the :class:`~hicache_sdk.runtime.Runtime`
    (which decides, per unit, whether to compute or forecast). The SDK installs and removes those
    forwards; the adapter never touches the model itself.

    Attributes:
        name: registry name.
        priority: among adapters that fit a model, the highest priority is chosen.
        provides_token_paths: whether units can be recomputed on a subset of tokens.
        provides_batch_split: whether units can be computed on a sub-batch (per-sample decisions).
        granularities: the ``units=`` the model can be served with (:mod:`hicache_sdk.granularity`);
            ``granularity_note`` says why the others are refused.
    """

    name: ClassVar[str]
    priority: ClassVar[int] = 0
    provides_token_paths: ClassVar[bool] = False
    provides_batch_split: ClassVar[bool] = False
    granularities: ClassVar[tuple[str, ...]] = GRANULARITIES
    granularity_note: ClassVar[str] = ""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @classmethod
    @abc.abstractmethod
    def fits(cls, model: torch.nn.Module) -> bool:
        """Whether this adapter can serve ``model``."""

    @classmethod
    def claims(cls, model: torch.nn.Module) -> bool:
        """Whether ``model`` is of the family this adapter is written for (even if :meth:`fits` refuses it).

        When a claimed model is refused (e.g. its blocks were modified) and a fallback adapter
        serves it, the run summary says why.
        """
        return False

    @classmethod
    def mismatch(cls, model: torch.nn.Module) -> str | None:
        """Why this adapter cannot serve ``model``, or ``None`` when it can."""
        return None if cls.fits(model) else f"adapter {cls.name!r} does not fit {type(model).__name__}"

    @abc.abstractmethod
    def bindings(self, runtime: Runtime) -> list[BlockBinding]:
        """The forwards to install for ``runtime``: each block's, in the order the model runs them.

        Each forward serves its units through :meth:`Runtime.unit` (with ``block`` = the block's
        index in run order and a ``kind``) and, after the block, shows its image tokens to the
        policy through :meth:`Runtime.block`. Bindings may also name unit submodules of a block
        (the :class:`~hicache_sdk.family.FamilyAdapter` does); then override :attr:`num_blocks`.
        """

    def blocks(self) -> list[tuple[str, torch.nn.Module]]:
        """``(key, block)`` of every block, in run order (what ``units="block"`` and ``"range"`` serve).

        By default the items of the model's block lists named in
        :data:`hicache_sdk.granularity.BLOCK_LISTS`; the indices must agree with those the
        adapter's own units give (:attr:`num_blocks`).
        """
        return [(f"{attr}.{i}", block) for attr, found in block_lists(self.model) for i, block in enumerate(found)]

    @property
    def observed_blocks(self) -> int:
        """How many leading blocks (in run order) token-level policies index, e.g. ClusCa's ``cluster_block``.

        Their image tokens reach the policy through :meth:`Runtime.block` like every block's; this
        count says which of them a clustering policy may choose (Flux: the double-stream blocks).
        0 when the adapter offers none.
        """
        return 0

    @property
    def num_blocks(self) -> int:
        """Blocks this adapter binds, every block list together (policies index them in run order)."""
        return len(self.bindings(cast(Runtime, None)))  # bindings only capture the runtime

    @property
    def timestep_scale(self) -> float | None:
        """The model's timestep at noise level 1 (Flux: 1.0, most others: 1000.0); ``None`` if unknown.

        Policies see ``sigma`` in :class:`~hicache_sdk.decision.StepInfo` (see :meth:`noise_level`).
        """
        return None

    def noise_level(self, timestep: float) -> float | None:
        """The noise level sigma in [0, 1] at which the model is called with ``timestep`` (``None`` if unknown).

        ``timestep / timestep_scale`` by default; a model that counts time the other way (Z-Image
        takes ``1 - sigma``) overrides this. Policies read it as ``StepInfo.sigma``, and a rising
        noise level starts a new generation.
        """
        scale = self.timestep_scale
        return None if not scale else timestep / scale

    @property
    def note(self) -> str:
        """A remark for the run summary (e.g. why a generic adapter was used)."""
        return ""
