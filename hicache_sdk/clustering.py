"""Token clustering for token-level policies: batched k-means with L1 assignment."""

from __future__ import annotations

import torch

__all__ = ["kmeans_l1", "one_token_per_cluster"]


def kmeans_l1(
    tokens: torch.Tensor,
    num_clusters: int,
    *,
    iterations: int,
    init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster each sample's tokens; return ``labels (B, L)`` and ``centroids (B, K, D)``.

    Assignment by L1 distance, centroid update by the members' mean (an empty cluster keeps its
    centroid). ``init`` warm-starts from earlier centroids; otherwise ``K`` distinct tokens per
    sample, drawn with ``generator``, seed the centroids. At most ``iterations`` rounds; stops early
    when no label changes.
    """
    batch, length, _ = tokens.shape
    k = min(num_clusters, length)
    x = tokens.float()
    if init is None or init.shape[:2] != (batch, k):
        picks = torch.stack(
            [
                torch.randperm(length, generator=generator, device=generator.device if generator else "cpu")[:k]
                for _ in range(batch)
            ]
        ).to(x.device)
        centroids = torch.gather(x, 1, picks[..., None].expand(-1, -1, x.shape[-1]))
    else:
        centroids = init.float().clone()
    labels = torch.full((batch, length), -1, dtype=torch.long, device=x.device)
    for _ in range(max(iterations, 1)):
        new_labels = torch.cdist(x, centroids, p=1).argmin(dim=-1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
        onehot = torch.nn.functional.one_hot(labels, k).to(x.dtype)  # (B, L, K)
        counts = onehot.sum(dim=1)  # (B, K)
        sums = onehot.transpose(1, 2) @ x  # (B, K, D)
        filled = counts > 0
        centroids = torch.where(filled[..., None], sums / counts.clamp_min(1)[..., None], centroids)
    return labels, centroids


def one_token_per_cluster(
    labels: torch.Tensor, num_clusters: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Index ``(B, K)`` of one uniformly drawn member token per cluster.

    A cluster with no member gets an arbitrary token (it propagates to no one).
    """
    scores = torch.rand(labels.shape, generator=generator, device=labels.device)
    ids = torch.arange(num_clusters, device=labels.device)
    member = labels[:, None, :] == ids[None, :, None]  # (B, K, L)
    return torch.where(member, scores[:, None, :], -1.0).argmax(dim=-1)
