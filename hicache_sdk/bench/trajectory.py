"""A unit's feature trajectory on the embedded model: the truth against basis forecasts.

In the spirit of the HiCache paper's Figure 2: the first principal component (fitted on the
true trajectory) of one unit's feature across the steps, for full compute and for forecasts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..accelerator import compose
from ..errors import InvalidParameterError
from ..models import DigitsModel, sample
from ..runtime import UnitOutputs

__all__ = ["record_unit", "save_trajectory_plot"]


def record_unit(
    model: DigitsModel,
    unit: str,
    *,
    policy: str,
    basis: str,
    params: dict[str, object],
    digit: int,
    seed: int,
    steps: int,
) -> tuple[torch.Tensor, list[str]]:
    """Features ``(steps, numel)`` of ``unit`` (first stream, conditional sample) and how each was served."""
    features: dict[int, torch.Tensor] = {}
    served: dict[int, str] = {}

    def observer(context: str, step: int, key: str, how: str, outputs: UnitOutputs) -> None:
        if key == unit:
            features[step] = outputs[0][0].detach().float().flatten().cpu()
            served[step] = how

    with compose(policy, basis=basis, **params).apply(model.transformer) as handle:  # type: ignore[arg-type]
        handle.runtime.observers.append(observer)
        param = next(model.transformer.parameters())  # sample where, and in what dtype, the model is
        sample(model, [digit], [seed], steps=steps, device=param.device, dtype=param.dtype)
        known = sorted(handle.summary().units, key=lambda u: u.key)
    if not features:
        raise InvalidParameterError(f"unknown unit {unit!r}; units: {[u.key for u in known]}")
    return torch.stack([features[s] for s in range(steps)]), [served[s] for s in range(steps)]


def save_trajectory_plot(
    truth: torch.Tensor, forecasts: Mapping[str, tuple[torch.Tensor, Sequence[str]]], title: str, path: Path
) -> None:
    """Plot PC1 of the true trajectory against each forecast run's projection on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = truth.mean(dim=0)
    _, _, v = torch.linalg.svd(truth - mean, full_matrices=False)
    pc1 = v[0]
    steps = range(len(truth))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, ((truth - mean) @ pc1).numpy(), color="black", lw=2, label="full compute (truth)")
    for i, (label, (feats, served)) in enumerate(forecasts.items()):
        proj = ((feats - mean) @ pc1).numpy()
        forecast_steps = [s for s in steps if served[s] == "forecast"]
        anchor_steps = [s for s in steps if served[s] != "forecast"]
        color = f"C{i}"
        ax.plot(steps, proj, color=color, lw=0.8, alpha=0.6)
        ax.scatter(forecast_steps, proj[forecast_steps], color=color, s=14, label=f"{label} forecast")
        ax.scatter(anchor_steps, proj[anchor_steps], color=color, s=22, marker="s", facecolors="none")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("feature PC1")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
