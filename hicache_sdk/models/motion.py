"""Procedural short clips of moving digits: the video model's training data.

Each clip places one digit (a 32x32 image from :mod:`.data`) on a ``size x size`` canvas at a
fraction of its size and animates it over ``frames`` frames with one of four motions:

- ``move``: constant velocity, bouncing off the canvas borders;
- ``rotate``: a turn of constant angular speed about the digit's centre;
- ``zoom``: the scale growing or shrinking at a constant rate;
- ``mixed``: all three at once, at lower speeds.

Everything is drawn from a :class:`torch.Generator`, so a seed fixes the clips. Pixels are in
``[-1, 1]`` (background -1), clips are ``(n, 1, frames, size, size)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["MOTIONS", "MotionRanges", "animate", "random_clips"]

MOTIONS = ("move", "rotate", "zoom", "mixed")
"""The motion kinds, in the order of their index in :func:`animate`."""


class MotionRanges:
    """Ranges of the random motion parameters (canvas units: the canvas spans ``[-1, 1]``)."""

    scale = (0.7, 0.8)  # the digit's side over the canvas side
    speed = (0.05, 0.12)  # move: canvas units per frame
    angle = 0.0  # every clip: initial tilt up to this (the digits start upright)
    spin = (math.radians(2.0), math.radians(5.0))  # rotate: radians per frame
    zoom = (0.02, 0.04)  # zoom: relative scale change per frame
    mixed = 0.5  # mixed: each speed times this


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)


def _sign(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=gen).double() * 2.0 - 1.0


def _bounce(start: torch.Tensor, velocity: torch.Tensor, limit: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Positions ``(n, frames)`` of points moving at ``velocity`` and reflecting off ``[-limit, limit]``.

    A point with ``limit == 0`` (a digit as wide as the canvas) stays at the centre.
    """
    span = 2.0 * limit[:, None]
    raw = start[:, None] + velocity[:, None] * t[None, :] + limit[:, None]
    phase = torch.remainder(raw, 2.0 * span)
    reflected = torch.where(phase <= span, phase, 2.0 * span - phase) - limit[:, None]
    return torch.where(span > 0, reflected, torch.zeros_like(reflected))


def animate(images: torch.Tensor, motions: torch.Tensor, frames: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Clips ``(n, 1, frames, size, size)`` of ``images`` ``(n, 1, H, W)`` in ``[-1, 1]``.

    ``motions`` ``(n,)`` holds each clip's motion index into :data:`MOTIONS`; the motion's
    parameters are drawn from ``gen``.
    """
    n = len(images)
    r = MotionRanges
    t = torch.arange(frames, dtype=torch.float64)
    kind = motions.long()
    move, rotate, zoom, mixed = (kind == i for i in range(4))
    slow = torch.where(mixed, r.mixed, 1.0).double()
    scale0 = _uniform(n, *r.scale, gen)
    rate = torch.where(zoom | mixed, _uniform(n, *r.zoom, gen) * _sign(n, gen) * slow, 0.0)
    scale = scale0[:, None] * torch.exp(rate[:, None] * (t - (frames - 1) / 2.0)[None, :])
    spin = torch.where(rotate | mixed, _uniform(n, *r.spin, gen) * _sign(n, gen) * slow, 0.0)
    angle = _uniform(n, -r.angle, r.angle, gen)[:, None] + spin[:, None] * t[None, :]
    limit = (1.0 - scale.max(dim=1).values).clamp(min=0.0)
    speed = torch.where(move | mixed, _uniform(n, *r.speed, gen) * slow, 0.0)
    heading = _uniform(n, 0.0, 2.0 * math.pi, gen)
    centre = [
        _bounce(_uniform(n, -1.0, 1.0, gen) * limit, speed * f(heading), limit, t) for f in (torch.cos, torch.sin)
    ]
    # The sampling grid maps output (canvas) coordinates to input (digit) coordinates:
    # input = R(-angle) (output - centre) / scale.
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    cx, cy = centre
    theta = torch.stack(
        [
            torch.stack([cos, sin, -(cos * cx + sin * cy)], dim=-1),
            torch.stack([-sin, cos, -(-sin * cx + cos * cy)], dim=-1),
        ],
        dim=-2,
    ).reshape(n * frames, 2, 3)
    grid = F.affine_grid(theta.float(), [n * frames, 1, size, size], align_corners=False)
    source = (images.float() + 1.0).repeat_interleave(frames, dim=0)  # background 0 for zero padding
    out = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0
    return out.view(n, frames, 1, size, size).transpose(1, 2).contiguous()


def random_clips(
    images: torch.Tensor, labels: torch.Tensor, count: int, frames: int, size: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` random clips of random digits from ``images`` / ``labels``: ``(clips, labels)``."""
    idx = torch.randint(0, len(labels), (count,), generator=gen)
    motions = torch.randint(0, len(MOTIONS), (count,), generator=gen)
    return animate(images[idx], motions, frames, size, gen), labels[idx].clone()
