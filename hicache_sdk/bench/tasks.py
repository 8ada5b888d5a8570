"""The bench's tasks: which embedded model it runs, how it samples and how it scores the samples.

Two tasks ship, declared as data:

- ``digits``: the digits DiT (Flux, 32x32 images), scored per image by the digit classifier;
- ``video``: the video DiT (Wan, 8-frame 16x16 clips), scored per frame by the frame classifier,
  plus a temporal-consistency error (see :func:`clip_fidelity`).

``--model`` of ``hicache bench`` names a task or a weights file; :func:`resolve_model` reads a
file's format tag to find its task, so the digits weights can never fill the video model (or the
reverse): the mismatch is a :class:`~hicache_sdk.models.WeightsError` naming what the file holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from ..errors import InvalidParameterError, did_you_mean
from ..models.classifier import DigitClassifier, load_digit_classifier, load_frame_classifier
from ..models.digits import DEFAULT_GUIDANCE, DigitsModel, load_digits_model, sample
from ..models.formats import DIGITS_DIT, VIDEO_DIT, WeightsError, describe_format, weights_format
from ..models.video import (
    VIDEO_GUIDANCE,
    VideoModel,
    check_clip_shape,
    classifier_frames,
    clip_frames,
    load_video_model,
    sample_clips,
)
from .metrics import frechet_distance, psnr, relative_l2, ssim, temporal_error

__all__ = ["TASKS", "BenchTask", "Fidelity", "clip_fidelity", "fidelity", "get_task", "resolve_model"]


@attrs.frozen
class Fidelity:
    """Scores of samples against full-compute samples of the same digits and seeds."""

    rel_l2: float
    psnr: float
    ssim: float
    accuracy: float  # share classified as the requested digit (per frame for clips)
    frechet: float  # on the classifier's features; 0 for samples identical to the reference, nan for one sample
    temporal: float = math.nan  # clips: relative L2 of the frame differences; nan for still images


def fidelity(
    images: torch.Tensor, reference: torch.Tensor, classifier: DigitClassifier, digits: Sequence[int]
) -> Fidelity:
    """Relative L2, PSNR, SSIM, class accuracy and Frechet distance of ``images`` against ``reference``."""
    if torch.equal(images, reference):
        frechet = 0.0
    elif len(images) < 2:  # a Gaussian needs two samples
        frechet = math.nan
    else:
        features = classifier.features(images).double().cpu().numpy()
        frechet = max(0.0, frechet_distance(features, classifier.features(reference).double().cpu().numpy()))
    return Fidelity(
        rel_l2=relative_l2(images, reference),
        psnr=psnr(images, reference),
        ssim=ssim(images, reference),
        accuracy=float((classifier.classify(images).cpu() == torch.tensor(list(digits))).double().mean()),
        frechet=frechet,
    )


def clip_fidelity(
    clips: torch.Tensor, reference: torch.Tensor, classifier: DigitClassifier, digits: Sequence[int]
) -> Fidelity:
    """The scores of clips ``(n, 1, F, H, W)``: every image score per frame, plus the temporal error.

    PSNR and SSIM are the means over all frames, at the model's resolution (SSIM crops the border of
    its Gaussian window, 5 px, as for the digits); the relative L2 is over the whole clips. Accuracy
    is the share of frames the frame classifier reads as the clip's digit and the Frechet distance is
    between the two sets of frame features, both on the frames as the classifier reads them
    (:func:`~hicache_sdk.models.video.classifier_frames`). ``temporal`` is
    :func:`~hicache_sdk.bench.metrics.temporal_error` (how much the motion, the frame-to-frame
    change, departs from full compute's).
    """
    labels = [d for d in digits for _ in range(clips.shape[2])]
    read = fidelity(classifier_frames(clips), classifier_frames(reference), classifier, labels)
    frames, reference_frames = clip_frames(clips), clip_frames(reference)
    return attrs.evolve(
        read,
        rel_l2=relative_l2(clips, reference),
        psnr=psnr(frames, reference_frames),
        ssim=ssim(frames, reference_frames),
        temporal=temporal_error(clips, reference),
    )


Generate = Callable[..., torch.Tensor]


@attrs.frozen
class BenchTask:
    """What one task of the bench runs: its model, sampler, classifier, scores and grid file.

    Attributes:
        name: the task's name (``hicache bench --model NAME``).
        model_type: the class its model must be (checked before any work).
        weights_format: the format tag of its weights files (:mod:`hicache_sdk.models.formats`).
        load_model: ``(path or None, device=, dtype=)`` -> model (``None``: the shipped weights).
        load_classifier: ``(device=)`` -> the classifier that scores its samples.
        generate: ``(model, digits, seeds, steps=, guidance=, device=, dtype=)`` -> samples in [0, 1].
        score: ``(samples, reference, classifier, digits)`` -> :class:`Fidelity`.
        grid_file: the report's picture of the samples: ``samples.png`` (a grid of images) or
            ``samples.gif`` (an animated grid of clips).
        describe: one line on the model, for the report.
        sample_noun: what one sample is called in the report (``samples``, ``clips``).
        notes: the report's lines on how the scores are computed.
        check_shape: ``(model, frames or None, size or None)``: refuses a sample shape the model was not
            trained for (:class:`~hicache_sdk.errors.InvalidParameterError`).
        seeds_per_digit: ``hicache bench``'s default samples per digit (what keeps the default run short).
        guidance: the classifier-free guidance scale the bench samples with unless told otherwise.
    """

    name: str
    model_type: type[nn.Module]
    weights_format: str
    load_model: Callable[..., nn.Module]
    load_classifier: Callable[..., DigitClassifier]
    generate: Generate
    score: Callable[[torch.Tensor, torch.Tensor, DigitClassifier, Sequence[int]], Fidelity]
    grid_file: str
    describe: str
    sample_noun: str
    notes: tuple[str, ...]
    check_shape: Callable[[Any, int | None, int | None], None]
    seeds_per_digit: int
    guidance: float

    def check_model(self, model: Any) -> None:
        """Refuse a model of another task (e.g. the digits DiT given to the video bench)."""
        if not isinstance(model, self.model_type):
            raise InvalidParameterError(
                f"the {self.name} bench needs a {self.model_type.__name__}, got {type(model).__name__}"
            )


def _check_image_shape(model: DigitsModel, frames: int | None, size: int | None) -> None:
    if frames is not None:
        raise InvalidParameterError(
            f"frames={frames}: the digits model draws still images; a frame count applies to the video model"
        )
    side = model.config.image_size
    if size is not None and size != side:
        raise InvalidParameterError(
            f"size={size}: this digits model was trained on {side}x{side} images and draws nothing else"
        )


TASKS: dict[str, BenchTask] = {
    "digits": BenchTask(
        name="digits",
        model_type=DigitsModel,
        weights_format=DIGITS_DIT,
        load_model=load_digits_model,
        load_classifier=load_digit_classifier,
        generate=sample,
        score=fidelity,
        grid_file="samples.png",
        describe="the digits DiT: a FluxTransformer2DModel trained here on 32x32 digits",
        sample_noun="samples",
        notes=(
            "Errors are against full compute on the same seeds; accuracy is the digit classifier's;",
            "Frechet distance is on the classifier's 64-d features (small-sample, for ranking only).",
        ),
        check_shape=_check_image_shape,
        seeds_per_digit=2,
        guidance=DEFAULT_GUIDANCE,
    ),
    "video": BenchTask(
        name="video",
        model_type=VideoModel,
        weights_format=VIDEO_DIT,
        load_model=load_video_model,
        load_classifier=load_frame_classifier,
        generate=sample_clips,
        score=clip_fidelity,
        grid_file="samples.gif",
        describe="the video DiT: a WanTransformer3DModel trained here on clips of moving digits",
        sample_noun="clips",
        notes=(
            "Errors are against full compute on the same seeds. PSNR and SSIM are means over frames; accuracy is",
            "the share of frames the frame classifier reads as the clip's digit; Frechet distance is between the",
            "frame classifier's 64-d features of all frames (small-sample, for ranking only); rel. L2 is over whole",
            "clips; temporal err is the relative L2 of the frame-to-frame differences against full compute's.",
        ),
        check_shape=lambda model, frames, size: check_clip_shape(model.config, frames, size),
        seeds_per_digit=1,
        guidance=VIDEO_GUIDANCE,
    ),
}
"""The bench's tasks by name."""


def get_task(name: str) -> BenchTask:
    """The task named ``name``; :class:`InvalidParameterError` (with did-you-mean) otherwise."""
    if name not in TASKS:
        raise InvalidParameterError(
            f"unknown task {name!r}: expected one of {sorted(TASKS)}.{did_you_mean(name, TASKS)}"
        )
    return TASKS[name]


def resolve_model(model: str | Path | None, task: str | None = None) -> tuple[BenchTask, Path | None]:
    """The task and weights file that ``--model`` (and ``--task``) name.

    ``model`` is a task name (a ``str`` equal to a key of :data:`TASKS`: its shipped weights), a
    weights file (any other ``str``, or a ``Path``: write ``./video`` for a file named ``video``), or
    ``None`` (``task``'s shipped weights; ``digits`` when both are ``None``). A file's task comes from
    its format tag; a file of another task than ``task`` is refused with
    :class:`~hicache_sdk.models.WeightsError`.
    """
    if model is None or (isinstance(model, str) and model in TASKS):
        name = model if model is not None else (task or "digits")
        if task is not None and name != task:
            raise InvalidParameterError(f"--model {name} is not the model of --task {task}")
        return get_task(name), None
    path = Path(model)
    if not path.is_file() and isinstance(model, str) and did_you_mean(model, TASKS):
        raise WeightsError(f"weights file {path} does not exist.{did_you_mean(model, TASKS)}")
    tag, _ = weights_format(path)
    owners = [t for t in TASKS.values() if t.weights_format == tag]
    wanted = get_task(task) if task is not None else None
    if not owners or (wanted is not None and owners[0] is not wanted):
        needed = f"the {wanted.name} model's weights" if wanted else f"the weights of one of {sorted(TASKS)}"
        raise WeightsError(f"weights file {path} holds {describe_format(tag)}, not {needed}")
    return owners[0], path
