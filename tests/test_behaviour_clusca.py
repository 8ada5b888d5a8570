"""ClusCa's clusters against an L1 k-means written here, read from what a run serves (no internal state).

The clusters ClusCa used are read off its forecasts of the image MLPs (helpers.replay_clusca_image_mlp
replays every forecast from the MLP's fresh outputs, the served anchors and the documented refresh);
docs and plugins/clusca.py say they come from a k-means with L1 distance of the designated block's
image tokens, run to convergence here. A converged L1 k-means is a fixed point: started from the
means of its own clusters, :func:`helpers.l1_kmeans` (a dozen lines, independent of the SDK) moves
no token. Clusters made with another distance (L2) are generally not: some token is nearer, in L1,
to another cluster's mean.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import FluxTransformer2DModel
from helpers import cluster_means, flux_inputs, l1_kmeans, replay_clusca_image_mlp, tiny_flux, trace_clusca
from hicache_sdk.plugins.bases import TaylorBasis

K = 6
GAMMA = 0.25


@pytest.fixture(scope="module")
def model() -> FluxTransformer2DModel:
    return tiny_flux()


@pytest.fixture(scope="module")
def inputs() -> dict[str, Any]:
    return flux_inputs(batch=2, side=8, text=6)  # 64 image tokens per sample


@pytest.mark.parametrize("cluster_block", [0, 1])
def test_clusca_clusters_are_an_l1_kmeans_of_the_designated_blocks_tokens(
    cluster_block: int, model: FluxTransformer2DModel, inputs: dict[str, Any]
) -> None:
    trace = trace_clusca(
        model,
        inputs,
        steps=10,
        interval=3,
        warmup=1,
        num_clusters=K,
        gamma=GAMMA,
        kmeans_iterations=100,  # converged at every full step
        cluster_block=cluster_block,
    )
    assert trace.full_steps() == [0, 3, 6, 9]
    for block in (0, 1):  # every image MLP is refreshed with the same clusters
        refresh = replay_clusca_image_mlp(trace, block, basis=TaylorBasis(), max_order=1, warmup=1, gamma=GAMMA)
        assert sorted(refresh.labels) == [1, 2, 4, 5, 7, 8]
        for step, labels in refresh.labels.items():
            tokens = trace.block_images[cluster_block][trace.anchor_before(step)]
            for b in range(2):
                assert (labels[b] >= 0).all()
                again, _ = l1_kmeans(tokens[b], cluster_means(tokens[b], labels[b], K), iterations=100)
                moved = (again != labels[b]).nonzero().flatten().tolist()
                assert not moved, (
                    f"block {block}, step {step}, sample {b}: ClusCa's clusters are not an L1 k-means of block "
                    f"{cluster_block}'s image tokens: tokens {moved} are nearer (L1) to another cluster's mean"
                )


def test_the_fixed_point_check_tells_l1_from_l2(model: FluxTransformer2DModel, inputs: dict[str, Any]) -> None:
    """The check above has power: on these tokens an L2 k-means (converged) is not an L1 fixed point."""
    trace = trace_clusca(model, inputs, steps=4, interval=3, warmup=1, num_clusters=K, kmeans_iterations=100)
    moved = 0
    for b in range(2):
        tokens = trace.block_images[1][0][b].double()
        centroids = tokens[:K].clone()
        labels = torch.full((tokens.shape[0],), -1)
        for _ in range(100):  # L2 k-means, the same rules otherwise
            new = torch.cdist(tokens, centroids).argmin(dim=1)
            if torch.equal(new, labels):
                break
            labels = new
            centroids = torch.stack(
                [tokens[labels == c].mean(dim=0) if (labels == c).any() else centroids[c] for c in range(K)]
            )
        if (labels.bincount(minlength=K) > 0).all():
            again, _ = l1_kmeans(tokens, cluster_means(tokens, labels, K), iterations=100)
            moved += int((again != labels).sum())
    assert moved > 0
