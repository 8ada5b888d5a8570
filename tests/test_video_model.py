"""Tests of the embedded video DiT: motion data, sampler, weights formats, training script, shipped weights."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hicache_sdk.errors import HicacheError, InvalidParameterError
from hicache_sdk.models import classifier as clf
from hicache_sdk.models import digits as dg
from hicache_sdk.models import formats as fm
from hicache_sdk.models import motion as mo
from hicache_sdk.models import video as vd
from hicache_sdk.models.data import load_digit_images, split_digits

CONFIG = vd.VideoConfig()
FRAMES, SIZE = CONFIG.frames, CONFIG.frame_size  # the shipped model's clip shape (8 frames of 16x16)
TRAINED = rf"trained on {FRAMES}-frame clips of {SIZE}x{SIZE} pixels"
SHIPPED_VIDEO = dg.default_weights_path(vd.VIDEO_WEIGHTS)
SHIPPED_FRAME_CLASSIFIER = dg.default_weights_path(clf.FRAME_CLASSIFIER_WEIGHTS)
DIGITS_DIT_FILE = dg.default_weights_path(dg.DIT_WEIGHTS)
DIGITS_CLASSIFIER_FILE = dg.default_weights_path(clf.CLASSIFIER_WEIGHTS)
needs_shipped = pytest.mark.skipif(
    not (SHIPPED_VIDEO.is_file() and SHIPPED_FRAME_CLASSIFIER.is_file()),
    reason="the shipped video weights are not trained yet",
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> vd.VideoModel:
    """A random-weight video model (seed 0) in eval mode."""
    return vd.build_video_model(seed=0).eval()


@pytest.fixture(scope="module")
def video_file(model: vd.VideoModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("video") / "video.safetensors"
    vd.save_video_model(model, path)
    return path


@pytest.fixture(scope="module")
def frame_classifier_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("frames") / "frames.safetensors"
    clf.save_digit_classifier(clf.build_digit_classifier(seed=2), path, frames=True)
    return path


@pytest.fixture(scope="module")
def digit_images() -> torch.Tensor:
    pytest.importorskip("sklearn")
    return load_digit_images()[0]


# ----------------------------------------------------------------------------- motion


def _mass_and_centre(clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per frame ``(n, F)``: pixel mass above the background and its centre ``(x, y)`` in pixels."""
    mass = clips[:, 0].double() + 1.0  # (n, F, H, W), background 0
    total = mass.sum((-1, -2))
    ys = torch.arange(clips.shape[-2], dtype=torch.float64)
    xs = torch.arange(clips.shape[-1], dtype=torch.float64)
    cy = (mass.sum(-1) * ys).sum(-1) / total
    cx = (mass.sum(-2) * xs).sum(-1) / total
    return total, cx, cy


def _disc(n: int, side: int = 32) -> torch.Tensor:
    """Images of a disc inscribed in the square (rotation-invariant), ``[-1, 1]``."""
    c = (torch.arange(side, dtype=torch.float32) + 0.5) / side * 2.0 - 1.0
    inside = (c[None, :] ** 2 + c[:, None] ** 2) <= 1.0
    return torch.where(inside, 1.0, -1.0).expand(n, 1, side, side).clone()


def _central_blob(n: int, side: int = 32) -> torch.Tensor:
    """A bright square over the central half of a dark image."""
    images = -torch.ones(n, 1, side, side)
    images[:, :, side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 1.0
    return images


def _kinds(n: int, kind: str) -> torch.Tensor:
    return torch.full((n,), mo.MOTIONS.index(kind))


@settings(max_examples=6)
@given(
    n=st.integers(1, 3),
    frames=st.integers(1, 9),
    size=st.sampled_from([8, 16, 32, 40]),
    seed=st.integers(0, 2**31),
    kinds=st.lists(st.integers(0, len(mo.MOTIONS) - 1), min_size=3, max_size=3),
)
def test_animate_shape_range_and_dark_corners(n: int, frames: int, size: int, seed: int, kinds: list[int]) -> None:
    images = _central_blob(n)
    clips = mo.animate(images, torch.tensor(kinds[:n]), frames, size, torch.Generator().manual_seed(seed))
    assert clips.shape == (n, 1, frames, size, size) and clips.dtype == torch.float32
    assert clips.min() >= -1.0 and clips.max() <= 1.0
    assert clips.max() > -1.0  # the digit is drawn
    # the content is the central half of a digit at most ~0.95 of the canvas side: the corners stay background
    corners = clips[..., [0, 0, -1, -1], [0, -1, 0, -1]]
    assert torch.equal(corners, torch.full_like(corners, -1.0))


def test_animate_of_real_digits_stays_in_range_with_dark_corners(digit_images: torch.Tensor) -> None:
    n = 64
    clips = mo.animate(digit_images[:n], torch.arange(n) % 4, FRAMES, SIZE, torch.Generator().manual_seed(5))
    assert clips.min() >= -1.0 and clips.max() <= 1.0
    corners = clips[..., [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == -1.0).float().mean() > 0.98
    # a good part of every frame is exact background (even a digit zoomed to 0.9 of the canvas side)
    assert ((clips == -1.0).float().mean((-1, -2)) > 0.3).all()


def test_animate_is_fixed_by_the_generator_seed(digit_images: torch.Tensor) -> None:
    images, kinds = digit_images[:8], torch.arange(8) % 4
    a = mo.animate(images, kinds, 8, 32, torch.Generator().manual_seed(7))
    b = mo.animate(images, kinds, 8, 32, torch.Generator().manual_seed(7))
    c = mo.animate(images, kinds, 8, 32, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    for i in range(8):  # every clip depends on the seed, whatever its motion
        assert not torch.allclose(a[i], c[i]), i


def test_random_clips_are_seeded_and_labelled(digit_images: torch.Tensor) -> None:
    labels = torch.arange(len(digit_images)) % 10
    clips, got = mo.random_clips(digit_images, labels, 6, 8, 32, torch.Generator().manual_seed(3))
    again, got_again = mo.random_clips(digit_images, labels, 6, 8, 32, torch.Generator().manual_seed(3))
    other, _ = mo.random_clips(digit_images, labels, 6, 8, 32, torch.Generator().manual_seed(4))
    assert clips.shape == (6, 1, 8, 32, 32) and got.shape == (6,) and got.dtype == torch.int64
    assert torch.equal(clips, again) and torch.equal(got, got_again)
    assert not torch.allclose(clips, other)
    # the labels are those of the drawn digits: redraw the same indices and compare
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, len(labels), (6,), generator=gen)
    assert torch.equal(got, labels[idx])
    got[0] = 99  # a copy, not a view of the caller's labels
    assert labels.max() == 9


def test_move_translates_and_bounces_inside_the_canvas() -> None:
    n, frames, size = 48, 16, 32
    clips = mo.animate(_disc(n), _kinds(n, "move"), frames, size, torch.Generator().manual_seed(11))
    mass, cx, cy = _mass_and_centre(clips)
    # the disc never leaves the canvas: its mass is conserved over all 16 frames
    spread = (mass.max(dim=1).values - mass.min(dim=1).values) / mass.mean(dim=1)
    assert spread.max() < 0.03, spread.max()
    # it moves every frame, at MotionRanges.speed canvas units (x 16 px) per frame except around a bounce
    step = torch.hypot(cx.diff(dim=1), cy.diff(dim=1))
    slowest, fastest = (v * size / 2.0 for v in mo.MotionRanges.speed)
    assert step.min() > 0.05
    assert slowest - 0.1 < step.median() < fastest + 0.1, step.median()
    # the centre stays inside the canvas, at least a disc radius from the borders
    radius = (mass[:, :1] / 2.0 / math.pi).sqrt()  # the disc's pixels have mass 2
    lo, hi = radius - 0.75 - 0.5, size - 1 - radius + 0.75 + 0.5
    assert ((cx >= lo) & (cx <= hi) & (cy >= lo) & (cy <= hi)).all()

    # 16 frames at these speeds cross the canvas: many clips turn round at a border (velocity sign flips)
    def reverses(d: torch.Tensor) -> torch.Tensor:
        return ((d[:, 1:] * d[:, :-1] < 0) & (d[:, 1:].abs() > 0.3) & (d[:, :-1].abs() > 0.3)).any(dim=1)

    turned = reverses(cx.diff(dim=1)) | reverses(cy.diff(dim=1))
    assert turned.float().mean() > 0.5


def test_rotate_keeps_the_centre_and_changes_pixels(digit_images: torch.Tensor) -> None:
    n = 24
    bar = -torch.ones(n, 1, 32, 32)
    bar[:, :, 14:18, 4:28] = 1.0  # point-symmetric about the image centre
    clips = mo.animate(bar, _kinds(n, "rotate"), 8, 32, torch.Generator().manual_seed(12))
    mass, cx, cy = _mass_and_centre(clips)
    drift = torch.hypot(cx - cx[:, :1], cy - cy[:, :1]).amax(dim=1)
    assert drift.max() < 1.0, drift.max()
    # bilinear resampling of a thin bar at an angle changes its mass a little, but none leaves the canvas
    assert ((mass.max(dim=1).values - mass.min(dim=1).values) / mass.mean(dim=1)).max() < 0.2
    # by the last frame the bar has turned 7 x MotionRanges.spin (at least 14 degrees)
    change = (clips[:, :, -1] - clips[:, :, 0]).abs().amax(dim=(1, 2, 3))
    assert (change > 0.5).all()
    # the same holds, more loosely, for real digits (their centre of mass is near the image centre)
    real = mo.animate(digit_images[:n], _kinds(n, "rotate"), 8, 32, torch.Generator().manual_seed(12))
    _, rx, ry = _mass_and_centre(real)
    assert torch.hypot(rx - rx[:, :1], ry - ry[:, :1]).amax() < 2.5
    assert ((real[:, :, -1] - real[:, :, 0]).abs().amax(dim=(1, 2, 3)) > 0.5).all()


def test_zoom_changes_the_digit_size_monotonically(digit_images: torch.Tensor) -> None:
    n = 32
    clips = mo.animate(digit_images[:n], _kinds(n, "zoom"), 8, 32, torch.Generator().manual_seed(13))
    mass, cx, cy = _mass_and_centre(clips)
    step = mass.diff(dim=1)
    assert ((step > 0).all(dim=1) | (step < 0).all(dim=1)).all()
    # the scale changes by MotionRanges.zoom per frame: the area by exp(+-2 * rate * 7)
    low, high = (2.0 * rate * 7 for rate in mo.MotionRanges.zoom)
    log_ratio = (mass[:, -1] / mass[:, 0]).log().abs()
    assert log_ratio.min() > 0.85 * low and log_ratio.max() < 1.15 * high, log_ratio
    grows = (step > 0).all(dim=1)
    assert grows.any() and (~grows).any()  # both directions are drawn
    # the digit zooms in place
    assert torch.hypot(cx - cx[:, :1], cy - cy[:, :1]).amax() < 2.5


def test_move_and_mixed_shift_the_digit_while_zoom_and_rotate_do_not(digit_images: torch.Tensor) -> None:
    n = 40
    kinds = torch.arange(n) % 4
    clips = mo.animate(_disc(n), kinds, 8, 32, torch.Generator().manual_seed(14))
    _, cx, cy = _mass_and_centre(clips)
    travel = torch.hypot(cx[:, -1] - cx[:, 0], cy[:, -1] - cy[:, 0]) + torch.hypot(cx.diff(1), cy.diff(1)).sum(1)
    moving = (kinds == 0) | (kinds == 3)
    assert travel[moving].min() > 2.0
    assert travel[~moving].max() < 0.5


# ----------------------------------------------------------------------------- video model


def test_build_is_seeded(model: vd.VideoModel) -> None:
    state = torch.random.get_rng_state()
    again = vd.build_video_model(seed=0)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone
    other = vd.build_video_model(seed=1)
    assert again.config == vd.VideoConfig() and isinstance(again.transformer, torch.nn.Module)
    same = [torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True)]
    assert all(same)
    pairs = zip(model.state_dict().items(), other.state_dict().items(), strict=True)
    differ = [name for (name, a), (_, b) in pairs if a.is_floating_point() and not torch.equal(a, b)]
    assert "conditioner.tokens.weight" in differ and len(differ) > 10


def test_config_json_round_trip() -> None:
    config = vd.VideoConfig(frames=4, num_layers=1, patch=(1, 2, 2))
    assert vd.VideoConfig.from_json(config.to_json()) == config
    assert vd.VideoConfig().clip_shape == (1, 8, 16, 16)
    with pytest.raises(ValueError, match="unknown config keys"):
        vd.VideoConfig.from_json(json.dumps({"frames": 8, "colour": 3}))


def test_save_load_round_trip(model: vd.VideoModel, video_file: Path) -> None:
    loaded = vd.load_video_model(video_file)
    assert loaded.config == model.config
    assert not loaded.training and all(not p.requires_grad for p in loaded.parameters())
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert fm.weights_format(video_file) == (fm.VIDEO_DIT, {fm.VIDEO_DIT: model.config.to_json()})
    half = vd.load_video_model(video_file, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_sample_clips_shape_range_and_independence(model: vd.VideoModel) -> None:
    batch = vd.sample_clips(model, [3, 7], [11, 12], steps=2)
    assert batch.shape == (2, 1, FRAMES, SIZE, SIZE) and batch.dtype == torch.float32
    assert batch.min() >= 0.0 and batch.max() <= 1.0
    assert batch.std() > 0.01  # not a flat, fully clamped clip
    assert torch.equal(batch, vd.sample_clips(model, [3, 7], [11, 12], steps=2))
    alone = vd.sample_clips(model, [7], [12], steps=2)
    torch.testing.assert_close(alone[0], batch[1], atol=1e-5, rtol=0)
    other_seed = vd.sample_clips(model, [7], [13], steps=2)
    assert not torch.allclose(other_seed, alone, atol=1e-3)
    explicit = vd.sample_clips(model, [7], [12], steps=2, frames=FRAMES, size=SIZE)
    assert torch.equal(explicit, alone)


def test_sample_clips_starts_from_per_seed_noise(model: vd.VideoModel) -> None:
    noise = vd.initial_clip_noise([5, 6], model.config)
    assert noise.shape == (2, 1, FRAMES, SIZE, SIZE)
    assert torch.equal(noise, dg.seeded_noise([5, 6], (1, FRAMES, SIZE, SIZE)))
    assert torch.equal(noise[1:], vd.initial_clip_noise([6], model.config))
    assert not torch.equal(noise[0], noise[1])


def test_sample_clips_makes_one_batched_call_per_step(model: vd.VideoModel) -> None:
    calls: list[tuple[tuple[int, ...], float]] = []
    handle = model.transformer.register_forward_pre_hook(
        lambda _m, _a, kw: calls.append((tuple(kw["hidden_states"].shape), float(kw["timestep"][0]))),
        with_kwargs=True,
    )
    try:
        vd.sample_clips(model, [0, 5], [1, 2], steps=2, guidance=1.5)
    finally:
        handle.remove()
    assert [shape for shape, _ in calls] == [(4, 1, FRAMES, SIZE, SIZE)] * 2
    assert [t for _, t in calls] == pytest.approx([1000.0, 500.0])  # timestep = 1000 * s


@pytest.mark.parametrize(
    ("digits", "seeds", "kwargs", "match"),
    [
        ([1], [1], {"steps": 0}, "steps"),
        ([1], [1], {"steps": 1.5}, "steps"),
        ([10], [1], {}, "0..9"),
        ([-1], [1], {}, "0..9"),
        ([True], [1], {}, "0..9"),
        ([1], [-1], {}, "seeds"),
        ([1], [2**63], {}, "seeds"),
        ([1, 2], [1], {}, "same length"),
        ([], [], {}, "empty"),
        ([1], [1], {"guidance": float("inf")}, "guidance"),
        ([1], [1], {"shift": 0.0}, "shift"),
        (
            [1],
            [1],
            {"frames": 16},
            rf"{TRAINED} .*got 16 frames of {SIZE}x{SIZE}\b",
        ),
        (
            [1],
            [1],
            {"size": 64},
            rf"{TRAINED} .*got {FRAMES} frames of 64x64",
        ),
        ([1], [1], {"frames": 4, "size": 8}, rf"{TRAINED} .*got 4 frames of 8x8"),
        ([1], [1], {"dtype": torch.float64}, "sampling was asked on cpu / torch.float64"),
        ([1], [1], {"dtype": torch.bfloat16}, "model is on cpu / torch.float32"),
    ],
)
def test_sample_clips_rejects_bad_arguments(
    model: vd.VideoModel, digits: list[int], seeds: list[int], kwargs: dict, match: str
) -> None:
    with pytest.raises(InvalidParameterError, match=match):
        vd.sample_clips(model, digits, seeds, **{"steps": 2, **kwargs})


def test_samplers_refuse_each_others_models(model: vd.VideoModel) -> None:
    digits_model = dg.build_digits_model()
    with pytest.raises(InvalidParameterError, match="must be a VideoModel, got DigitsModel"):
        vd.sample_clips(digits_model, [1], [1], steps=1)  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match="must be a DigitsModel, got VideoModel"):
        dg.sample(model, [1], [1], steps=1)  # type: ignore[arg-type]


def test_check_clip_shape_follows_the_models_config() -> None:
    config = vd.VideoConfig(frames=4, frame_size=16)
    vd.check_clip_shape(config, None, None)
    vd.check_clip_shape(config, 4, 16)
    with pytest.raises(InvalidParameterError, match=r"4-frame clips of 16x16 pixels.*got 8 frames of 16x16"):
        vd.check_clip_shape(config, 8, None)
    with pytest.raises(InvalidParameterError, match=r"got 4 frames of 32x32"):
        vd.check_clip_shape(config, None, 32)


def test_a_smaller_config_samples_its_own_shape(tmp_path: Path) -> None:
    config = vd.VideoConfig(frames=4, frame_size=8, num_layers=1, rope_max_seq_len=16)
    small = vd.build_video_model(seed=4, config=config)
    path = tmp_path / "small.safetensors"
    vd.save_video_model(small, path)
    loaded = vd.load_video_model(path)
    assert loaded.config == config
    clips = vd.sample_clips(loaded, [2], [3], steps=1)
    assert clips.shape == (1, 1, 4, 8, 8)
    with pytest.raises(InvalidParameterError, match="4-frame clips of 8x8"):
        vd.sample_clips(loaded, [2], [3], steps=1, frames=FRAMES, size=SIZE)


def test_sample_clips_refuses_a_model_that_draws_nothing(model: vd.VideoModel) -> None:
    broken = vd.build_video_model(seed=0)
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        broken.transformer.proj_out.bias.fill_(1e4)  # the velocity is huge and finite: all pixels saturate
    with pytest.raises(dg.SaturatedOutputError, match=r"saturated: 100% of the pixels of sample 0 \(digit 4, seed 9\)"):
        vd.sample_clips(broken.eval(), [4], [9], steps=1)
    with torch.no_grad():
        broken.transformer.proj_out.bias.fill_(float("nan"))
    with pytest.raises(dg.SaturatedOutputError, match="not finite in 2 of 2 samples"):
        vd.sample_clips(broken, [4, 5], [9, 10], steps=1)


def test_clip_frames_and_classifier_frames() -> None:
    clips = torch.rand(2, 1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    frames = vd.clip_frames(clips)
    assert frames.shape == (6, 1, SIZE, SIZE)
    for i in range(2):
        for f in range(3):
            assert torch.equal(frames[3 * i + f], clips[i, :, f])  # clip by clip, frames in order
    big = vd.classifier_frames(clips)
    assert big.shape == (6, 1, 32, 32)
    assert big.min() >= clips.min() and big.max() <= clips.max()  # bilinear: values keep their range
    # a smooth frame comes back from the upscaled one, block by block
    ramp = torch.linspace(0.0, 1.0, SIZE).expand(1, 1, 1, SIZE, SIZE)
    pooled = torch.nn.functional.avg_pool2d(vd.classifier_frames(ramp), 32 // SIZE)
    torch.testing.assert_close(pooled[..., 1:-1], ramp[:, :, 0, :, 1:-1], atol=1e-5, rtol=0)
    half = torch.zeros(1, 1, 1, SIZE, SIZE)
    half[..., : SIZE // 2] = 1.0
    up = vd.classifier_frames(half)[0, 0]
    assert torch.equal(up[:, :15], torch.ones(32, 15)) and torch.equal(up[:, 17:], torch.zeros(32, 15))
    full = torch.rand(1, 1, 2, 32, 32)
    assert torch.equal(vd.classifier_frames(full), vd.clip_frames(full))  # 32x32 frames pass unchanged


# ----------------------------------------------------------------------------- shared sampler pieces


def test_euler_cfg_integrates_a_constant_guided_velocity() -> None:
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def velocity(inputs: torch.Tensor, labels: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        calls.append((inputs.clone(), labels.clone(), s.clone()))
        # conditional rows: the digit; null rows: -2
        value = torch.where(labels == dg.NULL_CLASS, -2.0, labels.double()).to(inputs.dtype)
        return value.view(-1, *([1] * (inputs.ndim - 1))).expand_as(inputs)

    x = torch.randn(2, 1, 3, 4, 4)
    out = dg.euler_cfg(
        velocity, torch.nn.Linear(1, 1), x, [3, 5], steps=4, guidance=2.5, shift=3.0, dtype=torch.float32
    )
    # dx/ds = v from s = 1 to 0: x(0) = x(1) - v, v = v_null + g (v_cond - v_null)
    expected = x - (-2.0 + 2.5 * (torch.tensor([3.0, 5.0]) + 2.0)).view(2, 1, 1, 1, 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert len(calls) == 4
    assert all(torch.equal(labels, torch.tensor([3, 5, 10, 10])) for _, labels, _ in calls)
    assert all(inputs.shape == (4, 1, 3, 4, 4) for inputs, _, _ in calls)
    sigmas = dg.sigma_schedule(4, 3.0)
    assert [float(s[0]) for _, _, s in calls] == pytest.approx(sigmas[:-1].tolist())
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and sigmas[2] > 0.5  # shifted towards high noise


def test_euler_cfg_takes_euler_steps_of_a_linear_flow() -> None:
    x = torch.randn(3, 1, 2, 2)
    out = dg.euler_cfg(
        lambda inputs, _labels, _s: inputs, torch.nn.Linear(1, 1), x, [1, 2, 3], steps=4, guidance=3.0,
        shift=1.0, dtype=torch.float32,
    )  # fmt: skip
    # dx/ds = x, steps of -1/4: x (1 - 1/4)^4 (cond = null, so guidance plays no part)
    torch.testing.assert_close(out, x * 0.75**4, atol=1e-6, rtol=0)


def test_check_output_judges_clips_per_sample() -> None:
    clips = torch.full((2, 1, 8, 4, 4), 0.5)
    dg.check_output(clips, [1, 2], [3, 4])
    clips[1] = 5.0
    with pytest.raises(dg.SaturatedOutputError, match=r"sample 1 \(digit 2, seed 4\)"):
        dg.check_output(clips, [1, 2], [3, 4])
    clips[1] = 0.5
    clips[0, 0, 7, 3, 3] = float("nan")
    with pytest.raises(dg.SaturatedOutputError, match="not finite in 1 of 2 samples"):
        dg.check_output(clips, [1, 2], [3, 4])


def test_check_generation_args_accepts_numpy_and_tensor_integers() -> None:
    import numpy as np

    dg.check_generation_args(np.array([0, 9]), torch.tensor([0, 2**62]), np.int64(3), 3.0, 1.0)
    with pytest.raises(InvalidParameterError, match=r"0\.\.9"):
        dg.check_generation_args([np.float64(1.0)], [0], 3, 3.0, 1.0)


def test_digits_sampler_still_draws_digits() -> None:
    digits_model = dg.load_digits_model()
    images = dg.sample(digits_model, [3, 8], [1, 2], steps=2)
    assert images.shape == (2, 1, 32, 32) and images.min() >= 0.0 and images.max() <= 1.0
    torch.testing.assert_close(dg.sample(digits_model, [8], [2], steps=2)[0], images[1], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- formats and bad files


def test_format_tags_and_descriptions(video_file: Path, frame_classifier_file: Path) -> None:
    assert fm.weights_format(DIGITS_DIT_FILE)[0] == fm.DIGITS_DIT
    assert fm.weights_format(DIGITS_CLASSIFIER_FILE)[0] == fm.DIGITS_CLASSIFIER
    assert fm.weights_format(video_file)[0] == fm.VIDEO_DIT
    assert fm.weights_format(frame_classifier_file) == (fm.FRAME_CLASSIFIER, {"format": fm.FRAME_CLASSIFIER})
    assert len(set(fm.FORMATS)) == 4 and all(tag.endswith("/1") for tag in fm.FORMATS)
    assert "video DiT" in fm.describe_format(fm.VIDEO_DIT) and "load_video_model" in fm.describe_format(fm.VIDEO_DIT)
    assert "not a file written by this package" in fm.describe_format(None)
    assert "unknown format 'x/9'" in fm.describe_format("x/9")
    assert issubclass(fm.WeightsError, HicacheError) and fm.WeightsError is dg.WeightsError


def test_tagged_files_and_configs(tmp_path: Path, model: vd.VideoModel) -> None:
    path = tmp_path / "tagged.safetensors"
    fm.save_tagged(model, path, fm.VIDEO_DIT, model.config.to_json())
    assert fm.weights_format(path) == (fm.VIDEO_DIT, {fm.VIDEO_DIT: model.config.to_json()})
    config = fm.read_tagged_config(path, fm.VIDEO_DIT, "video-DiT", vd.VideoConfig.from_json)
    assert config == model.config
    with pytest.raises(fm.WeightsError, match="is not a digits-DiT file: it holds the video DiT"):
        fm.read_tagged_config(path, fm.DIGITS_DIT, "digits-DiT", dg.DigitsConfig.from_json)
    # a DiT tag under "format", without its config, is no DiT file
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "bare.safetensors"), metadata={"format": fm.VIDEO_DIT})
    assert fm.weights_format(tmp_path / "bare.safetensors")[0] is None
    with pytest.raises(fm.WeightsError, match="not a video-DiT file: it holds no hicache-sdk format tag"):
        vd.load_video_model(tmp_path / "bare.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "odd.safetensors"), metadata={"format": "someone-else/3"})
    with pytest.raises(fm.WeightsError, match="it holds an unknown format 'someone-else/3'"):
        clf.load_frame_classifier(tmp_path / "odd.safetensors")


def test_loaders_refuse_files_of_other_models(video_file: Path, frame_classifier_file: Path) -> None:
    with pytest.raises(fm.WeightsError, match=r"is not a video-DiT file: it holds the digits DiT \(load_digits_model"):
        vd.load_video_model(DIGITS_DIT_FILE)
    with pytest.raises(fm.WeightsError, match=r"is not a digits-DiT file: it holds the video DiT \(load_video_model"):
        dg.load_digits_model(video_file)
    with pytest.raises(fm.WeightsError, match=r"is not a video-DiT file: it holds the video-frame classifier"):
        vd.load_video_model(frame_classifier_file)
    with pytest.raises(fm.WeightsError, match=r"not the video-frame classifier .*it holds the digit classifier"):
        clf.load_frame_classifier(DIGITS_CLASSIFIER_FILE)
    with pytest.raises(fm.WeightsError, match=r"not the digit classifier .*it holds the video-frame classifier"):
        clf.load_digit_classifier(frame_classifier_file)
    with pytest.raises(fm.WeightsError, match=r"not the video-frame classifier .*it holds the video DiT"):
        clf.load_frame_classifier(video_file)


def test_frame_classifier_round_trip(frame_classifier_file: Path) -> None:
    built = clf.build_digit_classifier(seed=2)
    loaded = clf.load_frame_classifier(frame_classifier_file)
    assert not loaded.training and all(not p.requires_grad for p in loaded.parameters())
    for (name, a), (_, b) in zip(built.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_unreadable_and_missing_files(tmp_path: Path, video_file: Path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy())
    cut = tmp_path / "cut.safetensors"
    data = video_file.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    for bad in (garbage, cut):
        with pytest.raises(fm.WeightsError, match="unreadable"):
            vd.load_video_model(bad)
        with pytest.raises(fm.WeightsError, match="unreadable"):
            clf.load_frame_classifier(bad)
    with pytest.raises(fm.WeightsError, match="does not exist"):
        vd.load_video_model(tmp_path / "nope.safetensors")
    with pytest.raises(fm.WeightsError, match="does not exist"):
        clf.load_frame_classifier(tmp_path / "nope.safetensors")
    with pytest.raises(fm.WeightsError, match="does not exist"):
        vd.load_video_model(tmp_path)  # a folder is no weights file


def test_bad_contents_are_refused(tmp_path: Path, model: vd.VideoModel) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    meta = {fm.VIDEO_DIT: model.config.to_json()}

    state["transformer.proj_out.bias"][0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(fm.WeightsError, match=r"non-finite values in \['transformer.proj_out.bias'\]"):
        vd.load_video_model(tmp_path / "nan.safetensors")
    state["transformer.proj_out.bias"][0] = float("inf")
    save_file(state, str(tmp_path / "inf.safetensors"), metadata=meta)
    with pytest.raises(fm.WeightsError, match="non-finite"):
        vd.load_video_model(tmp_path / "inf.safetensors")
    state["transformer.proj_out.bias"][0] = 0.0

    save_file(state, str(tmp_path / "untagged.safetensors"))
    with pytest.raises(fm.WeightsError, match="not a video-DiT file: it holds no hicache-sdk format tag"):
        vd.load_video_model(tmp_path / "untagged.safetensors")
    save_file(state, str(tmp_path / "badcfg.safetensors"), metadata={fm.VIDEO_DIT: '{"frames": 8, "colour": 1}'})
    with pytest.raises(fm.WeightsError, match="invalid config"):
        vd.load_video_model(tmp_path / "badcfg.safetensors")
    save_file(state, str(tmp_path / "notjson.safetensors"), metadata={fm.VIDEO_DIT: "{frames"})
    with pytest.raises(fm.WeightsError, match="invalid config"):
        vd.load_video_model(tmp_path / "notjson.safetensors")
    other = vd.VideoConfig(num_layers=2).to_json()  # tensors of a 4-layer model under a 2-layer config
    save_file(state, str(tmp_path / "layers.safetensors"), metadata={fm.VIDEO_DIT: other})
    with pytest.raises(fm.WeightsError, match="unexpected tensors"):
        vd.load_video_model(tmp_path / "layers.safetensors")
    state.pop("conditioner.tokens.weight")
    save_file(state, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(fm.WeightsError, match=r"1 missing tensors \['conditioner.tokens.weight'\]"):
        vd.load_video_model(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    "config",
    ['{"heads": 0}', '{"head_dim": 3}', '{"frames": -1}', '{"frames": "8"}', '{"frame_size": 15}'],
)
def test_a_config_that_cannot_work_is_refused_on_load(tmp_path: Path, model: vd.VideoModel, config: str) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "config.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={fm.VIDEO_DIT: config})
    with pytest.raises(fm.WeightsError, match="invalid config"):
        vd.load_video_model(path)


# ----------------------------------------------------------------------------- training script


@pytest.fixture
def _restore_torch_globals() -> Iterator[None]:
    """``train_video.main`` sets the thread count, deterministic algorithms and the global seed."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        yield
    torch.use_deterministic_algorithms(deterministic)
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("_restore_torch_globals")
def test_train_video_is_bit_reproducible(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    from hicache_sdk.models import train_video as tv

    tiny = ["--iterations", "3", "--batch-size", "4", "--classifier-iterations", "5", "--eval-seeds", "0"]
    tiny += ["--threads", "1"]
    a, b = tmp_path / "a", tmp_path / "b"
    summary = tv.main(["--out", str(a), *tiny])
    # the second run trains the two parts separately: each part is seeded on its own
    tv.main(["--out", str(b), *tiny, "--parts", "classifier"])
    resumed = tv.main(["--out", str(b), *tiny, "--parts", "dit"])
    for name in (tv.DIT_FILE, tv.CLASSIFIER_FILE):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert summary["dit_iterations"] == 3 and summary["threads"] == 1
    assert 0.0 <= summary["classifier_heldout_frame_accuracy"] <= 1.0
    assert math.isfinite(summary["dit_final_loss"]) and summary["dit_final_loss"] > 0.0
    assert "sample_frame_accuracy" not in summary  # --eval-seeds 0
    # the dit-only run scored the classifier it found in the folder: the same number
    assert resumed["classifier_heldout_frame_accuracy"] == summary["classifier_heldout_frame_accuracy"]
    assert resumed["dit_final_loss"] == summary["dit_final_loss"]
    assert json.loads((a / tv.SUMMARY_FILE).read_text())["dit_final_loss"] == summary["dit_final_loss"]
    video = vd.load_video_model(a / tv.DIT_FILE)
    assert video.config == vd.VideoConfig() and not video.training
    frames = clf.load_frame_classifier(a / tv.CLASSIFIER_FILE)
    assert not frames.training
    with pytest.raises(fm.WeightsError):
        clf.load_digit_classifier(a / tv.CLASSIFIER_FILE)


# ----------------------------------------------------------------------------- shipped weights


@pytest.fixture(scope="module")
def shipped() -> vd.VideoModel:
    return vd.load_video_model()


@pytest.fixture(scope="module")
def frame_classifier() -> clf.DigitClassifier:
    return clf.load_frame_classifier()


@needs_shipped
def test_shipped_video_model_loads_in_eval_mode(shipped: vd.VideoModel) -> None:
    assert not shipped.training
    assert all(not p.requires_grad for p in shipped.parameters())
    assert shipped.config == vd.VideoConfig()
    assert SHIPPED_VIDEO.stat().st_size < 10_000_000
    assert fm.weights_format(SHIPPED_FRAME_CLASSIFIER)[0] == fm.FRAME_CLASSIFIER


@needs_shipped
def test_shipped_frame_classifier_reads_heldout_clips(frame_classifier: clf.DigitClassifier) -> None:
    pytest.importorskip("sklearn")
    split = split_digits(0)
    clips, labels = mo.random_clips(
        split.heldout_images, split.heldout_labels, 40, FRAMES, SIZE, torch.Generator().manual_seed(2024)
    )
    frames = vd.classifier_frames((clips + 1.0) / 2.0)
    accuracy = (frame_classifier.classify(frames) == labels.repeat_interleave(FRAMES)).float().mean().item()
    assert accuracy >= 0.9, accuracy


@needs_shipped
def test_shipped_video_model_draws_the_asked_digits(
    shipped: vd.VideoModel, frame_classifier: clf.DigitClassifier
) -> None:
    digits = list(range(10))
    clips = vd.sample_clips(shipped, digits, [100 + d for d in digits], steps=20)
    assert clips.shape == (10, 1, FRAMES, SIZE, SIZE)
    frames = vd.classifier_frames(clips)
    asked = torch.tensor(digits).repeat_interleave(FRAMES)
    accuracy = (frame_classifier.classify(frames) == asked).float().mean().item()
    assert accuracy >= 0.8, accuracy
