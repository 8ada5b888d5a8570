"""Train the video DiT and its frame classifier that ship with hicache-sdk.

Usage::

    python -m hicache_sdk.models.train_video --out DIR [--seed 0] [--iterations N] [--parts all]

Writes ``digits_wan_video.safetensors``, ``video_frame_classifier.safetensors`` and
``train_video_summary.json`` to ``DIR``. The clips are drawn on the fly by :mod:`.motion` from the
training split of the digits (the classifier is scored on clips of the held-out digits). Runs on
CPU with a fixed seed and deterministic algorithms: bit-reproducible for a given torch build and
thread count.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .classifier import DigitClassifier, build_digit_classifier, load_frame_classifier, save_digit_classifier
from .data import DigitsSplit, split_digits
from .digits import DEFAULT_STEPS, NULL_CLASS
from .motion import MOTIONS, animate, random_clips
from .train import _lr_factor, _update_ema
from .video import (
    VIDEO_GUIDANCE,
    VideoConfig,
    VideoModel,
    build_video_model,
    classifier_frames,
    predict_clip_velocity,
    sample_clips,
    save_video_model,
)

DIT_FILE = "digits_wan_video.safetensors"
CLASSIFIER_FILE = "video_frame_classifier.safetensors"
SUMMARY_FILE = "train_video_summary.json"


@dataclass(frozen=True)
class VideoDiTSettings:
    """Hyper-parameters of the video DiT run."""

    iterations: int = 2400
    batch_size: int = 12
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    ema_decay: float = 0.995
    label_dropout: float = 0.1
    grad_clip: float = 1.0


@dataclass(frozen=True)
class FrameClassifierSettings:
    """Hyper-parameters of the frame classifier run (batches of ``clips x frames`` frames)."""

    iterations: int = 1500
    clips: int = 8
    lr: float = 2e-3


def _frames(clips: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips ``(n, 1, F, H, W)`` as the classifier's frames ``(n F, 1, 32, 32)`` with their labels."""
    return classifier_frames(clips), labels.repeat_interleave(clips.shape[2])


def train_frame_classifier(
    split: DigitsSplit, seed: int, settings: FrameClassifierSettings, config: VideoConfig
) -> DigitClassifier:
    """Train the digit CNN on frames of random clips of the train split; returns it in eval mode."""
    model = build_digit_classifier(seed)
    gen = torch.Generator().manual_seed(seed + 11)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=settings.iterations)
    model.train()
    bar = tqdm(range(settings.iterations), desc="frame classifier", unit="it", mininterval=5.0)
    for _ in bar:
        clips, labels = random_clips(
            split.train_images, split.train_labels, settings.clips, config.frames, config.frame_size, gen
        )
        frames, frame_labels = _frames(clips, labels)
        loss = F.cross_entropy(model((frames + 1.0) / 2.0), frame_labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return model.eval()


def heldout_frame_accuracy(model: DigitClassifier, split: DigitsSplit, config: VideoConfig, seed: int) -> float:
    """Frame accuracy on one clip of each held-out digit, of a random motion (clips fixed by ``seed``)."""
    gen = torch.Generator().manual_seed(seed + 12)
    motions = torch.randint(0, len(MOTIONS), (len(split.heldout_labels),), generator=gen)
    clips = animate(split.heldout_images, motions, config.frames, config.frame_size, gen)
    frames, frame_labels = _frames(clips, split.heldout_labels)
    return (model.classify((frames + 1.0) / 2.0) == frame_labels).float().mean().item()


def clip_flow_loss(model: VideoModel, clips: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Rectified-flow loss on clips: predict ``noise - x0`` from ``(1 - s) x0 + s noise``, ``s`` logit-normal."""
    noise = torch.randn(clips.shape, generator=gen)
    s = torch.sigmoid(torch.randn(clips.shape[0], generator=gen))
    view = s.view(-1, 1, 1, 1, 1)
    prediction = predict_clip_velocity(model, (1.0 - view) * clips + view * noise, labels, s)
    return F.mse_loss(prediction, noise - clips)


def train_video_dit(split: DigitsSplit, seed: int, settings: VideoDiTSettings) -> tuple[VideoModel, float]:
    """Train the video DiT; returns ``(EMA model in eval mode, mean loss of the last 100 iterations)``."""
    model = build_video_model(seed)
    config = model.config
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _lr_factor(step, settings))
    gen = torch.Generator().manual_seed(seed + 13)
    recent = deque[float](maxlen=100)
    model.train()
    bar = tqdm(range(settings.iterations), desc="video dit", unit="it", mininterval=5.0)
    for step in bar:
        clips, labels = random_clips(
            split.train_images, split.train_labels, settings.batch_size, config.frames, config.frame_size, gen
        )
        labels[torch.rand(settings.batch_size, generator=gen) < settings.label_dropout] = NULL_CLASS
        loss = clip_flow_loss(model, clips, labels, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        opt.step()
        sched.step()
        _update_ema(ema, model, step, settings.ema_decay)
        recent.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == settings.iterations:
            mean = sum(recent) / len(recent)
            bar.set_postfix(loss=f"{mean:.4f}")
            tqdm.write(f"it {step + 1:6d}  loss(avg100) {mean:.4f}  lr {sched.get_last_lr()[0]:.2e}")
    return ema.eval(), sum(recent) / len(recent)


def clip_accuracy(
    model: VideoModel,
    classifier: DigitClassifier,
    seeds_per_digit: int = 2,
    steps: int = DEFAULT_STEPS,
    guidance: float = VIDEO_GUIDANCE,
) -> float:
    """Share of the frames of sampled clips (digits 0..9 x ``seeds_per_digit``) classified as asked."""
    digits = [d for d in range(10) for _ in range(seeds_per_digit)]
    clips = sample_clips(model, digits, list(range(len(digits))), steps=steps, guidance=guidance)
    frames, labels = _frames(clips * 2.0 - 1.0, torch.tensor(digits))
    return (classifier.classify((frames + 1.0) / 2.0) == labels).float().mean().item()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", choices=("all", "dit", "classifier"), default="all")
    parser.add_argument("--iterations", type=int, default=VideoDiTSettings.iterations)
    parser.add_argument("--batch-size", type=int, default=VideoDiTSettings.batch_size)
    parser.add_argument("--lr", type=float, default=VideoDiTSettings.lr)
    parser.add_argument("--classifier-iterations", type=int, default=FrameClassifierSettings.iterations)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (bit-exactness depends on it)")
    parser.add_argument("--eval-seeds", type=int, default=2, help="clips per digit for the final check")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train the requested parts, save them under ``--out`` and print a summary."""
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    split, config = split_digits(seed=args.seed), VideoConfig()
    summary: dict[str, float] = {"seed": args.seed, "threads": args.threads}
    classifier: DigitClassifier | None = None
    if args.parts in ("all", "classifier"):
        start = time.perf_counter()
        settings = FrameClassifierSettings(iterations=args.classifier_iterations)
        classifier = train_frame_classifier(split, args.seed, settings, config)
        save_digit_classifier(classifier, args.out / CLASSIFIER_FILE, frames=True)
        summary["classifier_seconds"] = time.perf_counter() - start
    elif (args.out / CLASSIFIER_FILE).is_file():
        classifier = load_frame_classifier(args.out / CLASSIFIER_FILE)
    if classifier is not None:
        summary["classifier_heldout_frame_accuracy"] = heldout_frame_accuracy(classifier, split, config, args.seed)
    if args.parts in ("all", "dit"):
        dit = VideoDiTSettings(iterations=args.iterations, batch_size=args.batch_size, lr=args.lr)
        start = time.perf_counter()
        model, final_loss = train_video_dit(split, args.seed, dit)
        summary["dit_seconds"] = time.perf_counter() - start
        summary["dit_iterations"] = args.iterations
        summary["dit_final_loss"] = final_loss
        save_video_model(model, args.out / DIT_FILE)
        if classifier is not None and args.eval_seeds > 0:
            summary["sample_frame_accuracy"] = clip_accuracy(model, classifier, args.eval_seeds)
    (args.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
