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
from helpers import CallCounter, flux_inputs, flux_modules, run_loop, tiny_flux
from hicache_sdk.plugins.clusca import ClusCaConfig
from hicache_sdk.plugins.policies import ForaConfig, TaylorSeerConfig

import hicache_sdk as sdk
from hicache_sdk import hookimpl
from hicache_sdk.basis import Basis
from hicache_sdk.clustering import kmeans_l1, one_token_per_cluster
from hicache_sdk.errors import InvalidParameterError
from hicache_sdk.ladder import DifferenceLadder
from hicache_sdk.runtime import UnitOutputs

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


class Recorder:
    """Runtime observer keeping every served unit output: ``events[(key, step)] = (how, outputs)``."""

    def __init__(self) -> None:
        self.events: dict[tuple[str, int], tuple[str, UnitOutputs]] = {}

    def __call__(self, context: str, step: int, key: str, how: str, outputs: UnitOutputs) -> None:
        self.events[key, step] = (how, tuple(t.clone() for t in outputs))

    def steps(self, key: str, how: str) -> list[int]:
        return sorted(s for (k, s), (h, _) in self.events.items() if k == key and h == how)


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
    with sdk.compose("clusca", cluster_block=2, num_clusters=2).apply(model):
        with pytest.raises(InvalidParameterError, match=r"cluster_block must be in \[-2, 1\].*got 2"):
            run_loop(model, inputs, steps=2)


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
    recorder = Recorder()
    with sdk.compose("fora", basis=basis, interval=3, warmup=1).apply(model) as handle:
        handle.runtime.observers.append(recorder)
        run_loop(model, inputs, steps=STEPS)
        ladders = [ladder for unit in handle.runtime.contexts["default"].units.values() for ladder in unit.ladders]
    assert handle.runtime.policy.max_order == 0
    assert ladders and all(ladder.order == 0 for ladder in ladders)
    key = "transformer_blocks.1.ff"
    assert recorder.steps(key, "computed") == [0, 3, 6, 9]
    for step in recorder.steps(key, "forecast"):
        anchor = max(s for s in recorder.steps(key, "computed") if s < step)
        assert torch.equal(recorder.events[key, step][1][0], recorder.events[key, anchor][1][0])


def reference_ladder(anchors: list[tuple[int, torch.Tensor]], max_order: int, warmup: int) -> tuple[list[Any], int]:
    """D^0..D^m and the newest anchor step, rebuilt from scratch (METHODS section 1, warm-up rule)."""
    terms: list[torch.Tensor] = []
    last = -1
    for step, value in anchors:
        if terms and step >= warmup - 1:
            spacing = step - last
            new = [value.double()]
            for i in range(min(len(terms), max_order)):
                new.append((new[i] - terms[i]) / spacing)
            terms = new
        else:
            terms = [value.double()]
        last = step
    return terms, last


@pytest.mark.parametrize("basis", BASES)
def test_taylorseer_forecast_is_the_basis_sum_over_the_ladder(
    basis: str, model: FluxTransformer2DModel, inputs: dict[str, Any]
) -> None:
    recorder = Recorder()
    basis_obj = sdk.get_basis(basis)()
    with sdk.compose("taylorseer", basis=basis_obj, interval=3, warmup=2, max_order=2).apply(model) as handle:
        handle.runtime.observers.append(recorder)
        run_loop(model, inputs, steps=14)
    for key in ("transformer_blocks.0.attn", "single_transformer_blocks.1.proj_out"):
        computed = recorder.steps(key, "computed")
        assert computed == [0, 1, 4, 7, 10, 13]
        for step in recorder.steps(key, "forecast"):
            anchors = [(s, recorder.events[key, s][1]) for s in computed if s < step]
            for stream in range(len(anchors[0][1])):
                terms, last = reference_ladder([(s, out[stream]) for s, out in anchors], 2, 2)
                spacing = anchors[-1][0] - anchors[-2][0]
                weights = basis_obj.weights(step - last, len(terms) - 1, spacing)
                expected = sum(w * t for w, t in zip(weights, terms, strict=True))
                got = recorder.events[key, step][1][stream]
                torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


# -- ClusCa token path -----------------------------------------------------------------------------
def clusca_run(
    model: FluxTransformer2DModel, inputs: dict[str, Any], *, steps: int, **params: Any
) -> tuple[torch.Tensor, Any, CallCounter, list[dict[str, Any]]]:
    """Run ClusCa (N=3, W=1); per step, the ladder D^0 of block 1's image MLP and the clustering labels."""
    counter = CallCounter(flux_modules(model))
    snapshots: list[dict[str, Any]] = []
    outputs: dict[int, torch.Tensor] = {}
    ff = model.transformer_blocks[1].ff
    steps_seen = [0]

    def keep_output(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        outputs[steps_seen[0]] = output.detach().clone()

    def snapshot(context: str, step: int, key: str, how: str, unit_outputs: UnitOutputs) -> None:
        if key == "transformer_blocks.1.ff":
            ctx = handle.runtime.contexts[context]
            labels = ctx.policy_state.labels
            snapshots.append(
                {
                    "step": step,
                    "how": how,
                    "d0": ctx.units[key].ladders[0].term(0).clone(),
                    "labels": None if labels is None else labels.clone(),
                    "fresh": outputs.get(step),
                }
            )

    acc = sdk.compose("clusca", interval=3, warmup=1, **params)
    hook = ff.register_forward_hook(keep_output)
    try:
        with acc.apply(model) as handle, counter.counting():
            handle.runtime.observers.append(snapshot)
            out = run_loop(model, inputs, steps=steps, on_step=lambda s: steps_seen.__setitem__(0, s))
    finally:
        hook.remove()
    return out, handle, counter, snapshots


def test_clusca_runs_the_image_mlp_on_exactly_k_tokens_per_sample(
    model: FluxTransformer2DModel, inputs: dict[str, Any]
) -> None:
    out, handle, counter, _ = clusca_run(model, inputs, steps=7, num_clusters=5)
    full, forecast = 3, 4  # steps 0, 3, 6 full
    tokens, text = 16, 6
    for i in range(2):
        assert counter.rows[f"transformer_blocks.{i}.ff"] == [tokens, 5, 5, tokens, 5, 5, tokens]
        assert counter.batches[f"transformer_blocks.{i}.ff"] == [2] * 7
        assert counter.rows[f"transformer_blocks.{i}.ff_context"] == [text, 5, 5, text, 5, 5, text]
        assert counter.calls[f"transformer_blocks.{i}.attn"] == full
        assert counter.calls[f"single_transformer_blocks.{i}.attn"] == full
        assert counter.calls[f"single_transformer_blocks.{i}.proj_mlp"] == full
    summary = handle.summary()
    units = {u.key: u for u in summary.units}
    assert units["transformer_blocks.0.ff"].partial == forecast
    assert units["transformer_blocks.0.ff_context"].partial == forecast
    assert units["transformer_blocks.0.attn"].partial == 0
    assert units["single_transformer_blocks.0.proj_out"].partial == 0
    assert torch.isfinite(out).all()


def test_clusca_with_more_clusters_than_tokens_refreshes_every_token(
    model: FluxTransformer2DModel, inputs: dict[str, Any]
) -> None:
    _, _, counter, _ = clusca_run(model, inputs, steps=4, num_clusters=64)
    assert sorted(counter.rows["transformer_blocks.0.ff"]) == [16, 16, 16, 16]


def test_clusca_gamma_zero_writes_fresh_tokens_only(model: FluxTransformer2DModel, inputs: dict[str, Any]) -> None:
    k = 4
    _, _, _, snaps = clusca_run(model, inputs, steps=6, num_clusters=k, gamma=0.0)
    checked = 0
    for before, after in itertools.pairwise(snaps):
        if after["how"] != "forecast":
            continue
        labels, fresh = after["labels"], after["fresh"]
        assert fresh.shape == (2, k, before["d0"].shape[-1])
        for b in range(2):
            changed = (after["d0"][b] != before["d0"][b]).any(dim=-1).nonzero().flatten()
            assert changed.numel() == k
            assert sorted(labels[b, changed].tolist()) == list(range(k))  # one token per cluster
            for row in fresh[b]:
                assert any(torch.equal(after["d0"][b, p], row) for p in changed.tolist())
        checked += 1
    assert checked == 4  # steps 1, 2, 4 and 5


def test_clusca_gamma_pulls_every_token_toward_its_cluster(
    model: FluxTransformer2DModel, inputs: dict[str, Any]
) -> None:
    k, gamma = 4, 0.25
    _, _, _, snaps = clusca_run(model, inputs, steps=3, num_clusters=k, gamma=gamma)
    before, after = snaps[0], snaps[1]
    assert after["how"] == "forecast"
    labels, fresh = after["labels"], after["fresh"]
    for b in range(2):
        chosen = {}
        for j, row in enumerate(fresh[b]):
            positions = [p for p in range(16) if torch.equal(after["d0"][b, p], row)]
            assert len(positions) == 1
            chosen[int(labels[b, positions[0]])] = j
        assert sorted(chosen) == list(range(k))
        per_token = fresh[b][[chosen[int(c)] for c in labels[b]]]
        expected = torch.lerp(before["d0"][b], per_token, gamma)
        mask = torch.ones(16, dtype=torch.bool)
        mask[[p for p in range(16) if any(torch.equal(after["d0"][b, p], r) for r in fresh[b])]] = False
        torch.testing.assert_close(after["d0"][b][mask], expected[mask], rtol=1e-6, atol=1e-6)


def test_clusca_clusters_each_sample_separately(model: FluxTransformer2DModel) -> None:
    pair = flux_inputs(batch=2, side=4, seed=3)
    alone = {
        k: v[:1] if k in ("hidden_states", "encoder_hidden_states", "pooled_projections") else v
        for k, v in pair.items()
    }
    _, _, _, snaps_pair = clusca_run(model, pair, steps=5, num_clusters=4)
    _, _, _, snaps_alone = clusca_run(model, alone, steps=5, num_clusters=4)
    # labels of the full steps 0 and 3, as seen by the forecasts that follow them
    labels_pair = [s["labels"] for s in snaps_pair if s["how"] == "forecast"]
    labels_alone = [s["labels"] for s in snaps_alone if s["how"] == "forecast"]
    assert len(labels_pair) == 3
    assert labels_pair[0].shape == (2, 16)
    assert all(torch.equal(p[:1], a) for p, a in zip(labels_pair, labels_alone, strict=True))
    assert not torch.equal(labels_pair[0][0], labels_pair[0][1])


@pytest.mark.parametrize("cluster_block", [0, -1])
def test_clusca_clusters_the_designated_block_once_per_full_step_warm_started(
    cluster_block: int, monkeypatch: pytest.MonkeyPatch, model: FluxTransformer2DModel, inputs: dict[str, Any]
) -> None:
    calls: list[dict[str, Any]] = []
    block_outputs: list[torch.Tensor] = []

    def recording(tokens: torch.Tensor, num_clusters: int, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        labels, centroids = kmeans_l1(tokens, num_clusters, **kwargs)
        calls.append({"tokens": tokens.clone(), "k": num_clusters, **kwargs, "centroids": centroids})
        return labels, centroids

    monkeypatch.setattr("hicache_sdk.plugins.clusca.kmeans_l1", recording)
    block = model.transformer_blocks[cluster_block]
    hook = block.register_forward_hook(lambda module, args, output: block_outputs.append(output[1].clone()))
    try:
        with sdk.compose(
            "clusca", interval=3, warmup=1, num_clusters=4, kmeans_iterations=7, cluster_block=cluster_block
        ).apply(model):
            run_loop(model, inputs, steps=7)  # full at 0, 3, 6
    finally:
        hook.remove()
    assert len(calls) == 3
    assert [c["k"] for c in calls] == [4, 4, 4] and all(c["iterations"] == 7 for c in calls)
    for call, step in zip(calls, (0, 3, 6), strict=True):
        assert torch.equal(call["tokens"], block_outputs[step])  # the block's image hidden states
    assert calls[0]["init"] is None
    assert torch.equal(calls[1]["init"], calls[0]["centroids"])
    assert torch.equal(calls[2]["init"], calls[1]["centroids"])


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
    key = "transformer_blocks.0.ff"

    def poison(context: str, step: int, unit: str, how: str, outputs: UnitOutputs) -> None:
        if unit == key and step == 6:
            ladder = handle.runtime.contexts[context].units[key].ladders[0]
            assert (how, ladder.order) == ("computed", 2)
            ladder.term(1).fill_(math.inf)  # e.g. an overflow in low-precision storage

    with sdk.compose("taylorseer", interval=3, warmup=1, max_order=2).apply(model) as handle:
        handle.runtime.observers.append(poison)
        # full at 0, 3, 6, 9; step 7 falls back and restarts the ladder, so step 8 forecasts again
        out = run_loop(model, inputs, steps=10)
    units = {u.key: u for u in handle.summary().units}
    assert torch.isfinite(out).all()
    assert (units[key].fallbacks, units[key].forecast) == (1, 5)
