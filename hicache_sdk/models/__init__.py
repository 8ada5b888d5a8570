"""The embedded models: a tiny pixel-space Flux DiT of digits, a Wan video DiT of moving digits, and classifiers.

Weights ship in ``hicache_sdk/models/weights``; ``python -m hicache_sdk.models.train`` and
``python -m hicache_sdk.models.train_video`` reproduce them.
"""

from .classifier import DigitClassifier, load_digit_classifier, load_frame_classifier
from .digits import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    DigitConditioner,
    DigitsConfig,
    DigitsModel,
    SaturatedOutputError,
    build_digits_model,
    load_digits_model,
    sample,
)
from .formats import WeightsError
from .video import VideoConfig, VideoModel, build_video_model, load_video_model, sample_clips

__all__ = [
    "DEFAULT_GUIDANCE",
    "DEFAULT_STEPS",
    "DigitClassifier",
    "DigitConditioner",
    "DigitsConfig",
    "DigitsModel",
    "SaturatedOutputError",
    "VideoConfig",
    "VideoModel",
    "WeightsError",
    "build_digits_model",
    "build_video_model",
    "load_digit_classifier",
    "load_digits_model",
    "load_frame_classifier",
    "load_video_model",
    "sample",
    "sample_clips",
]
