"""Fit forecast state into a memory budget: per unit a storage format and an offload, per block a granularity.

The planner works once the first step has run (every unit's output shapes are then known; until
then anchors are held as accurately as the budget allows, at worst in fp8 with one scale per tensor). It walks a list of
*levels*, from the one that loses least accuracy to the one that saves most memory:

======================  ============================================================
level                   what it holds
======================  ============================================================
``native``              every unit's ladder in the features' dtype
``bf16``                every order in bfloat16
``bf16, offloaded``     as ``bf16``, held in host memory and prefetched (GPU only)
``bf16+fp8``            ``D^0`` in bfloat16, higher orders in fp8 (e4m3, per-row scales)
``block bf16+fp8``      each block as one residual unit (``units="block"``), ``bf16+fp8``
``fp8``                 every order in fp8 (e4m3, per-row scales)
``block fp8``           each block as one residual unit, fp8
``fp8 per tensor``      every order in fp8 with one scale per tensor (narrow units:
                        a row's scale costs 4 bytes)
``block fp8 per t.``    each block as one residual unit, fp8 per tensor
======================  ============================================================

The order is the planner's error model: storage precision first (the unit roundoff of the
format: float32 2^-24, bfloat16 2^-8, fp8 e4m3 2^-4 of each row's scale; ``D^0``, the term every
forecast carries whole, keeps bf16 longest), then granularity (a block's residual skips the gates
its modules' units keep). The measured rel. L2 of each level on the embedded digits model is in
the benchmarks ("Memory"); there the levels lose little accuracy down to ``block bf16+fp8``.
The plan takes the first level whose predicted bytes fit the budget, then moves back to the
level before it as many planning atoms (a unit, or a block with its units) as still fit, smallest
first. Offloaded levels appear only when the model runs on an accelerator; block levels only
when the policy and the adapter allow whole-block units. A budget that no level meets raises
:class:`~hicache_sdk.errors.InvalidParameterError` naming the smallest budget that fits.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import torch

from .errors import InvalidParameterError
from .runtime import PREFETCH_UNITS
from .state import ContextState
from .storage import LadderFormat, LadderStorage, parse_ladder_format

__all__ = ["LEVELS", "Level", "MemoryPlan", "MemoryPlanner", "format_bytes", "parse_bytes"]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}


def parse_bytes(value: Any, name: str = "memory_budget") -> int:
    """Bytes from a positive integer or a string such as ``"2GiB"``, ``"512 MB"``, ``"1.5G"`` (``G`` = GiB)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidParameterError(f"{name} must be a number of bytes or a string such as '2GiB', got {value!r}")
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise InvalidParameterError(
                f"{name} {value!r} is not a size; give bytes (an int) or a number with one of the units "
                "B, KB, MB, GB, TB (powers of 1000), KiB, MiB, GiB, TiB or K, M, G, T (powers of 1024)"
            )
        number = float(match.group(1)) * _UNITS[unit]
    else:
        number = float(value)
    if not math.isfinite(number) or number < 1:
        raise InvalidParameterError(f"{name} must be at least one byte, got {value!r}")
    return int(number)


def format_bytes(count: float) -> str:
    """``count`` bytes, readable (``"91.2 MiB"``)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}"
    return f"{int(count)} B"


def _supported(level: Level, device: torch.device) -> bool:
    """Whether ``device`` holds the level's format (fp8 is missing on some devices and builds)."""
    if level.format is None:
        return True
    try:
        parse_ladder_format(level.format).check_device(device)
    except InvalidParameterError:
        return False
    return True


def _native_format(outputs: Sequence[torch.Tensor]) -> LadderFormat | None:
    """The format of the outputs' own dtype (``None`` for mixed dtypes or one no format holds)."""
    dtypes = {t.dtype for t in outputs}
    if len(dtypes) != 1:
        return None
    try:
        return parse_ladder_format(dtypes.pop())
    except InvalidParameterError:
        return None


@attrs.frozen
class Level:
    """One way to hold every planning atom: a ladder format, whole-block units or not, offloaded or not."""

    name: str
    format: str | None  # None: the features' dtype
    coarse: bool = False
    offload: bool = False


#: The levels, most accurate first (the module's docstring gives the error model behind the order).
LEVELS: tuple[Level, ...] = (
    Level("native", None),
    Level("bf16", "bf16"),
    Level("bf16, offloaded", "bf16", offload=True),
    Level("bf16+fp8", "bf16+fp8"),
    Level("block bf16+fp8", "bf16+fp8", coarse=True),
    Level("fp8", "fp8"),
    Level("block fp8", "fp8", coarse=True),
    Level("fp8 per tensor", "fp8:tensor"),
    Level("block fp8 per tensor", "fp8:tensor", coarse=True),
)


@attrs.frozen
class MemoryPlan:
    """What the planner chose.

    Attributes:
        budget: the declared budget in bytes.
        storages: unit key -> how its ladders are held.
        coarse: block key -> how the block's residual unit is held, for the blocks served as one unit.
        unseen: how units not seen when planning are held (the cheapest storage of the plan) until
            the runtime plans again.
        predicted_bytes: forecast-state bytes on the compute device at the peak of a generation (the plan's,
            or the first step's before the plan, if more).
        levels: level name -> number of planning atoms at that level.
        contexts: the contexts (CFG branches) the plan counted.
    """

    budget: int
    storages: Mapping[str, LadderStorage | None]
    coarse: Mapping[str, LadderStorage | None]
    unseen: LadderStorage | None
    predicted_bytes: int
    levels: Mapping[str, int]
    contexts: int = 1

    def storage_of(self, key: str) -> LadderStorage | None:
        """The storage of unit ``key``."""
        if key in self.storages:
            return self.storages[key]
        return self.coarse.get(key, self.unseen)

    @property
    def offloads(self) -> bool:
        """Whether some unit is held on an offload device."""
        held = [*self.storages.values(), *self.coarse.values(), self.unseen]
        return any(s is not None and s.offload is not None for s in held)

    @property
    def levels_used(self) -> str:
        """E.g. ``"2 x bf16+fp8, 2 x block bf16+fp8"`` (planning atoms per level)."""
        return ", ".join(f"{count} x {name}" for name, count in self.levels.items() if count)

    def describe(self) -> str:
        """One line: the levels used and the predicted bytes against the budget."""
        return f"{self.levels_used}; predicted {format_bytes(self.predicted_bytes)} of {format_bytes(self.budget)}"


@attrs.define
class _Atom:
    """A unit, or a block with its units: what the planner moves between levels as one."""

    key: str
    units: list[tuple[str, list[tuple[tuple[int, ...], torch.dtype]]]]  # unit key -> stream shapes and dtypes
    block: tuple[tuple[tuple[int, ...], torch.dtype], ...] | None  # the block's residual streams, if coarse allowed


class MemoryPlanner:
    """Chooses a :class:`MemoryPlan` under ``budget`` bytes for ladders of ``max_order``.

    Args:
        budget: bytes of forecast state allowed on the compute device (every context together).
        max_order: the policy's highest ladder order.
        coarse: whether blocks may be served as one residual unit (policy and adapter allow it).
        offload: the device ladders may be offloaded to (``None``: no offload).
        prefetch_units: units fetched ahead of use when offloaded (the device bytes of offloaded levels).
        levels: the levels to walk, most accurate first (default :data:`LEVELS`); those that need
            coarse units or an offload device are dropped when not allowed.
        device: the model's device: levels whose format it cannot hold are left out.
    """

    def __init__(
        self,
        budget: int,
        max_order: int,
        *,
        coarse: bool = False,
        offload: torch.device | None = None,
        prefetch_units: int = PREFETCH_UNITS,
        levels: Sequence[Level] = LEVELS,
        device: torch.device | None = None,
    ) -> None:
        self.budget = budget
        self.max_order = max_order
        self.coarse = coarse
        self.offload = offload
        self.prefetch_units = prefetch_units
        self.levels = tuple(
            level
            for level in levels
            if (coarse or not level.coarse)
            and (offload is not None or not level.offload)
            and (device is None or _supported(level, device))
        )
        plain = [level for level in self.levels if not level.coarse and not level.offload]
        if not plain:
            raise InvalidParameterError(f"memory_budget: no storage format of the planner works on {device}")
        # first anchors fall back to the fewest bytes
        cheapest = self._storage(plain[-1]) or LadderStorage(parse_ladder_format("fp32"))
        self.provisional = attrs.evolve(cheapest, compact=True)  # held order by order: D^0 only at first

    def first_storage(self, outputs: Sequence[torch.Tensor], held: int) -> LadderStorage | None:
        """Storage of a unit first recorded before the plan exists, when ``held`` bytes are already held.

        The most accurate level whose ``D^0`` still fits the budget (offload and block levels aside),
        else the cheapest: with a generous budget the first step is stored as without one.
        """
        for level in self.levels:
            if level.coarse or level.offload:
                continue
            storage = self._storage(level)
            # held order by order (allocated as reached): the first step holds D^0 only
            fmt = storage.format if storage is not None else _native_format(outputs)
            if fmt is None:
                continue
            if held + sum(fmt.of(0).nbytes(tuple(t.shape)) for t in outputs) <= self.budget:
                return LadderStorage(fmt, compact=True)
        return self.provisional

    def _storage(self, level: Level) -> LadderStorage | None:
        fmt = None if level.format is None else parse_ladder_format(level.format)
        offload = self.offload if level.offload else None
        return None if fmt is None and offload is None else LadderStorage(fmt, offload)

    def _bytes(self, atom: _Atom, level: Level) -> int:
        storage = self._storage(level) or LadderStorage()
        streams = (
            list(atom.block)
            if level.coarse and atom.block is not None
            else [stream for _, streams in atom.units for stream in streams]
        )
        return sum(storage.nbytes(shape, dtype, self.max_order) for shape, dtype in streams)

    def _device_bytes(self, sizes: list[int], offloaded: list[bool]) -> int:
        held = sum(size for size, off in zip(sizes, offloaded, strict=True) if not off)
        window = sorted((size for size, off in zip(sizes, offloaded, strict=True) if off), reverse=True)
        return held + sum(window[: self.prefetch_units + 1])

    def plan(
        self,
        contexts: Iterable[ContextState],
        block_layouts: Mapping[str, tuple[tuple[tuple[int, ...], torch.dtype], ...]],
        include: Callable[[str], bool] | None = None,
    ) -> MemoryPlan:
        """The plan for the units the first step showed (``contexts``), given each block's output layout.

        ``include`` selects the units to plan by key (the running denoiser's; default: all).

        Raises:
            InvalidParameterError: no level fits the budget (the message names the smallest budget that does).
        """
        contexts = list(contexts)
        extra = sum(c.nbytes - sum(u.nbytes for u in c.units.values()) for c in contexts)  # the policy's own state
        first_step = sum(c.nbytes for c in contexts)
        atoms = self._atoms(contexts, block_layouts, include)
        copies = max(len(contexts), 1)
        sizes = {level: [self._bytes(atom, level) * copies for atom in atoms] for level in self.levels}

        def total(chosen: list[Level]) -> int:
            return extra + self._device_bytes(
                [sizes[level][i] for i, level in enumerate(chosen)], [level.offload for level in chosen]
            )

        fit = next((i for i, level in enumerate(self.levels) if total([level] * len(atoms)) <= self.budget), None)
        # the first step held the cheapest storage at worst (see first_storage); its own bytes count too
        least_first = sum(self.provisional.nbytes(s, d, 0) for atom in atoms for _, st in atom.units for s, d in st)
        smallest = max(min(total([level] * len(atoms)) for level in self.levels), least_first * copies + extra)
        if fit is None or first_step > self.budget:
            raise InvalidParameterError(
                f"memory_budget {format_bytes(self.budget)} ({self.budget} bytes) cannot hold the forecast state of "
                f"this model at these shapes; the smallest plan needs {format_bytes(smallest)}: give memory_budget >= "
                f"{smallest}, a lower max_order, or lighter units (units='output' holds only the model output)"
            )
        chosen = [self.levels[fit]] * len(atoms)
        if fit > 0:  # move atoms back to the better level while the budget holds, smallest first
            better = self.levels[fit - 1]
            for i in sorted(range(len(atoms)), key=lambda i: sizes[better][i]):
                trial = chosen.copy()
                trial[i] = better
                if total(trial) <= self.budget:
                    chosen = trial
        return self._plan(atoms, chosen, max(total(chosen), first_step), len(contexts))

    def _atoms(
        self,
        contexts: list[ContextState],
        block_layouts: Mapping[str, tuple[tuple[tuple[int, ...], torch.dtype], ...]],
        include: Callable[[str], bool] | None,
    ) -> list[_Atom]:
        units: dict[str, list[tuple[tuple[int, ...], torch.dtype]]] = {}
        for ctx in contexts:
            for key, unit in ctx.units.items():
                if include is not None and not include(key):
                    continue
                units.setdefault(key, [(tuple(shape), dtype) for shape, dtype, _ in unit.layout])
        atoms: dict[str, _Atom] = {}
        for key, streams in units.items():
            block = next((b for b in block_layouts if key.startswith(b + ".")), None) if self.coarse else None
            name = block or key
            atom = atoms.setdefault(name, _Atom(name, [], block_layouts[block] if block is not None else None))
            atom.units.append((key, streams))
        return list(atoms.values())

    def _plan(self, atoms: list[_Atom], chosen: list[Level], predicted: int, contexts: int) -> MemoryPlan:
        storages: dict[str, LadderStorage | None] = {}
        coarse: dict[str, LadderStorage | None] = {}
        for atom, level in zip(atoms, chosen, strict=True):
            storage = self._storage(level)
            if level.coarse and atom.block is not None:
                coarse[atom.key] = storage
            else:
                storages.update({key: storage for key, _ in atom.units})
        counts = {level.name: sum(1 for c in chosen if c is level) for level in self.levels}
        cheapest = max(chosen, key=self.levels.index) if chosen else self.levels[-1]
        return MemoryPlan(self.budget, storages, coarse, self._storage(cheapest), predicted, counts, contexts)
