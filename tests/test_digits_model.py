"""Fast tests of the embedded digits DiT, its sampler and the digit classifier."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hicache_sdk.errors import HicacheError
from hicache_sdk.models import classifier as clf
from hicache_sdk.models import digits as dg
from hicache_sdk.models.data import split_digits

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> dg.DigitsModel:
    return dg.load_digits_model()


@pytest.fixture(scope="module")
def classifier() -> clf.DigitClassifier:
    return clf.load_digit_classifier()


def test_shipped_weights_load_in_eval_mode(model: dg.DigitsModel) -> None:
    assert not model.training
    assert model.config == dg.DigitsConfig()
    assert all(not p.requires_grad for p in model.parameters())
    assert dg.default_weights_path(dg.DIT_WEIGHTS).stat().st_size <= 10_000_000


def test_save_load_round_trip(tmp_path: Path) -> None:
    built = dg.build_digits_model(seed=3)
    path = tmp_path / "m.safetensors"
    dg.save_digits_model(built, path)
    loaded = dg.load_digits_model(path)
    for (name, a), (_, b) in zip(built.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_build_is_seeded() -> None:
    a, b = dg.build_digits_model(seed=1), dg.build_digits_model(seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(dg.WeightsError, match="does not exist"):
        dg.load_digits_model(tmp_path / "nope.safetensors")
    with pytest.raises(dg.WeightsError, match="does not exist"):
        clf.load_digit_classifier(tmp_path / "nope.safetensors")


def test_corrupt_file_raises(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(dg.WeightsError, match="unreadable"):
        dg.load_digits_model(bad)
    with pytest.raises(dg.WeightsError, match="unreadable"):
        clf.load_digit_classifier(bad)


def test_truncated_file_raises(tmp_path: Path) -> None:
    data = dg.default_weights_path(dg.DIT_WEIGHTS).read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(dg.WeightsError):
        dg.load_digits_model(cut)


def test_missing_and_misshapen_tensors_raise(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in dg.build_digits_model().state_dict().items()}
    meta = {dg._FORMAT: dg.DigitsConfig().to_json()}
    dropped = dict(state)
    dropped.pop("transformer.proj_out.weight")
    save_file(dropped, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(dg.WeightsError, match="missing"):
        dg.load_digits_model(tmp_path / "missing.safetensors")
    save_file(state, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(dg.WeightsError, match="not a digits-DiT file"):
        dg.load_digits_model(tmp_path / "nometa.safetensors")
    state["transformer.proj_out.bias"] = torch.zeros(5)
    save_file(state, str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(dg.WeightsError, match="wrong shape"):
        dg.load_digits_model(tmp_path / "shape.safetensors")
    with pytest.raises(dg.WeightsError, match=r"is not the digit classifier .*: it holds the digits DiT"):
        clf.load_digit_classifier(dg.default_weights_path(dg.DIT_WEIGHTS))


def test_pack_unpack_round_trip() -> None:
    images = torch.randn(3, 1, 32, 32)
    tokens = dg.pack_images(images)
    assert tokens.shape == (3, 256, 4)
    assert torch.equal(dg.unpack_tokens(tokens), images)


def test_sample_shape_range_and_determinism(model: dg.DigitsModel) -> None:
    batch = dg.sample(model, [3, 7, 1], [11, 12, 13], steps=4)
    assert batch.shape == (3, 1, 32, 32) and batch.dtype == torch.float32
    assert batch.min() >= 0.0 and batch.max() <= 1.0
    again = dg.sample(model, [3, 7, 1], [11, 12, 13], steps=4)
    assert torch.equal(batch, again)
    alone = dg.sample(model, [7], [12], steps=4)
    torch.testing.assert_close(alone[0], batch[1], atol=1e-5, rtol=0)
    other = dg.sample(model, [7], [99], steps=4)
    assert not torch.allclose(other, alone)


def test_sample_makes_one_batched_transformer_call_per_step(model: dg.DigitsModel) -> None:
    batch_sizes: list[int] = []
    handle = model.transformer.register_forward_pre_hook(
        lambda _m, _a, kw: batch_sizes.append(kw["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        dg.sample(model, [0, 5], [1, 2], steps=2)
    finally:
        handle.remove()
    assert batch_sizes == [4, 4]


@pytest.mark.parametrize(
    ("digits", "seeds", "kwargs", "match"),
    [
        ([1], [1], {"steps": 0}, "steps"),
        ([1], [1], {"steps": 2.5}, "steps"),
        ([10], [1], {}, "0..9"),
        ([-1], [1], {}, "0..9"),
        ([1.0], [1], {}, "0..9"),
        ([True], [1], {}, "0..9"),
        ([1], [-1], {}, "seeds"),
        ([1, 2], [1], {}, "same length"),
        ([], [], {}, "empty"),
        ([1], [1], {"guidance": float("nan")}, "guidance"),
        ([1], [1], {"dtype": torch.float64}, "sampling was asked"),
    ],
)
def test_sample_rejects_bad_arguments(
    model: dg.DigitsModel, digits: list[int], seeds: list[int], kwargs: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        dg.sample(model, digits, seeds, **kwargs)


def test_classifier_heldout_accuracy(classifier: clf.DigitClassifier) -> None:
    pytest.importorskip("sklearn")
    split = split_digits(seed=0)
    images = (split.heldout_images + 1.0) / 2.0
    accuracy = (classifier.classify(images) == split.heldout_labels).float().mean().item()
    assert accuracy > 0.95
    features = classifier.features(images[:8])
    assert features.shape == (8, clf.FEATURE_DIM)
    with pytest.raises(ValueError, match="shape"):
        classifier.classify(torch.zeros(2, 3, 32, 32))


def test_sample_accepts_numpy_and_tensor_integers(model: dg.DigitsModel) -> None:
    import numpy as np

    a = dg.sample(model, np.array([4]), torch.tensor([5]), steps=1)
    b = dg.sample(model, [4], [5], steps=1)
    assert torch.equal(a, b)


def _scaled(model: dg.DigitsModel, factor: float, only: str = "") -> dg.DigitsModel:
    scaled = dg.build_digits_model()
    scaled.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, tensor in scaled.state_dict().items():
            if only in name and tensor.is_floating_point():
                tensor.mul_(factor)
    return scaled.eval()


@pytest.mark.parametrize(
    ("factor", "only", "match"),
    [
        (10.0, "", r"saturated: 100% of the pixels of sample 0 \(digit 3, seed 5\)"),  # all weights x10: finite
        (1e4, "proj_out", "saturated"),  # the velocity x10^4: every pixel far out, still finite
        (1e30, "proj_out", "not finite in 2 of 2 samples"),  # overflows to inf/nan inside the sampler
    ],
)
def test_sample_refuses_a_model_that_draws_no_digits(
    model: dg.DigitsModel, tmp_path: Path, factor: float, only: str, match: str
) -> None:
    path = tmp_path / "scaled.safetensors"
    dg.save_digits_model(_scaled(model, factor, only), path)
    scaled = dg.load_digits_model(path)  # finite weights of the right shapes: the loader accepts them
    with pytest.raises(dg.SaturatedOutputError, match=match) as caught:
        dg.sample(scaled, [3, 8], [5, 6], steps=3)
    assert isinstance(caught.value, HicacheError)


def test_saturation_is_judged_before_the_clamp() -> None:
    def image(values: torch.Tensor) -> torch.Tensor:
        return values.reshape(1, 1, 32, 32)

    n = 32 * 32
    # a dark background slightly below 0 and strokes slightly above 1 are clipped, but normal
    dg.check_output(image(torch.where(torch.arange(n) % 3 == 0, 1.2, -0.4)), [0], [0])
    # 90% of the pixels far out is still accepted (a step or two of a sane model stays far below that)
    far = torch.arange(n) < int(0.9 * n)
    dg.check_output(image(torch.where(far, -5.0, 0.5)), [0], [0])
    # 91% far out on either side: refused, although clamping would give a valid-looking black/white image
    far = torch.arange(n) < int(0.91 * n) + 1
    with pytest.raises(dg.SaturatedOutputError, match="91% of the pixels"):
        dg.check_output(image(torch.where(far, 7.0, 0.5)), [0], [0])
    # a single non-finite pixel is refused
    with pytest.raises(dg.SaturatedOutputError, match="not finite"):
        dg.check_output(image(torch.where(torch.arange(n) == 7, float("nan"), 0.5)), [0], [0])
