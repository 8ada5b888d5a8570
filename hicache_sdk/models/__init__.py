"""The embedded digits model: a tiny pixel-space Flux DiT and a digit classifier.

Weights ship in ``hicache_sdk/models/weights``; ``python -m hicache_sdk.models.train``
reproduces them.
"""

from .classifier import DigitClassifier, load_digit_classifier
from .digits import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    DigitConditioner,
    DigitsConfig,
    DigitsModel,
    SaturatedOutputError,
    WeightsError,
    build_digits_model,
    load_digits_model,
    sample,
)

__all__ = [
    "DEFAULT_GUIDANCE",
    "DEFAULT_STEPS",
    "DigitClassifier",
    "DigitConditioner",
    "DigitsConfig",
    "DigitsModel",
    "SaturatedOutputError",
    "WeightsError",
    "build_digits_model",
    "load_digit_classifier",
    "load_digits_model",
    "sample",
]
