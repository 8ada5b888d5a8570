"""Adapters declared as data: which submodules of a family's blocks are cacheable units.

Most diffusers blocks compute their modulation, call their attention and feed-forward submodules,
and apply the gates themselves. Caching *those submodules' outputs* keeps the papers' semantics
(features cached before their gates; the block still computes its modulation from the current
timestep and applies the current gates at every step) without rewriting any block forward: the
SDK replaces the forward of each unit submodule by one that asks the runtime to compute or
forecast, and the forward of each block by one that shows the policy its image tokens.

A :class:`Family` names the model classes, the block lists in run order, and, per block class, a
:class:`BlockSpec` listing its :class:`Unit` submodules. :func:`family_adapter` turns it into an
:class:`~hicache_sdk.adapter.Adapter` class to register. A block whose cacheable computation is
not one submodule (Flux's single-stream block, where attention and MLP meet in ``proj_out``) gives
a ``forward`` written against the runtime instead: the one exception the data cannot express.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Literal

import attrs
import torch

from .adapter import Adapter, BlockBinding
from .decision import UNIT_KINDS
from .errors import AdapterMismatchError, InvalidParameterError
from .granularity import GRANULARITIES
from .hooks import BlockForward
from .policy import TokenPath
from .runtime import Runtime, UnitOutputs

__all__ = [
    "BlockSpec",
    "Family",
    "FamilyAdapter",
    "ForwardFactory",
    "Unit",
    "family_adapter",
    "gather_tokens",
    "is_stock",
]

#: ``factory(runtime, key, index)`` returns a block's forward written against the runtime
#: (``forward(block, original_forward, *args, **kwargs)``); ``key`` names the block, ``index`` is
#: its place in run order.
ForwardFactory = Callable[[Runtime, str, int], BlockForward]


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, j]]`` for ``x (B, L, D)`` and ``index (B, K)``."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


def _check_kind(instance: Any, attribute: Any, value: str) -> None:
    if value not in UNIT_KINDS:
        raise ValueError(f"{attribute.name} must be one of {UNIT_KINDS}, got {value!r}")


def _nonempty(instance: Any, attribute: Any, value: Any) -> None:
    if not value:
        raise ValueError(f"{attribute.name} must not be empty")


@attrs.frozen
class Unit:
    """One cacheable submodule of a block.

    Attributes:
        module: its dotted path under the block (``"attn"``, ``"ff_context"``, ``"block.ff_i"``).
        kind: what it computes, one of :data:`~hicache_sdk.decision.UNIT_KINDS` (policies such
            as PAB choose by kind).
        streams: names of its tensor outputs, in order (a joint attention returns image and
            text: ``("img", "txt")``); ``None`` outputs are skipped and rebuilt as ``None``.
        tokens: ``"image"`` or ``"text"`` when the module maps each token independently (an
            MLP): token-level policies (ClusCa) may then recompute it on chosen tokens of its
            first input. ``None`` otherwise.
        unbatched: forward arguments never split when a policy computes the unit for some samples
            only. Every other tensor argument whose first dimension is the batch (that of the first
            tensor argument) is split, also inside tuples, lists and keyword dicts (rotary
            embeddings with one row per sample, masks).
        optional: the submodule is absent from some blocks of the family (SD3's last block has no
            ``ff_context``): then there is no unit there.
    """

    module: str = attrs.field(validator=_nonempty)
    kind: str = attrs.field(validator=_check_kind)
    streams: tuple[str, ...] = attrs.field(default=("img",), validator=_nonempty)
    tokens: Literal["image", "text"] | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.in_(("image", "text")))
    )
    unbatched: tuple[str, ...] = ()
    optional: bool = False


@attrs.frozen
class BlockSpec:
    """The units of one block class.

    Attributes:
        block: the block's class name (diffusers' stock class; subclasses do not match).
        inner: for a wrapper block, ``(path, class name)`` of the real block inside it (HiDream's
            blocks hold theirs under ``.block``); unit paths stay relative to the outer block.
        units: its unit submodules, in the order the block calls them.
        image_input: the forward argument holding the block's image tokens.
        image_output: where the block returns them when it returns a tuple (an index into it);
            a block that returns one tensor returns them.
        forward: instead of ``units``, a factory of a forward written against the runtime (for a
            block whose cacheable computation is not one submodule, or that calls one submodule
            twice). That forward serves its units with :meth:`Runtime.unit` (passing
            ``batch_rows``: family adapters split batches) and shows its image tokens with
            :meth:`Runtime.block` itself: ``image_input`` and ``image_output`` are not used.
        defined_in: the module defining the stock block class, for the check that its forward is
            diffusers' own; empty: any module (for blocks of a plugin's own library).
    """

    block: str = attrs.field(validator=_nonempty)
    inner: tuple[str, str] | None = None
    units: tuple[Unit, ...] = attrs.field(default=())
    image_input: str = "hidden_states"
    image_output: int | None = None
    forward: ForwardFactory | None = None
    defined_in: str = "diffusers."

    def __attrs_post_init__(self) -> None:
        if not self.units and self.forward is None:
            raise ValueError(f"BlockSpec {self.block!r} needs units or a forward")

    def matches(self, block: torch.nn.Module) -> bool:
        """Whether ``block`` is of this spec's class (and holds its inner block's class)."""
        if type(block).__name__ != self.block:
            return False
        if self.inner is None:
            return True
        inner = _submodule(block, self.inner[0])
        return inner is not None and type(inner).__name__ == self.inner[1]

    def modules_to_check(self, block: torch.nn.Module) -> list[torch.nn.Module]:
        """The block, and its inner block if any: both must run diffusers' stock forward."""
        inner = None if self.inner is None else _submodule(block, self.inner[0])
        return [block] if inner is None else [block, inner]


@attrs.frozen
class Family:
    """A family of transformers and where its cacheable units are.

    Attributes:
        name: the adapter's registry name.
        models: class names of the transformers it serves (a subclass of one is served too).
        block_lists: attributes holding the block lists, in the order the model runs them.
        blocks: one :class:`BlockSpec` per block class found in those lists.
        timestep_scale: the model's timestep at noise level 1 (1.0 for models that take sigma).
        timestep_reversed: the model takes ``timestep_scale * (1 - sigma)`` (Z-Image).
        observed_lists: block lists whose blocks token-level policies index (ClusCa's
            ``cluster_block``); they must come first in ``block_lists``.
        source: where the units come from (a reference implementation), shown in the docs.
        priority: among adapters that fit a model, the highest wins (``generic`` is -100).
        token_paths: whether token-level policies may run (some unit has ``tokens`` and the
            observed blocks' image tokens are the tokens those units see).
        granularities: the ``units=`` this family can be served with (see
            :mod:`hicache_sdk.granularity`); ``granularity_note`` says why others are not.
    """

    name: str = attrs.field(validator=_nonempty)
    models: tuple[str, ...] = attrs.field(validator=_nonempty)
    block_lists: tuple[str, ...] = attrs.field(validator=_nonempty)
    blocks: tuple[BlockSpec, ...] = attrs.field(validator=_nonempty)
    timestep_scale: float = 1000.0
    timestep_reversed: bool = False
    observed_lists: tuple[str, ...] = attrs.field(default=())
    source: str = ""
    priority: int = 50
    token_paths: bool = False
    granularities: tuple[str, ...] = attrs.field(default=GRANULARITIES)
    granularity_note: str = ""

    def __attrs_post_init__(self) -> None:
        unknown = sorted(set(self.granularities) - set(GRANULARITIES))
        if unknown or "modules" not in self.granularities:
            raise InvalidParameterError(
                f"family {self.name!r}: granularities must include 'modules' and come from {list(GRANULARITIES)}, "
                f"got {list(self.granularities)}"
            )
        if self.observed_lists != self.block_lists[: len(self.observed_lists)]:
            raise ValueError(f"observed_lists {self.observed_lists} must lead block_lists {self.block_lists}")

    def spec_of(self, block: torch.nn.Module) -> BlockSpec | None:
        """The spec of ``block``'s class (exact class, not a subclass; and its inner block's), or ``None``."""
        return next((spec for spec in self.blocks if spec.matches(block)), None)

    def named_blocks(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
        """``(name, block)`` of every block, in run order."""
        for attr in self.block_lists:
            found = getattr(model, attr, None)
            if isinstance(found, torch.nn.ModuleList):
                for i, block in enumerate(found):
                    yield f"{attr}.{i}", block

    def mismatch(self, model: torch.nn.Module) -> str | None:
        """Why this family's adapter cannot serve ``model`` (``None`` if it can)."""
        classes = {c.__name__ for c in type(model).__mro__}
        if not classes & set(self.models):
            return f"the {self.name} adapter serves {', '.join(self.models)}, not {type(model).__name__}"
        blocks = list(self.named_blocks(model))
        if not blocks:
            return f"{type(model).__name__} has none of the block lists {', '.join(self.block_lists)}"
        for name, block in blocks:
            reason = _block_mismatch(self, name, block)
            if reason is not None:
                return f"the {self.name} adapter does not fit {type(model).__name__}: {reason}"
        return None


def is_stock(block: torch.nn.Module, defined_in: str = "diffusers.") -> bool:
    """Whether ``block`` runs its class's own forward, defined in ``defined_in`` (no user patch)."""
    forward = getattr(type(block), "forward", None)
    owner = getattr(forward, "__qualname__", "").split(".")[0]
    module = getattr(forward, "__module__", "") or ""
    if owner != type(block).__name__ or not module.startswith(defined_in):
        return False
    if "forward" not in vars(block):
        return True
    return _only_parallel_hooks(block, forward)


#: Hooks that split or gather a block's inputs and outputs and leave its computation alone.
_PARALLEL_HOOKS = ("ContextParallelSplitHook", "ContextParallelGatherHook")


def _only_parallel_hooks(block: torch.nn.Module, forward: Any) -> bool:
    """Whether ``block``'s instance forward is diffusers' hook registry around the class's forward, with only
    context-parallel split and gather hooks in it (any other hook, or a later patch, changes the block)."""
    registry = getattr(block, "_diffusers_hook", None)
    refs = getattr(registry, "_fn_refs", None)
    hooks = getattr(registry, "hooks", None)
    if not refs or not hooks:
        return False
    if any(
        type(h).__name__ not in _PARALLEL_HOOKS or type(h).__module__ != "diffusers.hooks.context_parallel"
        for h in hooks.values()
    ):
        return False
    installed = getattr(vars(block)["forward"], "func", None)  # the registry installs a partial of its wrapper
    if "HookRegistry.register_hook" not in getattr(installed, "__qualname__", ""):
        return False
    innermost = getattr(refs[0], "original_forward", None) or refs[0].forward
    return getattr(innermost, "__func__", None) is forward


def _block_mismatch(family: Family, name: str, block: torch.nn.Module) -> str | None:
    spec = family.spec_of(block)
    if spec is None:
        known = ", ".join(s.block for s in family.blocks)
        return f"{name} is a {type(block).__name__}, not one of its stock blocks ({known})"
    for module in spec.modules_to_check(block):
        if not is_stock(module, spec.defined_in):
            return f"{name} ({type(module).__name__}) does not run the stock forward (a modified block)"
    for unit in spec.units:
        if _submodule(block, unit.module) is None and not unit.optional:
            return f"{name} has no submodule {unit.module!r}"
    return None


def _submodule(block: torch.nn.Module, path: str) -> torch.nn.Module | None:
    module: Any = block
    for part in path.split("."):
        module = getattr(module, part, None)
    return module if isinstance(module, torch.nn.Module) else None


class _Layout:
    """How a unit module's return value maps to its streams: a tensor, or a tuple with ``None`` slots."""

    def __init__(self, key: str, unit: Unit) -> None:
        self.key = key
        self.unit = unit
        self.tensor = True
        self.present: tuple[bool, ...] = (True,)

    def flatten(self, output: Any) -> UnitOutputs:
        """The tensor outputs of one call, checked against the unit's streams."""
        if isinstance(output, torch.Tensor):
            self.tensor, self.present, tensors = True, (True,), (output,)
        elif isinstance(output, (tuple, list)):
            self.tensor = False
            self.present = tuple(o is not None for o in output)
            tensors = tuple(o for o in output if o is not None)
        else:
            raise AdapterMismatchError(f"unit {self.key!r} returned a {type(output).__name__}, not tensors")
        if len(tensors) != len(self.unit.streams) or not all(isinstance(t, torch.Tensor) for t in tensors):
            raise AdapterMismatchError(
                f"unit {self.key!r} returned {len(tensors)} outputs; the adapter caches the streams "
                f"{self.unit.streams} (extra inputs such as IP-Adapter images are not supported while caching)"
            )
        return tensors

    def rebuild(self, outputs: UnitOutputs) -> Any:
        """The return value of the module from the unit's outputs."""
        if self.tensor:
            return outputs[0]
        served = iter(outputs)
        return tuple(next(served) if present else None for present in self.present)


class _CallSignature:
    """A module forward's parameters, to name positional arguments (bound once per module)."""

    def __init__(self, forward: Callable[..., Any]) -> None:
        self.signature = inspect.signature(forward)

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> inspect.BoundArguments:
        return self.signature.bind_partial(*args, **kwargs)


def _first_tensor_argument(bound: inspect.BoundArguments) -> tuple[str, torch.Tensor] | None:
    for name, value in bound.arguments.items():
        if isinstance(value, torch.Tensor):
            return name, value
    return None


def _rows_of(value: Any, batch: int, index: torch.Tensor) -> Any:
    """``value`` with every tensor whose first dimension is ``batch`` restricted to the rows in ``index``."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, index) if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_rows_of(v, batch, index) for v in value)
    if isinstance(value, dict):
        return {k: _rows_of(v, batch, index) for k, v in value.items()}
    return value


def _sub_batch(
    bound: inspect.BoundArguments, unbatched: tuple[str, ...], index: torch.Tensor
) -> inspect.BoundArguments:
    """A copy of ``bound`` with its per-sample tensors restricted to the samples in ``index``."""
    first = _first_tensor_argument(bound)
    if first is None:
        return bound
    batch = first[1].shape[0]
    arguments = {
        name: value if name in unbatched else _rows_of(value, batch, index) for name, value in bound.arguments.items()
    }
    return inspect.BoundArguments(bound.signature, arguments)


def _call(original: Callable[..., Any], bound: inspect.BoundArguments) -> Any:
    return original(*bound.args, **bound.kwargs)


def _unit_forward(runtime: Runtime, key: str, index: int, unit: Unit) -> BlockForward:
    """The forward of one unit submodule: the runtime computes or forecasts its outputs."""
    layout = _Layout(key, unit)
    signature: list[_CallSignature] = []

    def forward(module: torch.nn.Module, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not signature:
            signature.append(_CallSignature(original))
        bound = signature[0].bind(args, kwargs)
        inputs = tuple(
            (name, tuple(v.shape), v.dtype) for name, v in bound.arguments.items() if isinstance(v, torch.Tensor)
        )

        def rows(index: torch.Tensor) -> UnitOutputs:
            return layout.flatten(_call(original, _sub_batch(bound, unit.unbatched, index)))

        paths: tuple[TokenPath, ...] = ()
        if unit.tokens is not None:
            first = _first_tensor_argument(bound)
            if first is not None:
                paths = (_token_path(original, bound, first, unit),)
        outputs = runtime.unit(
            key,
            lambda: layout.flatten(original(*args, **kwargs)),
            streams=unit.streams,
            token_paths=paths,
            batch_rows=rows,
            block=index,
            kind=unit.kind,
            inputs=inputs,
        )
        return layout.rebuild(outputs)

    return forward


def _token_path(
    original: Callable[..., Any], bound: inspect.BoundArguments, first: tuple[str, torch.Tensor], unit: Unit
) -> TokenPath:
    name, tokens = first
    assert unit.tokens is not None

    def compute(index: torch.Tensor) -> torch.Tensor:
        arguments = dict(bound.arguments)
        arguments[name] = gather_tokens(tokens, index)
        output = _call(original, inspect.BoundArguments(bound.signature, arguments))
        return output if isinstance(output, torch.Tensor) else output[0]

    return TokenPath(compute=compute, kind=unit.tokens, stream=unit.streams[0], module=unit.module)


def _observing_forward(runtime: Runtime, index: int, spec: BlockSpec) -> BlockForward:
    """A block's own forward, after which its image tokens in and out are shown to the policy."""
    signature: list[_CallSignature] = []

    def forward(block: torch.nn.Module, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        output = original(*args, **kwargs)
        if runtime.watches_blocks:
            if not signature:
                signature.append(_CallSignature(original))
            tokens_in = signature[0].bind(args, kwargs).arguments.get(spec.image_input)
            tokens_out = output if isinstance(output, torch.Tensor) else output[spec.image_output or 0]
            if isinstance(tokens_in, torch.Tensor) and isinstance(tokens_out, torch.Tensor):
                runtime.block(index, tokens_in, tokens_out)
        return output

    return forward


class FamilyAdapter(Adapter):
    """An adapter whose units are declared by a :class:`Family` (subclasses set ``family``)."""

    family: ClassVar[Family]
    provides_batch_split = True

    def __init__(self, model: torch.nn.Module) -> None:
        reason = self.family.mismatch(model)
        if reason is not None:
            raise AdapterMismatchError(reason)
        super().__init__(model)

    @classmethod
    def fits(cls, model: torch.nn.Module) -> bool:
        return cls.family.mismatch(model) is None

    @classmethod
    def claims(cls, model: torch.nn.Module) -> bool:
        return bool({c.__name__ for c in type(model).__mro__} & set(cls.family.models))

    @classmethod
    def mismatch(cls, model: torch.nn.Module) -> str | None:
        return cls.family.mismatch(model)

    def _blocks(self) -> list[tuple[str, torch.nn.Module, BlockSpec]]:
        found = []
        for name, block in self.family.named_blocks(self.model):
            spec = self.family.spec_of(block)
            assert spec is not None  # checked when the adapter was made
            found.append((name, block, spec))
        return found

    def blocks(self) -> list[tuple[str, torch.nn.Module]]:
        return list(self.family.named_blocks(self.model))

    def bindings(self, runtime: Runtime) -> list[BlockBinding]:
        bindings = []
        for index, (name, block, spec) in enumerate(self._blocks()):
            if spec.forward is not None:
                bindings.append(BlockBinding(name, block, spec.forward(runtime, name, index)))
                continue
            bindings.append(BlockBinding(name, block, _observing_forward(runtime, index, spec)))
            for unit in spec.units:
                module = _submodule(block, unit.module)
                if module is not None:
                    key = f"{name}.{unit.module}"
                    bindings.append(BlockBinding(key, module, _unit_forward(runtime, key, index, unit)))
        return bindings

    @property
    def num_blocks(self) -> int:
        return len(self._blocks())

    @property
    def observed_blocks(self) -> int:
        model: Any = self.model
        return sum(len(getattr(model, attr, ())) for attr in self.family.observed_lists)

    @property
    def timestep_scale(self) -> float:
        return self.family.timestep_scale

    def noise_level(self, timestep: float) -> float | None:
        level = timestep / self.family.timestep_scale
        return 1.0 - level if self.family.timestep_reversed else level


def family_adapter(family: Family, module: str | None = None) -> type[FamilyAdapter]:
    """The adapter class of ``family``, ready to register (``register(family_adapter(MY_FAMILY))``).

    ``module`` is the class's ``__module__`` (default: the calling module, e.g. the plugin's).
    """
    owner = module if module is not None else sys._getframe(1).f_globals.get("__name__", __name__)
    return type(
        f"{family.name.title().replace('_', '')}Adapter",
        (FamilyAdapter,),
        {
            "family": family,
            "name": family.name,
            "priority": family.priority,
            "provides_token_paths": family.token_paths,
            "granularities": family.granularities,
            "granularity_note": family.granularity_note,
            "__doc__": f"Units of {', '.join(family.models)}, declared as data. {family.source}".strip(),
            "__module__": owner,
        },
    )
