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


# --------------------------------------------------------------------------- oracles on non-trivial inputs
# Each test below compares a metric with an independent computation on inputs where the likely
# mistakes (relative L1 for L2, the wrong peak, pooled instead of per-image PSNR, sample covariance,
# the wrong window, a commuting-matrix shortcut in the Frechet cross term) change the value by far
# more than the tolerance; the margins are asserted too, so the inputs cannot silently degenerate.


def _structured_pair() -> tuple[np.ndarray, np.ndarray]:
    """Four digit-like 32x32 images (a blob on a shaded background, range 0.05..0.80, never 1) and
    noisy copies, the noise 0.01, 0.03, 0.1 and 0.2 so that the images' errors differ."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    references, samples = [], []
    for k, noise in enumerate((0.01, 0.03, 0.1, 0.2)):
        cx, cy = rng.uniform(0.3, 0.7, size=2)
        reference = 0.1 + 0.7 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.04) + 0.05 * np.sin(6 * xx + k)
        references.append(reference)
        samples.append(np.clip(reference + noise * rng.normal(size=reference.shape), 0.0, 1.0))
    return np.stack(samples)[:, None], np.stack(references)[:, None]


def test_relative_l2_matches_numpy_and_is_not_l1() -> None:
    sample, reference = _structured_pair()
    expected = np.sqrt(((sample - reference) ** 2).sum()) / np.sqrt((reference**2).sum())  # by hand, whole batch
    relative_l1 = np.abs(sample - reference).sum() / np.abs(reference).sum()
    per_image = np.mean([np.linalg.norm(s - r) / np.linalg.norm(r) for s, r in zip(sample, reference, strict=True)])
    # margin: L1 is 21% below L2 here, the mean of per-image ratios 21% too; tolerance 1e-9 relative
    assert abs(relative_l1 - expected) / expected > 0.2
    assert abs(per_image - expected) / expected > 0.2
    assert relative_l2(torch.from_numpy(sample), torch.from_numpy(reference)) == pytest.approx(expected, rel=1e-9)
    # float32 inputs are measured in float64: the same value to float32 rounding of the inputs
    value32 = relative_l2(torch.from_numpy(sample).float(), torch.from_numpy(reference).float())
    assert value32 == pytest.approx(expected, rel=1e-5)


def test_psnr_matches_numpy_per_image_with_peak_one() -> None:
    sample, reference = _structured_pair()
    mse = ((sample - reference) ** 2).reshape(len(sample), -1).mean(axis=1)
    expected = np.mean(10 * np.log10(1.0 / mse))  # by hand: peak = data_range = 1, mean of per-image PSNRs
    pooled = 10 * np.log10(1.0 / mse.mean())
    peak_from_image = np.mean(10 * np.log10(reference.reshape(len(reference), -1).max(axis=1) ** 2 / mse))
    # margins: PSNR of the pooled MSE is 6.4 dB lower, the image's max as peak (0.80 here) 2.2 dB lower,
    # a peak of 255 48 dB higher; tolerance 1e-9 dB
    assert expected - pooled > 6.0
    assert expected - peak_from_image > 2.0
    s, r = torch.from_numpy(sample), torch.from_numpy(reference)
    assert psnr(s, r) == pytest.approx(expected, abs=1e-9)
    # data_range scales the peak: exactly 20 log10(2) = 6.02 dB more for a range of 2
    assert psnr(s, r, data_range=2.0) == pytest.approx(expected + 20 * np.log10(2.0), abs=1e-9)


def test_ssim_matches_scikit_image_on_structured_images() -> None:
    # scikit-image's definition matches ours with gaussian_weights=True, sigma=1.5,
    # use_sample_covariance=False (Wang et al. 2004: Gaussian window, K1 = 0.01, K2 = 0.03, population
    # covariances, a border of one window radius (5 px) cropped; the cropped mean never reads padding)
    sample, reference = _structured_pair()

    def skimage_ssim(**options: object) -> float:
        return float(
            np.mean([structural_similarity(r[0], s[0], **options) for s, r in zip(sample, reference, strict=True)])
        )

    expected = skimage_ssim(data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    sample_covariance = skimage_ssim(data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=True)
    uniform_window = skimage_ssim(data_range=1.0)  # 7x7 uniform window, sample covariance
    wrong_range = skimage_ssim(data_range=255.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    # margins: sample covariances move it by 3.4e-4, the uniform window by 4.8e-5, a range of 255 by 0.4;
    # tolerance 1e-9
    assert abs(sample_covariance - expected) > 1e-4
    assert abs(uniform_window - expected) > 1e-5
    assert abs(wrong_range - expected) > 0.1
    assert 0.3 < expected < 0.9  # far from both trivial ends
    assert ssim(torch.from_numpy(sample), torch.from_numpy(reference)) == pytest.approx(expected, abs=1e-9)


def test_frechet_distance_matches_scipy_sqrtm() -> None:
    import scipy.linalg

    rng = np.random.default_rng(3)
    a = rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5)) + rng.normal(size=5)
    b = rng.normal(size=(150, 5)) @ rng.normal(size=(5, 5)) + rng.normal(size=5)  # covariances do not commute
    mu = a.mean(axis=0) - b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)

    def formula(ca: np.ndarray, cb: np.ndarray, cross: np.ndarray) -> float:
        return float(mu @ mu + np.trace(ca) + np.trace(cb) - 2.0 * np.trace(cross))

    # the usual FID formula: tr sqrtm(S_a S_b) (scipy's Schur-based square root of a non-symmetric matrix)
    expected = formula(cov_a, cov_b, scipy.linalg.sqrtm(cov_a @ cov_b).real)
    shortcut = formula(cov_a, cov_b, scipy.linalg.sqrtm(cov_a).real @ scipy.linalg.sqrtm(cov_b).real)
    ca0, cb0 = np.cov(a, rowvar=False, ddof=0), np.cov(b, rowvar=False, ddof=0)
    biased = formula(ca0, cb0, scipy.linalg.sqrtm(ca0 @ cb0).real)
    # margins: tr(S_a^1/2 S_b^1/2) as cross term moves it by 5.7%, ddof=0 covariances by 0.45%, dropping the
    # mean term by 31%; tolerance 1e-8 relative
    assert abs(shortcut - expected) / expected > 0.05
    assert abs(biased - expected) / expected > 4e-3
    assert (mu @ mu) / expected > 0.3
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_closed_form_on_exactly_diagonal_covariances() -> None:
    # Sylvester-Hadamard rows: columns 1..4 of H_8 are orthogonal with zero mean, so the sample
    # covariance of (H[:, 1:5] * scale + mean) is exactly diag(scale^2 * 8 / 7): no scipy needed, and
    # the distance is |mu_a - mu_b|^2 + sum_i (sd_a,i - sd_b,i)^2 in closed form
    h = np.array([[1.0]])
    for _ in range(3):
        h = np.block([[h, h], [h, -h]])
    columns = h[:, 1:5]
    scale_a, scale_b = np.array([1.0, 2.0, 0.5, 3.0]), np.array([2.0, 0.5, 0.5, 1.0])
    mean_a, mean_b = np.array([0.0, 1.0, -1.0, 2.0]), np.array([1.0, 1.0, 0.0, 0.0])
    a, b = columns * scale_a + mean_a, columns * scale_b + mean_b
    sd_a, sd_b = scale_a * np.sqrt(8 / 7), scale_b * np.sqrt(8 / 7)
    expected = float(((mean_a - mean_b) ** 2).sum() + ((sd_a - sd_b) ** 2).sum())  # 6 + 8/7 * 7.25 = 14.286
    # margin: the cross term alone, 2 tr((S_a^1/2 S_b S_a^1/2)^1/2) = 2 * 8/7 * 6.25 = 14.3; tolerance 1e-9
    assert frechet_distance(a, b) == pytest.approx(expected, abs=1e-9)
    assert expected == pytest.approx(6 + 8 / 7 * 7.25)
