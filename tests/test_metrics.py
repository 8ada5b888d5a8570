"""Bench metrics against independent implementations (scikit-image) and known values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from hicache_sdk.bench.metrics import frechet_distance, psnr, relative_l2, ssim


def _pair(seed: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    reference = torch.rand(4, 1, 32, 32, generator=g, dtype=torch.float64)
    sample = (reference + noise * torch.randn(reference.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return sample, reference


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 10_000), noise=st.floats(0.001, 0.5))
def test_ssim_matches_scikit_image(seed: int, noise: float) -> None:
    sample, reference = _pair(seed, noise)
    expected = np.mean(
        [
            structural_similarity(
                reference[i, 0].numpy(),
                sample[i, 0].numpy(),
                data_range=1.0,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
            )
            for i in range(len(sample))
        ]
    )
    assert ssim(sample, reference) == pytest.approx(expected, abs=1e-9)


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 10_000), noise=st.floats(0.001, 0.5))
def test_psnr_matches_scikit_image(seed: int, noise: float) -> None:
    sample, reference = _pair(seed, noise)
    expected = np.mean(
        [peak_signal_noise_ratio(reference[i].numpy(), sample[i].numpy(), data_range=1.0) for i in range(len(sample))]
    )
    assert psnr(sample, reference) == pytest.approx(expected, rel=1e-9)


def test_identical_images() -> None:
    _, reference = _pair(0, 0.0)
    assert psnr(reference, reference) == math.inf
    assert ssim(reference, reference) == pytest.approx(1.0)
    assert relative_l2(reference, reference) == 0.0


def test_relative_l2_scales() -> None:
    reference = torch.ones(2, 1, 4, 4)
    assert relative_l2(1.1 * reference, reference) == pytest.approx(0.1)


@given(seed=st.integers(0, 10_000), shift=st.floats(-3, 3))
def test_frechet_distance_of_shifted_features_is_squared_shift(seed: int, shift: float) -> None:
    features = np.random.default_rng(seed).normal(size=(40, 6))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-8)
    # same covariance, means apart by `shift` in every coordinate: distance = d * shift^2
    assert frechet_distance(features, features + shift) == pytest.approx(6 * shift**2, abs=1e-6)


def test_frechet_distance_of_gaussians_matches_closed_form() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20_000, 2))
    b = rng.normal(size=(20_000, 2)) * 2.0  # covariance 4 I: distance 2 * (1 + 4 - 2 * 2) = 2
    assert frechet_distance(a, b) == pytest.approx(2.0, abs=0.1)


def test_frechet_distance_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="feature arrays"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
