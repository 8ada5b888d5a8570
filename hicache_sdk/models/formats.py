"""What a weights file holds: the format tags of the embedded models' safetensors files.

Every file written by this package names its format in its metadata: the DiTs under a key equal
to the format (its value is the config JSON, the only entry), the classifiers under ``format``.
Loaders read the tag first, so a file of another model is refused by name rather than with a
list of mismatched tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from os import PathLike
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from ..errors import HicacheError

T = TypeVar("T")

__all__ = ["FORMATS", "WeightsError", "describe_format", "read_tagged_config", "save_tagged", "weights_format"]

DIGITS_DIT = "hicache-digits-flux/1"
VIDEO_DIT = "hicache-digits-wan-video/1"
DIGITS_CLASSIFIER = "hicache-digits-classifier/1"
FRAME_CLASSIFIER = "hicache-video-frame-classifier/1"

FORMATS: dict[str, str] = {
    DIGITS_DIT: "the digits DiT (load_digits_model; hicache bench --model digits)",
    VIDEO_DIT: "the video DiT (load_video_model; hicache bench --model video)",
    DIGITS_CLASSIFIER: "the digit classifier (load_digit_classifier)",
    FRAME_CLASSIFIER: "the video-frame classifier (load_frame_classifier)",
}
"""Format tag -> what the file holds and how to load it."""

_KEYED = (DIGITS_DIT, VIDEO_DIT)  # formats whose tag is the metadata key


class WeightsError(HicacheError, RuntimeError):
    """A weights file is missing, unreadable or does not match the model it should fill."""


def describe_format(tag: str | None) -> str:
    """A phrase naming what a file of format ``tag`` holds (``None``: no known tag)."""
    if tag is None:
        return "no hicache-sdk format tag (not a file written by this package)"
    return FORMATS.get(tag, f"an unknown format {tag!r}")


def weights_format(file: Path) -> tuple[str | None, dict[str, str]]:
    """``(format tag or None, metadata)`` of a safetensors file; :class:`WeightsError` if unreadable."""
    from safetensors import safe_open

    if not file.is_file():
        raise WeightsError(f"weights file {file} does not exist")
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises several error types for bad files
        raise WeightsError(f"weights file {file} is unreadable: {exc}") from exc
    keyed = [tag for tag in _KEYED if tag in metadata]
    if keyed:
        return keyed[0], metadata
    tag = metadata.get("format")
    return (None if tag in _KEYED else tag), metadata  # a DiT tag without its config is no DiT file


def save_tagged(model: nn.Module, path: str | PathLike[str], tag: str, config_json: str) -> None:
    """Write ``model``'s weights (fp32) with the single metadata entry ``{tag: config_json}``.

    One entry keeps the bytes of a re-trained file identical (safetensors writes metadata in hash order).
    """
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={tag: config_json})


def read_tagged_config(file: Path, tag: str, kind: str, parse: Callable[[str], T]) -> T:
    """The config a DiT file of format ``tag`` holds, parsed by ``parse``.

    Raises :class:`WeightsError` naming what the file holds when it is not a ``kind`` file, or when
    its config does not parse.
    """
    held, metadata = weights_format(file)
    if held != tag:
        raise WeightsError(f"weights file {file} is not a {kind} file: it holds {describe_format(held)}")
    try:
        return parse(metadata[tag])
    except (ValueError, TypeError) as exc:
        raise WeightsError(f"weights file {file} has an invalid config: {exc}") from exc
