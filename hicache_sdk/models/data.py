"""The digits data set: scikit-learn's 8x8 ``load_digits()`` upscaled to 32x32.

Images are upscaled bilinearly and scaled to ``[-1, 1]`` (the diffusion model's
pixel range). The train / held-out split is a fixed permutation drawn from a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["IMAGE_SIZE", "DigitsSplit", "load_digit_images", "random_shift", "split_digits"]

IMAGE_SIZE = 32
"""Side of the square images, in pixels."""

_RAW_MAX = 16.0  # load_digits() pixel values lie in 0..16


@dataclass(frozen=True)
class DigitsSplit:
    """Train and held-out images ``(n, 1, 32, 32)`` in ``[-1, 1]`` with int64 labels ``(n,)``."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    heldout_images: torch.Tensor
    heldout_labels: torch.Tensor


def load_digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as ``(images (n, 1, 32, 32) in [-1, 1], labels (n,))``."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    small = torch.as_tensor(raw.images, dtype=torch.float32).unsqueeze(1) / _RAW_MAX
    big = F.interpolate(small, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = big.clamp(0.0, 1.0) * 2.0 - 1.0
    labels = torch.as_tensor(raw.target, dtype=torch.int64)
    return images, labels


def split_digits(seed: int = 0, heldout_fraction: float = 0.2) -> DigitsSplit:
    """Split the digits into train / held-out parts with a permutation drawn from ``seed``."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must lie in (0, 1), got {heldout_fraction}")
    images, labels = load_digit_images()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_heldout = round(len(labels) * heldout_fraction)
    held, train = order[:n_heldout], order[n_heldout:]
    return DigitsSplit(images[train], labels[train], images[held], labels[held])


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels per axis, filling with the background (-1)."""
    if max_shift <= 0:
        return images
    n, _, h, w = images.shape
    pad = F.pad(images, (max_shift,) * 4, value=-1.0)
    shifts = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    return torch.stack([pad[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(shifts.tolist())])
