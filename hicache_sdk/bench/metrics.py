"""Fidelity metrics of cached samples against full-compute samples (images in [0, 1])."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["frechet_distance", "psnr", "relative_l2", "ssim", "temporal_error"]


def relative_l2(sample: torch.Tensor, reference: torch.Tensor) -> float:
    """``||sample - reference|| / ||reference||`` over the whole batch."""
    return float((sample.double() - reference.double()).norm() / reference.double().norm())


def psnr(sample: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean over images of ``10 log10(data_range^2 / MSE)`` (``inf`` for identical images)."""
    diff = (sample.double() - reference.double()).flatten(1)
    mse = diff.pow(2).mean(dim=1)
    values = [math.inf if m == 0 else 10.0 * math.log10(data_range**2 / m) for m in mse.tolist()]
    return float(np.mean(values))


def _gaussian_window(sigma: float, truncate: float) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def ssim(
    sample: torch.Tensor,
    reference: torch.Tensor,
    data_range: float = 1.0,
    sigma: float = 1.5,
    truncate: float = 3.5,
) -> float:
    """Mean structural similarity (Wang et al. 2004) over images of shape ``(N, C, H, W)``.

    Gaussian window (``sigma`` 1.5, radius ``int(truncate * sigma + 0.5)``), ``K1 = 0.01``,
    ``K2 = 0.03``, population covariances, reflect padding and the border of one radius cropped
    before averaging: the conventions of ``skimage.metrics.structural_similarity`` with
    ``gaussian_weights=True, use_sample_covariance=False``.
    """
    x = sample.double().flatten(0, 1)[:, None]
    y = reference.double().flatten(0, 1)[:, None]
    g = _gaussian_window(sigma, truncate)
    radius = (len(g) - 1) // 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t, (radius, radius, radius, radius), mode="reflect")
        t = F.conv2d(t, g.view(1, 1, 1, -1))
        return F.conv2d(t, g.view(1, 1, -1, 1))

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    s = s[..., radius:-radius, radius:-radius]
    per_image = s.flatten(1).mean(dim=1).view(sample.shape[0], -1).mean(dim=1)
    return float(per_image.mean())


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``(n, d)``.

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)``, with the matrix
    square roots taken by symmetric eigendecomposition (no complex round-off).
    """
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or a.shape[1:] != b.shape[1:] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"expected two (n >= 2, d) feature arrays of equal d, got {a.shape} and {b.shape}")
    mu = a.mean(0) - b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrt_psd(cov_a)
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_cross = float(np.sqrt(np.clip(cross, 0.0, None)).sum())
    return float(mu @ mu + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_cross)


def temporal_error(sample: torch.Tensor, reference: torch.Tensor) -> float:
    """Temporal-consistency error of clips ``(N, C, F, H, W)``: ``||dS - dR|| / ||dR||``.

    ``dS`` and ``dR`` are the frame differences ``x[:, :, t + 1] - x[:, :, t]`` of the sample and
    of the reference, over the whole batch: 0 when the sample moves exactly as the reference
    does (even if both are offset by the same still error), larger as its motion flickers or
    lags. ``inf`` when the reference does not move at all but the sample does; ``nan`` for clips
    of fewer than two frames.
    """
    if sample.ndim != 5 or sample.shape != reference.shape:
        raise ValueError(
            f"expected two clips of shape (N, C, F, H, W), got {tuple(sample.shape)} and {tuple(reference.shape)}"
        )
    if sample.shape[2] < 2:
        return math.nan
    ds = sample.double().diff(dim=2)
    dr = reference.double().diff(dim=2)
    num, den = float((ds - dr).norm()), float(dr.norm())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den
