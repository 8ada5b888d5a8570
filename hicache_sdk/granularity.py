"""How coarse a cached unit is: an adapter's modules, one residual per block, one per block range, the output.

``compose(..., units=...)`` takes one of:

``"modules"`` (default)
    the units the adapter declares (on Flux: attention and MLP outputs before their gates).
``"block"``
    one unit per block: its residual ``output - input`` per stream (the generic adapter's units).
``"range"``, ``"range[a:b]"``
    one unit per block list (``"range"``), or one for blocks ``a .. b-1`` in run order: the
    cumulative residual from the range's input to its output (FreqCa's cumulative residual
    feature). On a forecast step the first block of the range returns the forecast and the others
    pass their inputs through. A model that changes the tokens between two blocks of a range (Chroma
    joins its text and image tokens between its block lists, ControlNet adds residuals) is refused
    at its first step.
``"output"``
    one unit: the model's output (diffusers' "lite" TaylorSeer, TaylorSeer-Lite); a forecast step
    runs nothing of the model.

A coarser unit holds fewer ladders (less memory), at some cost in accuracy: it skips whole blocks,
gates included. What a block's outputs update is data, :data:`OUTPUT_LAYOUTS`; the block lists
searched are :data:`BLOCK_LISTS`.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import attrs
import torch

from .errors import AdapterMismatchError, InvalidParameterError
from .hooks import BlockForward
from .runtime import Runtime

__all__ = [
    "BLOCK_LISTS",
    "GRANULARITIES",
    "MODULES",
    "OUTPUT_LAYOUTS",
    "Granularity",
    "block_lists",
    "parse_units",
    "range_forwards",
    "residual_forward",
]

#: The granularities, finest first.
GRANULARITIES: tuple[str, ...] = ("modules", "block", "range", "output")

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

_RANGE = re.compile(r"range\[\s*(-?\d+)?\s*:\s*(-?\d+)?\s*\]")


@attrs.frozen
class Granularity:
    """A granularity of units: ``kind`` is one of :data:`GRANULARITIES`; ``start``/``stop`` bound a range
    (python slice semantics over the blocks in run order; both ``None``: one range per block list)."""

    kind: str = "modules"
    start: int | None = None
    stop: int | None = None

    @property
    def name(self) -> str:
        """E.g. ``"modules"``, ``"range"``, ``"range[1:-1]"``."""
        if self.kind == "range" and (self.start is not None or self.stop is not None):
            return f"range[{self.start or ''}:{'' if self.stop is None else self.stop}]"
        return self.kind

    def bounds(self, num_blocks: int) -> tuple[int, int]:
        """``(first, stop)`` of a range over ``num_blocks`` blocks; raises if it holds fewer than one."""
        first, stop, _ = slice(self.start, self.stop).indices(num_blocks)
        if stop - first < 1:
            raise InvalidParameterError(f"units={self.name!r} selects no block of the {num_blocks} this model has")
        return first, stop


#: The adapter's own units (the default).
MODULES = Granularity()


def parse_units(value: str | Granularity) -> Granularity:
    """A :class:`Granularity` from ``"modules"``, ``"block"``, ``"range"``, ``"range[a:b]"`` or ``"output"``."""
    if isinstance(value, Granularity):
        return value
    if not isinstance(value, str):
        raise InvalidParameterError(f"units must be one of {list(GRANULARITIES)} (a str), got {value!r}")
    text = value.strip().lower()
    if text in GRANULARITIES:
        return Granularity(text)
    match = _RANGE.fullmatch(text)
    if match is None:
        raise InvalidParameterError(
            f"units must be one of {list(GRANULARITIES)} or 'range[a:b]' (blocks a..b-1 in run order), got {value!r}"
        )
    start, stop = (None if g is None else int(g) for g in match.groups())
    return Granularity("range", 0 if start is None else start, stop)  # one range, even over every block


def block_lists(model: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
    """The model's non-empty block lists among :data:`BLOCK_LISTS`, in run order."""
    found = []
    for attr in BLOCK_LISTS:
        blocks = getattr(model, attr, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0:
            found.append((attr, blocks))
    return found


def output_layout(block: torch.nn.Module, output: Any) -> tuple[str, ...]:
    """The input each output of ``block`` updates (from :data:`OUTPUT_LAYOUTS`)."""
    # a subclass of a known block (a user's tweak) keeps its parent's layout
    known = (OUTPUT_LAYOUTS[c.__name__] for c in type(block).__mro__ if c.__name__ in OUTPUT_LAYOUTS)
    layout = next(known, None)
    if isinstance(output, torch.Tensor):  # one output: hidden_states, or the block's only listed input
        return layout if layout is not None and len(layout) == 1 else ("hidden_states",)
    if layout is None or len(layout) != len(output):
        raise AdapterMismatchError(
            f"the {len(output)} outputs of {type(block).__name__} cannot be mapped to its inputs; add an entry "
            "to hicache_sdk.granularity.OUTPUT_LAYOUTS (also hicache_sdk.adapters.generic.OUTPUT_LAYOUTS) or use "
            "an adapter written for this model"
        )
    return layout


class _Arguments:
    """Binds a block's call arguments by name, with the signature of its class's forward."""

    def __init__(self) -> None:
        self._signature: inspect.Signature | None = None

    def __call__(self, block: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        if self._signature is None:  # the class's forward: a patched instance forward may take (*args, **kwargs)
            self._signature = inspect.signature(type(block).forward)
        return dict(self._signature.bind_partial(block, *args, **kwargs).arguments)


def _outputs(output: Any) -> list[Any]:
    return [output] if isinstance(output, torch.Tensor) else list(output)


def _rebuilt(names: tuple[str | None, ...], values: dict[str, Any]) -> Any:
    outputs = [None if name is None else values[name] for name in names]
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _image_stream(names: tuple[str | None, ...]) -> str | None:
    return "hidden_states" if "hidden_states" in names else names[0]


def residual_forward(
    runtime: Runtime,
    key: str,
    index: int,
    layouts: dict[str, tuple[str | None, ...]],
    inner: BlockForward | None = None,
    *,
    switchable: bool = False,
) -> BlockForward:
    """The forward of a block served as one unit: its residual per stream (output minus input).

    ``inner`` is the forward the adapter installed on the block (its units run unserved within);
    ``None`` calls the block's own. With ``switchable`` the block is one unit only when the memory
    plan says so (:meth:`Runtime.is_coarse`), else ``inner`` serves it and its output layout is
    noted for the planner. A ``None`` entry in the recorded layout is an output the block returns
    as ``None`` (e.g. the text stream of SD3's last block); a forecast returns ``None`` there too.
    """
    arguments = _Arguments()

    def forward(block: torch.nn.Module, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        def call() -> Any:
            return original(*args, **kwargs) if inner is None else inner(block, original, *args, **kwargs)

        if switchable and not runtime.is_coarse(key):
            output = runtime.measured(key, call)
            if runtime.current is not None and runtime.planner is not None:
                runtime.note_block_layout(key, [v for v in _outputs(output) if v is not None])
            return output
        inputs = arguments(block, args, kwargs)
        computed: list[Any] = []

        def compute() -> tuple[torch.Tensor, ...]:
            with runtime.passthrough():
                output = call()
            computed.append(output)
            outputs = _outputs(output)
            layout = output_layout(block, output)
            layouts[key] = tuple(None if value is None else name for name, value in zip(layout, outputs, strict=True))
            residuals = []
            for name, value in zip(layout, outputs, strict=True):
                if value is None:
                    continue
                source = inputs.get(name)
                if isinstance(source, torch.Tensor):
                    source = runtime.sharded_like(source, value)
                if not isinstance(source, torch.Tensor) or source.shape != value.shape:
                    raise AdapterMismatchError(
                        f"{type(block).__name__} output {name!r} of shape {tuple(value.shape)} has no input "
                        "of the same shape to form a residual with"
                    )
                residuals.append(value - source)
            return tuple(residuals)

        residuals = runtime.unit(key, compute, streams=None, block=index, kind="block")
        names = layouts[key]
        if computed:  # the block ran: return its exact output
            output = computed[0]
            outputs = _outputs(output)
        else:
            rebuilt = iter(residuals)
            outputs = [None if name is None else _plus(runtime, inputs[name], next(rebuilt)) for name in names]
            output = outputs[0] if len(outputs) == 1 else tuple(outputs)
        image = _image_stream(names)
        if image is not None and isinstance(inputs.get(image), torch.Tensor):
            runtime.block(index, inputs[image], outputs[names.index(image)])
        return output

    return forward


def _plus(runtime: Runtime, source: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``source + residual``, with ``source`` this process's share when ``residual`` is a share."""
    return runtime.sharded_like(source, residual) + residual


@attrs.define
class _RangeState:
    """What the blocks of one range share within a step."""

    forecasting: bool = False
    inputs: dict[str, torch.Tensor] = attrs.field(factory=dict)  # the range's input streams, by name
    previous: dict[str, torch.Tensor] = attrs.field(factory=dict)  # the last block's outputs, by name
    streams: tuple[str, ...] = ()  # names of the residual streams, in the unit's order


def range_forwards(
    runtime: Runtime, blocks: list[tuple[str, torch.nn.Module]], first: int, stop: int
) -> list[tuple[str, torch.nn.Module, BlockForward]]:
    """Forwards that serve blocks ``first .. stop-1`` (in run order) as one cumulative-residual unit.

    On a step that computes, every block runs and, block to block, its inputs must be the
    previous block's outputs themselves: a model that changes them in between (ControlNet
    residuals added between blocks) raises :class:`~hicache_sdk.errors.AdapterMismatchError`,
    as the range's residual would count those changes twice on forecast steps.
    """
    key = f"{blocks[first][0]}..{blocks[stop - 1][0]}"
    shared = _RangeState()
    layouts: dict[str, tuple[str | None, ...]] = {}
    forwards = []
    for position in range(first, stop):
        name, module = blocks[position]
        forwards.append((name, module, _range_forward(runtime, key, name, position, first, stop, shared, layouts)))
    return forwards


def _range_forward(
    runtime: Runtime,
    key: str,
    name: str,
    position: int,
    first: int,
    stop: int,
    shared: _RangeState,
    layouts: dict[str, tuple[str | None, ...]],
) -> BlockForward:
    arguments = _Arguments()

    def forward(block: torch.nn.Module, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        inputs = arguments(block, args, kwargs)
        tensors = {n: v for n, v in inputs.items() if isinstance(v, torch.Tensor)}
        if position == first:
            shared.inputs, shared.previous, shared.forecasting = tensors, {}, False
            served = runtime.open_unit(key, None, streams=None, block=first, kind="range")
            if served is not None:
                shared.forecasting = True
                values = dict(tensors)
                values.update({n: tensors[n] + r for n, r in zip(shared.streams, served, strict=True)})
                return _rebuilt(layouts[name], values)
        elif shared.forecasting:  # the range's output is already out: pass the inputs through
            return _rebuilt(layouts[name], tensors)
        else:
            for stream, value in shared.previous.items():
                if stream in tensors and tensors[stream] is not value:
                    raise AdapterMismatchError(
                        f"units='range' needs each block of the range to receive the previous block's outputs "
                        f"as they are, but {stream!r} changed before {name} (the model adds something between "
                        "blocks, e.g. ControlNet residuals): use units='block'"
                    )
        with runtime.passthrough():
            output = original(*args, **kwargs)
        outputs = _outputs(output)
        layout = output_layout(block, output)
        layouts[name] = tuple(None if v is None else n for n, v in zip(layout, outputs, strict=True))
        shared.previous = {n: v for n, v in zip(layout, outputs, strict=True) if v is not None}
        image = _image_stream(layouts[name])
        if image is not None and image in tensors and image in shared.previous:
            runtime.block(position, tensors[image], shared.previous[image])
        if position == stop - 1:
            streams = tuple(
                n for n, v in shared.previous.items() if n in shared.inputs and shared.inputs[n].shape == v.shape
            )
            if not streams:
                raise AdapterMismatchError(
                    f"units='range': the output of {name} has no stream shaped like the range's input"
                )
            shared.streams = streams
            runtime.close_unit(key, [shared.previous[n] - shared.inputs[n] for n in streams])
        return output

    return forward
