"""ClusCa (arXiv 2509.10312): TaylorSeer plus a per-step refresh of a few clustered tokens.

At each full step the image tokens of one designated block are clustered (k-means, L1 distance,
warm-started from the previous centroids); every layer reuses those labels. At a forecast step,
for each image MLP unit, the real MLP runs on one random token per cluster; those outputs
overwrite ``D^0`` at their positions and every token is pulled toward its cluster's fresh value,
``D^0_j <- gamma f_c(j) + (1 - gamma) D^0_j``; then the basis forecast runs on the updated ladder.
Text MLP units get ``K`` fresh random tokens written in, without propagation. Other units are
forecast as in TaylorSeer. The ``D^0`` edits persist in the ladder, as in the reference code.
"""

from __future__ import annotations

import attrs
import torch

from hicache_sdk.adapter import Adapter
from hicache_sdk.clustering import kmeans_l1, one_token_per_cluster
from hicache_sdk.decision import BlockView
from hicache_sdk.errors import InvalidParameterError
from hicache_sdk.ladder import DifferenceLadder
from hicache_sdk.policy import IntervalPolicy, ScheduleConfig, TokenPath, interval_field, order_field
from hicache_sdk.state import ContextState, UnitState
from hicache_sdk.validation import attrs_validator, check_int, check_real

__all__ = ["ClusCa", "ClusCaConfig"]


@attrs.frozen(kw_only=True)
class ClusCaConfig(ScheduleConfig):
    """ClusCa settings; defaults are the reference FLUX ones (N=5, m=1, W=3, K=16, gamma=0.005).

    Attributes:
        num_clusters: K >= 1 clusters, i.e. fresh image tokens per MLP unit per forecast step.
        gamma: propagation weight in [0, 1] (0 writes fresh tokens only; the paper uses 0 on DiT).
        cluster_block: index of the block whose image hidden states are clustered, counted in
            the adapter's clustering blocks (Flux: double-stream blocks); -1 is the last.
        kmeans_iterations: at most this many k-means rounds per full step (>= 1).
        seed: seed of the token draws and the first centroids, re-applied at every generation.
    """

    interval: int = interval_field(5)
    max_order: int = order_field(1)
    num_clusters: int = attrs.field(default=16, validator=attrs_validator(check_int, minimum=1))
    gamma: float = attrs.field(default=0.005, validator=attrs_validator(check_real, low=0.0, high=1.0))
    cluster_block: int = attrs.field(default=-1, validator=attrs_validator(check_int))
    kmeans_iterations: int = attrs.field(default=10, validator=attrs_validator(check_int, minimum=1))
    seed: int = attrs.field(default=0, validator=attrs_validator(check_int, minimum=0))


class ClusterState:
    """Per-context clustering state: labels and centroids of the newest full step, and the RNG."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.labels: torch.Tensor | None = None
        self.centroids: torch.Tensor | None = None
        self.generator: torch.Generator | None = None

    def rng(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator

    @property
    def nbytes(self) -> int:
        held = [t for t in (self.labels, self.centroids) if t is not None]
        return sum(t.numel() * t.element_size() for t in held)


class ClusCa(IntervalPolicy):
    """ClusCa: clustered token refresh of the image MLPs on top of any basis forecast."""

    name = "clusca"
    Config = ClusCaConfig
    needs_token_paths = True
    block_work_flops = True

    def new_policy_state(self) -> ClusterState:
        return ClusterState(self.config.seed)

    def check_adapter(self, adapter: Adapter) -> None:
        self._check_cluster_block(adapter.observed_blocks, type(adapter.model).__name__)

    def _check_cluster_block(self, num_blocks: int, model: str = "this model") -> None:
        chosen = self.config.cluster_block
        if not -num_blocks <= chosen < num_blocks:
            raise InvalidParameterError(
                f"cluster_block must be in [{-num_blocks}, {num_blocks - 1}] for {model} "
                f"({num_blocks} clustering blocks), got {chosen}"
            )

    def on_block(self, ctx: ContextState, view: BlockView) -> None:
        """At full steps, cluster the image tokens leaving the chosen block."""
        if not ctx.full or view.index >= view.observed_blocks:
            return
        chosen = self.config.cluster_block
        self._check_cluster_block(view.observed_blocks)
        if view.index != chosen % view.observed_blocks:
            return
        state: ClusterState = ctx.policy_state
        state.labels, state.centroids = kmeans_l1(
            view.tokens_out.detach(),
            self.config.num_clusters,
            iterations=self.config.kmeans_iterations,
            init=state.centroids,
            generator=state.rng(view.tokens_out.device),
        )

    def forecast(
        self, ctx: ContextState, unit: UnitState, token_paths: tuple[TokenPath, ...]
    ) -> tuple[torch.Tensor, ...]:
        paths = {p.stream: p for p in token_paths}
        for stream, ladder in zip(unit.streams, unit.ladders, strict=True):
            path = paths.get(stream)
            if path is not None:
                self._refresh(ctx.policy_state, ladder, path)
        return super().forecast(ctx, unit, token_paths)

    def _refresh(self, state: ClusterState, ladder: DifferenceLadder, path: TokenPath) -> bool:
        d0 = ladder.term(0)  # (B, L, D): a view of the ladder, or a decoded copy written back below
        batch, length, width = d0.shape
        rng = state.rng(d0.device)
        if path.kind == "image":
            if state.labels is None or state.labels.shape != (batch, length):
                return False
            k = min(self.config.num_clusters, length)
            index = one_token_per_cluster(state.labels, k, rng)
        else:
            k = min(self.config.num_clusters, length)
            index = torch.stack([torch.randperm(length, generator=rng, device=d0.device)[:k] for _ in range(batch)])
        fresh = path.compute(index).to(d0.dtype)  # (B, K, D)
        if path.kind == "image" and self.config.gamma > 0 and state.labels is not None:
            per_token = torch.gather(fresh, 1, state.labels[..., None].expand(-1, -1, width))
            d0.lerp_(per_token, self.config.gamma)
        d0.scatter_(1, index[..., None].expand(-1, -1, width), fresh)
        ladder.set_term(0, d0)
        return True
