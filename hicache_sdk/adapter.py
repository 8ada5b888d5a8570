"""The model-adapter interface: where the cacheable units of an architecture are."""

from __future__ import annotations

import abc
from typing import ClassVar

import attrs
import torch

from .hooks import BlockForward
from .runtime import Runtime

__all__ = ["Adapter", "BlockBinding"]


@attrs.frozen
class BlockBinding:
    """One block whose forward the adapter replaces while attached."""

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
    """

    name: ClassVar[str]
    priority: ClassVar[int] = 0
    provides_token_paths: ClassVar[bool] = False

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @classmethod
    @abc.abstractmethod
    def fits(cls, model: torch.nn.Module) -> bool:
        """Whether this adapter can serve ``model``."""

    @abc.abstractmethod
    def bindings(self, runtime: Runtime) -> list[BlockBinding]:
        """The block forwards to install for ``runtime``."""

    @property
    def observed_blocks(self) -> int:
        """How many blocks show their image hidden states to the policy (:meth:`Runtime.observe`).

        Policies that cluster tokens (ClusCa's ``cluster_block``) index these blocks; 0 when the
        adapter calls ``observe`` nowhere.
        """
        return 0

    @property
    def note(self) -> str:
        """A remark for the run summary (e.g. why a generic adapter was used)."""
        return ""
