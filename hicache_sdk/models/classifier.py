"""A small CNN that recognises the 32x32 digits, used to score generated samples.

All public entry points take images in ``[0, 1]`` (what :func:`~.digits.sample`
returns), shape ``(n, 1, 32, 32)``. :meth:`DigitClassifier.features` gives the
64-d penultimate activations, for a Frechet distance between image sets.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .digits import default_weights_path, read_weights
from .formats import DIGITS_CLASSIFIER, FRAME_CLASSIFIER, WeightsError, describe_format, weights_format

__all__ = [
    "FEATURE_DIM",
    "DigitClassifier",
    "build_digit_classifier",
    "load_digit_classifier",
    "load_frame_classifier",
    "save_digit_classifier",
]

FEATURE_DIM = 64
CLASSIFIER_WEIGHTS = "weights/digits_classifier.safetensors"
FRAME_CLASSIFIER_WEIGHTS = "weights/video_frame_classifier.safetensors"


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2))


class DigitClassifier(nn.Module):
    """Three conv blocks (32 -> 4 px), a 64-d feature layer and a 10-way linear head.

    ``forward`` takes images in ``[0, 1]`` and returns logits ``(n, 10)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_block(1, 32), _conv_block(32, 64), _conv_block(64, 64), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(64 * 4 * 4, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, 10)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        return self.embed(self.body(images * 2.0 - 1.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self._embed(images))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(n, 64)`` of images in ``[0, 1]``."""
        return self._embed(self._as_input(images))

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted digit ``(n,)`` (int64) of images in ``[0, 1]``."""
        return self.forward(self._as_input(images)).argmax(dim=1)

    def _as_input(self, images: torch.Tensor) -> torch.Tensor:
        param = next(self.parameters())
        return images.to(device=param.device, dtype=param.dtype)


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 32, 32):
        raise ValueError(f"expected images of shape (n, 1, 32, 32), got {tuple(images.shape)}")


def build_digit_classifier(seed: int = 0) -> DigitClassifier:
    """A classifier with random weights drawn from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DigitClassifier()


def save_digit_classifier(model: DigitClassifier, path: str | PathLike[str], *, frames: bool = False) -> None:
    """Write the classifier's weights (fp32, incl. batch-norm statistics) to safetensors.

    ``frames=True`` tags the file as the video-frame classifier (:func:`load_frame_classifier`).
    """
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(path), metadata={"format": FRAME_CLASSIFIER if frames else DIGITS_CLASSIFIER})


def load_digit_classifier(
    path: str | PathLike[str] | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DigitClassifier:
    """Load the digit classifier (shipped weights unless ``path`` is given), in eval mode, no grads."""
    file = Path(path) if path is not None else default_weights_path(CLASSIFIER_WEIGHTS)
    return _load(file, DIGITS_CLASSIFIER, device, dtype)


def load_frame_classifier(
    path: str | PathLike[str] | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DigitClassifier:
    """Load the classifier of the video model's frames (moving, turned, zoomed digits on a 32x32 canvas).

    Same network as the digit classifier, trained on frames of :mod:`.motion` clips; shipped weights
    unless ``path`` is given.
    """
    file = Path(path) if path is not None else default_weights_path(FRAME_CLASSIFIER_WEIGHTS)
    return _load(file, FRAME_CLASSIFIER, device, dtype)


def _load(file: Path, tag: str, device: torch.device | str, dtype: torch.dtype) -> DigitClassifier:
    held, _ = weights_format(file)
    if held != tag:
        raise WeightsError(f"weights file {file} is not {describe_format(tag)}: it holds {describe_format(held)}")
    model = DigitClassifier()
    tensors, _ = read_weights(file, {k: v.shape for k, v in model.state_dict().items()})
    model.load_state_dict(tensors, strict=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
