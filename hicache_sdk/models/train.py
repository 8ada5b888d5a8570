"""Train the digits DiT and the digit classifier that ship with hicache-sdk.

Usage::

    python -m hicache_sdk.models.train --out DIR [--seed 0] [--iterations N] [--parts all]

Writes ``digits_flux.safetensors``, ``digits_classifier.safetensors`` and
``train_summary.json`` to ``DIR``. Runs on CPU with a fixed seed and deterministic
algorithms; results are bit-reproducible for a given torch build and thread count.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .classifier import DigitClassifier, build_digit_classifier, load_digit_classifier, save_digit_classifier
from .data import DigitsSplit, random_shift, split_digits
from .digits import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    NULL_CLASS,
    DigitsModel,
    build_digits_model,
    pack_images,
    predict_velocity,
    sample,
    save_digits_model,
)

DIT_FILE = "digits_flux.safetensors"
CLASSIFIER_FILE = "digits_classifier.safetensors"


@dataclass(frozen=True)
class DiTSettings:
    """Hyper-parameters of the DiT run."""

    iterations: int = 1600
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    ema_decay: float = 0.998
    label_dropout: float = 0.1
    max_shift: int = 1
    grad_clip: float = 1.0


@dataclass(frozen=True)
class ClassifierSettings:
    """Hyper-parameters of the classifier run."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    max_shift: int = 2


# ----------------------------------------------------------------------------- classifier


def train_classifier(split: DigitsSplit, seed: int, settings: ClassifierSettings) -> DigitClassifier:
    """Train the CNN on the train split (with random shifts); returns it in eval mode."""
    model = build_digit_classifier(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    n = len(split.train_labels)
    steps = settings.epochs * math.ceil(n / settings.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=steps)
    model.train()
    bar = tqdm(range(settings.epochs), desc="classifier", unit="epoch")
    for _ in bar:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, settings.batch_size):
            idx = order[start : start + settings.batch_size]
            images = random_shift(split.train_images[idx], settings.max_shift, gen)
            loss = F.cross_entropy(model((images + 1.0) / 2.0), split.train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return model.eval()


def classifier_accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` (in ``[-1, 1]``) classified as ``labels``."""
    predicted = model.classify((images + 1.0) / 2.0)
    return (predicted == labels).float().mean().item()


# ----------------------------------------------------------------------------- DiT


class Schedule(Protocol):
    """What the learning-rate schedule reads from a run's settings."""

    @property
    def warmup(self) -> int: ...

    @property
    def iterations(self) -> int: ...


def _lr_factor(step: int, settings: Schedule) -> float:
    """Linear warm-up then cosine decay to zero."""
    if step < settings.warmup:
        return (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.iterations - settings.warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def flow_matching_loss(
    model: DigitsModel, images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """Rectified-flow loss: predict ``noise - x0`` from ``(1 - s) x0 + s noise``, ``s`` logit-normal."""
    noise = torch.randn(images.shape, generator=gen)
    s = torch.sigmoid(torch.randn(images.shape[0], generator=gen))
    noisy = (1.0 - s.view(-1, 1, 1, 1)) * images + s.view(-1, 1, 1, 1) * noise
    patch = model.config.patch
    prediction = predict_velocity(model, pack_images(noisy, patch), labels, s)
    return F.mse_loss(prediction, pack_images(noise - images, patch))


@torch.no_grad()
def _update_ema(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    rate = min(decay, (1.0 + step) / (10.0 + step))
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1.0 - rate)


def train_dit(split: DigitsSplit, seed: int, settings: DiTSettings) -> tuple[DigitsModel, float]:
    """Train the DiT; returns ``(EMA model in eval mode, mean loss of the last 100 iterations)``."""
    model = build_digits_model(seed)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _lr_factor(step, settings))
    gen = torch.Generator().manual_seed(seed + 2)
    n, recent = len(split.train_labels), deque[float](maxlen=100)
    model.train()
    bar = tqdm(range(settings.iterations), desc="dit", unit="it", mininterval=5.0)
    for step in bar:
        idx = torch.randint(0, n, (settings.batch_size,), generator=gen)
        images = random_shift(split.train_images[idx], settings.max_shift, gen)
        labels = split.train_labels[idx].clone()
        labels[torch.rand(settings.batch_size, generator=gen) < settings.label_dropout] = NULL_CLASS
        loss = flow_matching_loss(model, images, labels, gen)
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


# ----------------------------------------------------------------------------- evaluation


def sample_accuracy(
    model: DigitsModel,
    classifier: DigitClassifier,
    seeds_per_digit: int = 10,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
) -> tuple[float, torch.Tensor]:
    """Fraction of samples (digits 0..9 x ``seeds_per_digit`` seeds) classified as asked."""
    digits = [d for d in range(10) for _ in range(seeds_per_digit)]
    seeds = list(range(len(digits)))
    images = sample(model, digits, seeds, steps=steps, guidance=guidance)
    predicted = classifier.classify(images)
    return (predicted == torch.tensor(digits)).float().mean().item(), images


# ----------------------------------------------------------------------------- CLI


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", choices=("all", "dit", "classifier"), default="all")
    parser.add_argument("--iterations", type=int, default=DiTSettings.iterations)
    parser.add_argument("--batch-size", type=int, default=DiTSettings.batch_size)
    parser.add_argument("--lr", type=float, default=DiTSettings.lr)
    parser.add_argument("--ema-decay", type=float, default=DiTSettings.ema_decay)
    parser.add_argument("--classifier-epochs", type=int, default=ClassifierSettings.epochs)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (bit-exactness depends on it)")
    parser.add_argument("--eval-seeds", type=int, default=10, help="samples per digit for the final check")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train the requested parts, save them under ``--out`` and print a summary."""
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    split = split_digits(seed=args.seed)
    summary: dict[str, float] = {"seed": args.seed}
    classifier: DigitClassifier | None = None
    if args.parts in ("all", "classifier"):
        start = time.perf_counter()
        classifier = train_classifier(split, args.seed, ClassifierSettings(epochs=args.classifier_epochs))
        save_digit_classifier(classifier, args.out / CLASSIFIER_FILE)
        summary["classifier_seconds"] = time.perf_counter() - start
    elif (args.out / CLASSIFIER_FILE).is_file():
        classifier = load_digit_classifier(args.out / CLASSIFIER_FILE)
    if classifier is not None:
        summary["classifier_heldout_accuracy"] = classifier_accuracy(
            classifier, split.heldout_images, split.heldout_labels
        )
    if args.parts in ("all", "dit"):
        settings = DiTSettings(
            iterations=args.iterations, batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay
        )
        start = time.perf_counter()
        model, final_loss = train_dit(split, args.seed, settings)
        summary["dit_seconds"] = time.perf_counter() - start
        summary["dit_iterations"] = args.iterations
        summary["dit_final_loss"] = final_loss
        save_digits_model(model, args.out / DIT_FILE)
        if classifier is not None and args.eval_seeds > 0:
            summary["sample_accuracy"], _ = sample_accuracy(model, classifier, args.eval_seeds)
    (args.out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
