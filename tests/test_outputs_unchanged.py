"""The interval policies' outputs are bit-identical to the release before the decision API.

Digests of the bench's images (digits 0..9, seeds 0 and 1, 50 steps, the HiCache paper setting)
recorded with the code before policies could decide per step, per unit and per sample: moving
FORA, TaylorSeer and ClusCa onto the new API changed none of their bits. Recorded with torch
2.13.0+cpu on x86_64; another torch build or CPU may round differently, so there it is skipped.
"""

from __future__ import annotations

import hashlib
import platform

import pytest
import torch

from hicache_sdk.bench.methods import DEFAULT_METHODS, parse_method
from hicache_sdk.bench.runner import BenchSettings
from hicache_sdk.models import load_digits_model, sample

RECORDED = {
    "full": "40207382b0c7375d03dfc5ee3be713aee78b7068c82ef4bc79dc263054ecf151",
    "fora": "300fc81ddc91be5871e5cb4675b1715ea6d0318c08530147720439caf63d5440",
    "taylorseer": "b0a745bf210939c83fa575b8b5875c8f7a725ceb80cccd382bea1ba6c0ef6c04",
    "taylorseer+hermite": "4a925d2a0bbe702ad32c7f93fcb837855dd3a7a11bbca537d252992fa9c8a870",
    "clusca": "661866f4269e525321561c6982de220c3270f9bb2efb1a9f274dd5104e4362cb",
    "clusca+hermite": "d93d8f181d67cdfd1e0a5554b36e3e76d44192630d146bd9f1f4c3dc335d3829",
    "taylorseer+newton": "1cebc2c32bd4696571d27d8ce8f3559cdbe7f7b059208caf7295427305924198",
}

pytestmark = pytest.mark.skipif(
    torch.__version__ != "2.13.0+cpu" or platform.machine() != "x86_64",
    reason="digests recorded with torch 2.13.0+cpu on x86_64",
)


@pytest.fixture(scope="module")
def digests() -> dict[str, str]:
    settings = BenchSettings(methods=())
    digits, seeds = settings.samples()
    model = load_digits_model()
    found = {}
    for text in DEFAULT_METHODS:
        accelerator = parse_method(text).accelerator()
        if accelerator is None:
            images = sample(model, digits, seeds, steps=settings.steps)
        else:
            with accelerator.apply(model.transformer):
                images = sample(model, digits, seeds, steps=settings.steps)
        found[text] = hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()
    return found


@pytest.mark.parametrize("method", DEFAULT_METHODS)
def test_bench_images_are_bit_identical_to_the_recorded_release(method: str, digests: dict[str, str]) -> None:
    assert set(RECORDED) == set(DEFAULT_METHODS)
    assert digests[method] == RECORDED[method]
