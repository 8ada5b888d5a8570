"""The built-in policies on a tiny Flux model: configs, every basis, exactness, forecasts, ClusCa, safety."""

from __future__ import annotations

import itertools
import math
import types
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest
import torch
from diffusers import FluxTransformer2DModel
from helpers import (
    ClusCaRefresh,
    ClusCaTrace,
    ReferenceLadder,
    UnitRecorder,
    cluster_means,
    flux_inputs,
    l1_kmeans,
    replay_clusca_image_mlp,
    run_loop,
    tiny_flux,
    trace_clusca,
)
from hicache_sdk.plugins.bases import TaylorBasis
from hicache_sdk.plugins.clusca import ClusCaConfig
from hicache_sdk.plugins.policies import ForaConfig, TaylorSeerConfig

import hicache_sdk as sdk
from hicache_sdk import hookimpl
from hicache_sdk.basis import Basis
from hicache_sdk.clustering import kmeans_l1, one_token_per_cluster
from hicache_sdk.errors import InvalidParameterError
from hicache_sdk.ladder import DifferenceLadder

POLICIES = ("fora", "taylorseer", "clusca")
BASES = ("taylor", "hermite", "scaled_taylor", "newton")
STEPS = 10


@pytest.fixture(scope="module")
def model() -> FluxTransformer2DModel:
    return tiny_flux()


@pytest.fixture(scope="module")
def inputs() -> dict[str, Any]:
    return flux_inputs(batch=2, side=4, text=6)


@pytest.fixture(scope="module")
def reference(model: FluxTransformer2DModel, inputs: dict[str, Any]) -> torch.Tensor:
    return run_loop(model, inputs, steps=STEPS)


# -- configs ---------------------------------------------------------------------------------------
def test_reference_defaults_and_schedule_convention() -> None:
    fora, seer, clusca = (sdk.get_policy(n).Config() for n in POLICIES)
    assert (fora.interval, fora.warmup, fora.schedule) == (3, 1, "reference")
    assert not hasattr(fora, "max_order")  # FORA is order 0 whatever the basis
    assert (seer.interval, seer.warmup, seer.max_order, seer.schedule) == (6, 3, 1, "reference")
    assert (clusca.interval, clusca.warmup, clusca.max_order, clusca.schedule) == (5, 3, 1, "reference")
    assert (clusca.num_clusters, clusca.gamma, clusca.kmeans_iterations, clusca.cluster_block) == (16, 0.005, 10, -1)


@pytest.mark.parametrize("config_cls", [ForaConfig, TaylorSeerConfig, ClusCaConfig])
def test_configs_are_frozen_and_keyword_only(config_cls: type) -> None:
    config = config_cls()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.interval = 2
    with pytest.raises(TypeError):
        config_cls(4)
    assert attrs.evolve(config, interval=2).interval == 2


@pytest.mark.parametrize(
    ("policy", "params", "match"),
    [
        ("fora", {"interval": 0}, r"interval must be >= 1, got 0"),
        ("taylorseer", {"interval": -3}, r"interval must be >= 1, got -3"),
        ("taylorseer", {"interval": 2.5}, r"interval must be an integer, got 2.5"),
        ("taylorseer", {"warmup": -1}, r"warmup must be >= 0, got -1"),
        ("taylorseer", {"max_order": -1}, r"max_order must be >= 0, got -1"),
        ("clusca", {"max_order": 7}, r"max_order must be <= 6, got 7"),
        ("clusca", {"num_clusters": 0}, r"num_clusters must be >= 1, got 0"),
        ("clusca", {"gamma": -0.1}, r"gamma must be in \[0, 1\], got -0.1"),
        ("clusca", {"gamma": 1.5}, r"gamma must be in \[0, 1\], got 1.5"),
        ("clusca", {"gamma": math.nan}, r"gamma must be finite"),
        ("clusca", {"kmeans_iterations": 0}, r"kmeans_iterations must be >= 1, got 0"),
        ("taylorseer", {"schedule": "diffuser"}, r"schedule must be one of .* Did you mean 'diffusers'\?"),
    ],
)
def test_bad_parameters_are_clear_errors(policy: str, params: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidParameterError, match=match):
        sdk.compose(policy, **params)
    with pytest.raises(InvalidParameterError, match=match):
        sdk.get_policy(policy).Config(**params)


def test_boundary_values_are_accepted() -> None:
    sdk.compose("clusca", interval=1, warmup=0, max_order=0, num_clusters=1, gamma=0.0)
    sdk.compose("clusca", max_order=6, gamma=1.0)


def test_cluster_block_outside_the_model_is_a_clear_error(
    model: FluxTransformer2DModel, inputs: dict[str, Any]
) -> None:
    acc = sdk.compose("clusca", cluster_block=2, num_clusters=2)
    with pytest.raises(InvalidParameterError, match=r"cluster_block must be in \[-2, 1\].*got 2"):
        acc.apply(model)  # refused before anything is attached
    with sdk.compose("clusca", cluster_block=-2, num_clusters=2).apply(model) as handle:  # the model is free
        run_loop(model, inputs, steps=2)
    assert handle.summary().steps == 2


# -- every policy with every basis -----------------------------------------------------------------
@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("policy", POLICIES)
def test_interval_one_equals_no_cache_exactly(
    policy: str, basis: str, model: FluxTransformer2DModel, inputs: dict[str, Any], reference: torch.Tensor
) -> None:
    params: dict[str, Any] = {"num_clusters": 4} if policy == "clusca" else {}
    with sdk.compose(policy, basis=basis, interval=1, **params).apply(model) as handle:
        out = run_loop(model, inputs, steps=STEPS)
    assert torch.equal(out, reference)
    summary = handle.summary()
    assert (summary.full_steps, summary.forecast_steps, summary.fallbacks) == (STEPS, 0, 0)
    if policy == "clusca":  # nothing saved, and the clustering is paid for
        assert summary.flops_saved_fraction < 0.0
    else:
        assert summary.flops_saved_fraction == 0.0
        assert summary.cache_bytes == 0  # no forecast ever reads a ladder, so none is filled


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_accepts_every_basis(
    policy: str, basis: str, model: FluxTransformer2DModel, inputs: dict[str, Any], reference: torch.Tensor
) -> None:
    params: dict[str, Any] = {"interval": 3, "warmup": 2}
    if policy != "fora":
        params["max_order"] = 2
    if policy == "clusca":
        params["num_clusters"] = 4
    with sdk.compose(policy, basis=basis, **params).apply(model) as handle:
        out = run_loop(model, inputs, steps=STEPS)
    summary = handle.summary()
    assert torch.isfinite(out).all()
    assert not torch.equal(out, reference)  # forecasts happened
    assert (summary.full_steps, summary.forecast_steps, summary.fallbacks) == (4, 6, 0)  # full at 0, 1, 4, 7
    assert sdk.get_basis(basis).name in summary.basis
    assert 0.0 < summary.flops_saved_fraction < 1.0


@pytest.mark.parametrize("basis", BASES)
def test_fora_reuses_the_newest_output_whatever_the_basis(
    basis: str, model: FluxTransformer2DModel, inputs: dict[str, Any]
) -> None:
    recorder = UnitRecorder()
    with sdk.compose("fora", basis=basis, interval=3, warmup=1).apply(model) as handle:
        handle.add_observer(recorder)
        run_loop(model, inputs, steps=STEPS)
    summary = handle.summary()
    keys = recorder.keys()
    assert keys == [u.key for u in summary.units] and len(keys) == 8
    for key in keys:  # every unit and stream: a forecast is the newest anchor itself, whatever the basis
        assert recorder.steps(key, "computed") == [0, 3, 6, 9]
        for step in recorder.steps(key, "forecast"):
            anchor = max(s for s in recorder.steps(key, "computed") if s < step)
            for got, kept in zip(recorder.outputs(key, step), recorder.outputs(key, anchor), strict=True):
                assert torch.equal(got, kept), (key, step)
    # order 0: the ladders hold one copy of each stream's output and nothing more
    one_copy = sum(t.numel() * t.element_size() for key in keys for t in recorder.outputs(key, 9))
    assert summary.cache_bytes == one_copy


@pytest.mark.parametrize("basis", BASES)
def test_taylorseer_forecast_is_the_basis_sum_over_the_ladder(
    basis: str, model: FluxTransformer2DModel, inputs: dict[str, Any]
) -> None:
    recorder = UnitRecorder()
    basis_obj = sdk.get_basis(basis)()
    with sdk.compose("taylorseer", basis=basis_obj, interval=3, warmup=2, max_order=2).apply(model) as handle:
        handle.add_observer(recorder)
        run_loop(model, inputs, steps=14)
    for key in ("transformer_blocks.0.attn", "single_transformer_blocks.1.proj_out"):
        computed = recorder.steps(key, "computed")
        assert computed == [0, 1, 4, 7, 10, 13]
        for stream in range(len(recorder.outputs(key, 0))):
            ladder = ReferenceLadder(max_order=2, warmup=2)  # restarts at step 0, grows from step W - 1 = 1 on
            for step in recorder.steps(key):
                how, outputs = recorder.events["default", key, step]
                if how == "computed":
                    ladder.anchor(step, outputs[stream])
                else:
                    assert how == "forecast"
                    expected = ladder.forecast(step, basis_obj)
                    torch.testing.assert_close(outputs[stream].double(), expected, rtol=1e-5, atol=1e-5)


# -- ClusCa token path -----------------------------------------------------------------------------
# ClusCa is checked from outside: the image MLP's own outputs (forward hooks), the units the runtime
# served (handle.add_observer) and the documented refresh, replayed by helpers.replay_clusca_image_mlp.
def assert_one_token_per_cluster(trace: ClusCaTrace, refresh: ClusCaRefresh) -> int:
    """Between two full steps the clusters do not change, and each recomputed token is in its cluster.

    A token recomputed for cluster ``c`` at one forecast step must, at another forecast step after
    the same full step, be pulled toward cluster ``c``'s fresh value (or hold it again). Returns
    how many pairs of forecast steps were compared.
    """
    pairs = 0
    for first, second in itertools.permutations(sorted(refresh.labels), 2):
        if trace.anchor_before(first) != trace.anchor_before(second):
            continue
        assert torch.equal(refresh.labels[first], refresh.labels[second]), (first, second)
        chosen = refresh.chosen[first]
        clusters = torch.gather(refresh.labels[second], 1, chosen)
        assert torch.equal(clusters, torch.arange(chosen.shape[1]).expand_as(chosen)), (first, second, clusters)
        pairs += 1
    return pairs


def test_clusca_runs_the_image_mlp_on_exactly_k_tokens_per_sample(
    model: FluxTransformer2DModel, inputs: dict[str, Any]
) -> None:
    trace = trace_clusca(model, inputs, steps=7, interval=3, warmup=1, num_clusters=5)
    counter = trace.counter
    full, forecast = 3, 4  # steps 0, 3, 6 full
    tokens, text = 16, 6
    for i in range(2):
        assert counter.rows[f"transformer_blocks.{i}.ff"] == [tokens, 5, 5, tokens, 5, 5, tokens]
        assert counter.batches[f"transformer_blocks.{i}.ff"] == [2] * 7
        assert counter.rows[f"transformer_blocks.{i}.ff_context"] == [text, 5, 5, text, 5, 5, text]
        assert counter.calls[f"transformer_blocks.{i}.attn"] == full
        assert counter.calls[f"single_transformer_blocks.{i}.attn"] == full
        assert counter.calls[f"single_transformer_blocks.{i}.proj_mlp"] == full
    units = {u.key: u for u in trace.summary.units}
    assert units["transformer_blocks.0.ff"].partial == forecast
    assert units["transformer_blocks.0.ff_context"].partial == forecast
    assert units["transformer_blocks.0.attn"].partial == 0
    assert units["single_transformer_blocks.0.proj_out"].partial == 0
    assert torch.isfinite(trace.output).all()


def test_clusca_with_more_clusters_than_tokens_refreshes_every_token(
    model: FluxTransformer2DModel, inputs: dict[str, Any]
) -> None:
    trace = trace_clusca(model, inputs, steps=4, interval=3, warmup=1, num_clusters=64)
    assert sorted(trace.counter.rows["transformer_blocks.0.ff"]) == [16, 16, 16, 16]


def test_clusca_gamma_zero_writes_fresh_tokens_only(model: FluxTransformer2DModel, inputs: dict[str, Any]) -> None:
    k = 4
    zero = trace_clusca(model, inputs, steps=6, interval=3, warmup=1, num_clusters=k, gamma=0.0)
    # the replay checks that each forecast is the basis forecast of the newest anchor with exactly
    # one token per sample holding each of the K fresh values and every other token unchanged
    refresh = replay_clusca_image_mlp(zero, 1, basis=TaylorBasis(), max_order=1, warmup=1, gamma=0.0)
    assert sorted(refresh.chosen) == [1, 2, 4, 5]
    assert all(chosen.shape == (2, k) for chosen in refresh.chosen.values())
    # which cluster each token is in shows only with gamma > 0: the same seed clusters step 0 and
    # draws the tokens alike, so a pulled run names the clusters of the tokens recomputed here
    pulled = trace_clusca(model, inputs, steps=6, interval=3, warmup=1, num_clusters=k, gamma=0.25)
    named = replay_clusca_image_mlp(pulled, 1, basis=TaylorBasis(), max_order=1, warmup=1, gamma=0.25)
    for step in (1, 2):
        assert torch.equal(refresh.chosen[step], named.chosen[step])
        clusters = torch.gather(named.labels[3 - step], 1, refresh.chosen[step])  # read at the other step
        assert torch.equal(clusters, torch.arange(k).expand(2, k))  # one token per cluster


@pytest.mark.parametrize("basis", ["taylor", "newton"])
def test_clusca_gamma_pulls_every_token_toward_its_cluster(
    basis: str, model: FluxTransformer2DModel, inputs: dict[str, Any]
) -> None:
    """The whole refresh, replayed: fresh tokens, the gamma pull, persisted edits, the warm-up rule."""
    k, gamma, warmup = 4, 0.25, 3
    basis_obj = sdk.get_basis(basis)()
    trace = trace_clusca(
        model, inputs, steps=12, basis=basis_obj, interval=3, warmup=warmup, max_order=2, num_clusters=k, gamma=gamma
    )
    assert trace.full_steps() == [0, 1, 2, 5, 8, 11]
    # the ladder restarts at steps 0 and 1, grows from step W - 1 = 2 on, and reaches order 2 at step 5
    refreshes = [
        replay_clusca_image_mlp(trace, block, basis=basis_obj, max_order=2, warmup=warmup, gamma=gamma)
        for block in (0, 1)
    ]
    assert sorted(refreshes[0].labels) == [3, 4, 6, 7, 9, 10]
    assert all((labels >= 0).all() for labels in refreshes[0].labels.values())  # every token's cluster read
    assert assert_one_token_per_cluster(trace, refreshes[1]) == 6  # 3 intervals, 2 ordered pairs each
    for step, labels in refreshes[0].labels.items():  # one clustering per full step, used by every block
        assert torch.equal(labels, refreshes[1].labels[step]), step


def test_clusca_clusters_each_sample_separately(model: FluxTransformer2DModel) -> None:
    pair = flux_inputs(batch=2, side=4, seed=3)
    alone = {
        k: v[:1] if k in ("hidden_states", "encoder_hidden_states", "pooled_projections") else v
        for k, v in pair.items()
    }
    params: dict[str, Any] = {"interval": 3, "warmup": 1, "num_clusters": 4, "gamma": 0.25}
    labels = {}
    for name, batch in (("pair", pair), ("alone", alone)):
        trace = trace_clusca(model, batch, steps=5, **params)
        refresh = replay_clusca_image_mlp(trace, 1, basis=TaylorBasis(), max_order=1, warmup=1, gamma=0.25)
        labels[name] = [refresh.labels[step] for step in (1, 4)]  # the clusters of full steps 0 and 3
    assert labels["pair"][0].shape == (2, 16)
    assert all(torch.equal(p[:1], a) for p, a in zip(labels["pair"], labels["alone"], strict=True))
    assert not torch.equal(labels["pair"][0][0], labels["pair"][0][1])


@pytest.mark.parametrize("cluster_block", [0, -1])
def test_clusca_clusters_the_designated_block_once_per_full_step_warm_started(
    cluster_block: int, model: FluxTransformer2DModel
) -> None:
    """At each full step after the first, the clusters are ``kmeans_iterations`` rounds of L1 k-means of
    the designated block's image tokens, started from the means of the previous full step's clusters."""
    k, rounds = 6, 2
    inputs = flux_inputs(batch=2, side=8, text=6)
    trace = trace_clusca(
        model,
        inputs,
        steps=10,
        interval=3,
        warmup=1,
        num_clusters=k,
        gamma=0.25,
        kmeans_iterations=rounds,
        cluster_block=cluster_block,
    )
    refresh = replay_clusca_image_mlp(trace, 1, basis=TaylorBasis(), max_order=1, warmup=1, gamma=0.25)
    assert assert_one_token_per_cluster(trace, refresh) == 6
    full = trace.full_steps()
    assert full == [0, 3, 6, 9]
    clusters = {step: refresh.labels[step + 1] for step in full[:-1]}  # read at the forecast step after each
    designated, other = cluster_block % 2, 1 - cluster_block % 2

    def warm_started(block: int, step: int, previous: int, b: int, iterations: int) -> torch.Tensor:
        start = cluster_means(trace.block_images[block][previous][b], clusters[previous][b], k)
        return l1_kmeans(trace.block_images[block][step][b], start, iterations=iterations)[0]

    checks = [(step, previous, b) for previous, step in itertools.pairwise(full[:-1]) for b in range(2)]
    for step, previous, b in checks:
        expected = warm_started(designated, step, previous, b, rounds)
        differ = (clusters[step][b] != expected).nonzero().flatten().tolist()
        assert not differ, (
            f"step {step}, sample {b}: tokens {differ} are not clustered as {rounds} rounds of L1 k-means of block "
            f"{designated}'s image tokens from the means of step {previous}'s clusters"
        )
    # the test can tell: the other block's tokens, one round or rounds to convergence would not give them
    for block, iterations in ((other, rounds), (designated, 1), (designated, 100)):
        assert not all(torch.equal(clusters[s][b], warm_started(block, s, p, b, iterations)) for s, p, b in checks), (
            block,
            iterations,
        )


def test_kmeans_is_per_sample_and_warm_starts() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    sample = (centers.repeat_interleave(5, 0) + 0.1 * torch.randn(15, 2, generator=g))[None]
    perm = torch.randperm(15, generator=g)
    batch = torch.cat([sample, sample[:, perm]])
    init = torch.stack([centers, centers + 0.5])
    labels, centroids = kmeans_l1(batch, 3, iterations=10, init=init)
    assert labels[0].tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert torch.equal(labels[1], labels[0][perm])
    torch.testing.assert_close(centroids[0], centroids[1])
    again, _ = kmeans_l1(batch, 3, iterations=1, init=centroids)  # warm start: already converged
    assert torch.equal(again, labels)
    index = one_token_per_cluster(labels, 3, torch.Generator().manual_seed(1))
    assert index.shape == (2, 3)
    assert torch.equal(torch.gather(labels, 1, index), torch.arange(3).expand(2, 3))


# -- safety: non-finite forecasts fall back --------------------------------------------------------
@attrs.frozen(kw_only=True)
class ExplosiveBasis(Basis):
    """A third-party-like basis whose weights overflow float32 (finite as Python floats)."""

    name = "explosive"

    def _weights(self, offset: float, order: int, spacing: float) -> tuple[float, ...]:
        return (1e300,) + (0.0,) * order


@attrs.frozen(kw_only=True)
class SteepBasis(Basis):
    """Like :class:`ExplosiveBasis` but through the higher orders: reuse plus a slope beyond float32."""

    name = "steep"

    def _weights(self, offset: float, order: int, spacing: float) -> tuple[float, ...]:
        return (1.0,) + (1e300,) * order


@pytest.fixture
def explosive(fresh_registry: Any) -> Iterator[str]:
    @hookimpl
    def hicache_register_bases(register: Callable[[Any], None]) -> None:
        register(ExplosiveBasis)
        register(SteepBasis)

    sdk.register_plugin(types.SimpleNamespace(hicache_register_bases=hicache_register_bases), "explosive-plugin")
    yield "explosive"


@pytest.mark.parametrize("policy", POLICIES)
def test_non_finite_forecasts_fall_back_to_full_compute(
    policy: str, explosive: str, model: FluxTransformer2DModel, inputs: dict[str, Any], reference: torch.Tensor
) -> None:
    with sdk.compose(policy, basis=explosive, interval=3, warmup=1).apply(model) as handle:
        out = run_loop(model, inputs, steps=STEPS)
    summary = handle.summary()
    assert torch.isfinite(out).all()
    if policy != "clusca":  # every unit recomputed: exactly the uncached trajectory
        assert torch.equal(out, reference)
    forecast_steps = STEPS - 4  # full at 0, 3, 6, 9
    assert summary.forecast_steps == forecast_steps
    assert all(u.fallbacks == forecast_steps and u.forecast == 0 for u in summary.units)
    assert summary.fallbacks == forecast_steps * len(summary.units)
    assert "fallbacks" in summary.table()
    if policy == "clusca":  # refreshed tokens and clustering were paid for, then everything recomputed
        assert summary.flops_saved_fraction < 0.0
    else:
        assert summary.flops_saved_fraction == 0.0


def test_higher_order_weights_beyond_float32_fall_back(
    explosive: str, model: FluxTransformer2DModel, inputs: dict[str, Any]
) -> None:
    with sdk.compose("taylorseer", basis="steep", interval=3, warmup=1).apply(model) as handle:
        out = run_loop(model, inputs, steps=STEPS)
    assert torch.isfinite(out).all()
    # full at 0, 3, 6, 9; steps 1 and 2 reuse (order 0); steps 4 and 7 need the slope and fall back,
    # which restarts the ladder at order 0, so steps 5 and 8 reuse again
    assert all((u.forecast, u.fallbacks) == (4, 2) for u in handle.summary().units)


def test_without_check_finite_the_forecast_is_served_as_is(
    explosive: str, model: FluxTransformer2DModel, inputs: dict[str, Any]
) -> None:
    with sdk.compose("taylorseer", basis=explosive, interval=3, warmup=1, check_finite=False).apply(model) as handle:
        out = run_loop(model, inputs, steps=3)
    assert not torch.isfinite(out).all()
    assert handle.summary().fallbacks == 0


def test_one_non_finite_forecast_is_one_fallback(
    monkeypatch: pytest.MonkeyPatch, model: FluxTransformer2DModel, inputs: dict[str, Any]
) -> None:
    original = DifferenceLadder.forecast
    calls = [0]

    def flaky(self: DifferenceLadder, step: int, basis: Basis) -> torch.Tensor:
        calls[0] += 1
        value = original(self, step, basis)
        return torch.full_like(value, math.nan) if calls[0] == 5 else value

    monkeypatch.setattr(DifferenceLadder, "forecast", flaky)
    with sdk.compose("taylorseer", interval=3, warmup=1).apply(model) as handle:
        out = run_loop(model, inputs, steps=STEPS)
    assert torch.isfinite(out).all()
    summary = handle.summary()
    assert summary.fallbacks == 1
    assert sum(u.fallbacks for u in summary.units) == 1


def test_a_poisoned_ladder_restarts_after_one_fallback(model: FluxTransformer2DModel, inputs: dict[str, Any]) -> None:
    """An overflow in low-precision storage: a slope beyond float16 makes one forecast infinite."""
    key = "transformer_blocks.0.ff"
    step = [0]
    jump = {0: 40000.0, 1: -40000.0}  # each anchor fits float16 (max 65504), their difference does not

    def spike(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if step[0] not in jump:
            return output
        output = output.clone()
        output[0, 0, 0] += jump[step[0]]
        return output

    recorder = UnitRecorder()
    hook = model.transformer_blocks[0].ff.register_forward_hook(spike)
    try:
        acc = sdk.compose("taylorseer", interval=3, warmup=2, max_order=2, cache_dtype=torch.float16)
        with acc.apply(model) as handle:
            handle.add_observer(recorder)
            # full at 0, 1, 4, 7: D^1 = F(1) - F(0) overflows to -inf; step 2 falls back and restarts
            # the ladder, so step 3 reuses step 2's output and the ladder grows again from step 4
            out = run_loop(model, inputs, steps=10, on_step=lambda s: step.__setitem__(0, s))
    finally:
        hook.remove()
    units = {u.key: u for u in handle.summary().units}
    assert torch.isfinite(out).all()
    assert (units[key].fallbacks, units[key].forecast, units[key].computed) == (1, 5, 4)
    assert handle.summary().fallbacks == 1
    assert [recorder.how(key, s) for s in range(10)] == ["computed"] * 2 + ["fallback", "forecast", "computed"] + [
        "forecast",
        "forecast",
        "computed",
        "forecast",
        "forecast",
    ]
    (restart,), (reuse,) = recorder.outputs(key, 2), recorder.outputs(key, 3)
    assert torch.equal(reuse, restart.half().float())  # order 0 from the fresh output (stored in float16)
