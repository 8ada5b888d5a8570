"""The flux adapter: paper-faithful pre-gate units, current gates, skipped modules, counted FLOPs and bytes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxTransformerBlock
from helpers import CallCounter, flux_inputs, flux_modules, run_loop, tiny_flux

import hicache_sdk as sdk
from hicache_sdk.errors import AdapterMismatchError
from hicache_sdk.flops import flop_counter_mode

DOUBLE_UNITS = {"attn": ("img", "txt"), "ff": ("",), "ff_context": ("",)}


@pytest.fixture(scope="module")
def model() -> FluxTransformer2DModel:
    return tiny_flux()


@pytest.fixture(scope="module")
def inputs() -> dict[str, Any]:
    return flux_inputs(batch=2, side=4, text=6)


def call(
    model: FluxTransformer2DModel, inputs: dict[str, Any], level: float, hidden: torch.Tensor | None = None
) -> Any:
    args = {**inputs, "hidden_states": inputs["hidden_states"] if hidden is None else hidden}
    with torch.no_grad():
        return model(**args, timestep=torch.full((args["hidden_states"].shape[0],), level), return_dict=False)[0]


def test_units_are_the_paper_faithful_pre_gate_streams(model: FluxTransformer2DModel, inputs: dict[str, Any]) -> None:
    with sdk.compose("taylorseer", interval=3).apply(model) as handle:
        run_loop(model, inputs, steps=2)
    summary = handle.summary()
    assert summary.adapter == "flux"
    assert summary.notes == ()
    expected = {f"transformer_blocks.{i}.{part}": streams for i in range(2) for part, streams in DOUBLE_UNITS.items()}
    expected |= {f"single_transformer_blocks.{i}.proj_out": ("",) for i in range(2)}
    assert {u.key: u.streams for u in summary.units} == expected
    # 4 streams per double-stream block, 1 per single-stream block (FLUX.1-dev: 19 x 4 + 38 = 114)
    assert sum(len(u.streams) for u in summary.units) == 2 * 4 + 2


@pytest.mark.parametrize("policy", ["fora", "taylorseer"])
def test_forecast_steps_run_no_attention_and_no_mlp(
    policy: str, model: FluxTransformer2DModel, inputs: dict[str, Any]
) -> None:
    counter = CallCounter(flux_modules(model))
    per_step: list[dict[str, int]] = []

    def on_step(step: int) -> None:
        per_step.append(dict(counter.calls))
        counter.reset()

    with sdk.compose(policy, interval=4, warmup=2).apply(model), counter.counting():
        run_loop(model, inputs, steps=10, on_step=on_step)
        on_step(10)
    calls = per_step[1:]  # calls made during step s
    full = {0, 1, 5, 9}
    for step, counts in enumerate(calls):
        assert set(counts.values()) == ({1} if step in full else {0}), (step, counts)


def test_forecasts_apply_the_current_gates_to_cached_pre_gate_outputs(
    model: FluxTransformer2DModel, inputs: dict[str, Any]
) -> None:
    """A FORA forecast equals the stock model run with each attention/MLP returning its anchor output."""
    recorded: dict[str, Any] = {}
    names = [n for n in flux_modules(model) if not n.endswith((".proj_mlp", "single_transformer_blocks.0.attn"))]
    names = [n for n in names if not (n.startswith("single_") and n.endswith(".attn"))]
    modules = dict(model.named_modules())

    @contextmanager
    def hooks(hook: Callable[[str], Callable[..., Any]]) -> Iterator[None]:
        handles = [modules[n].register_forward_hook(hook(n)) for n in names]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def record(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            recorded[name] = output

        return hook

    def replay(name: str) -> Callable[..., Any]:
        return lambda module, args, output: recorded[name]

    later = torch.randn_like(inputs["hidden_states"])
    with sdk.compose("fora", interval=5).apply(model) as handle:
        with hooks(record):
            call(model, inputs, 0.9)  # full step: the anchors
        forecast = call(model, inputs, 0.6, hidden=later)  # forecast step, other input and timestep
    assert handle.summary().forecast_steps == 1
    with hooks(replay):
        current_gates = call(model, inputs, 0.6, hidden=later)
        stale_gates = call(model, inputs, 0.9, hidden=later)
    assert torch.equal(forecast, current_gates)
    assert not torch.allclose(forecast, stale_gates)


def test_flops_saved_fraction_matches_an_independent_count(
    model: FluxTransformer2DModel, inputs: dict[str, Any]
) -> None:
    with flop_counter_mode() as counter:
        run_loop(model, inputs, steps=12)
    uncached = counter.get_total_flops()
    cases: list[tuple[str, dict[str, Any]]] = [
        ("fora", {"interval": 4}),
        ("taylorseer", {"interval": 4, "max_order": 2}),
        ("clusca", {"interval": 4, "num_clusters": 3, "gamma": 0.1}),
    ]
    for policy, params in cases:
        with sdk.compose(policy, **params).apply(model) as handle, flop_counter_mode() as counter:
            run_loop(model, inputs, steps=12)
        saved = 1.0 - counter.get_total_flops() / uncached
        summary = handle.summary()
        assert summary.flops_saved_fraction == pytest.approx(saved, rel=1e-9), policy
        assert summary.flops_speedup == pytest.approx(1.0 / (1.0 - saved), rel=1e-9)
        assert 0.3 < saved < 0.8


def test_cache_bytes_count_every_stream_and_order(model: FluxTransformer2DModel, inputs: dict[str, Any]) -> None:
    batch, image, text, width = 2, 16, 6, 16
    per_order = batch * width * (2 * (2 * image + 2 * text) + 2 * (image + text))  # elements of D^i, all units
    for order, dtype, size in [(2, None, 4), (1, "bf16", 2), (0, torch.float16, 2)]:
        with sdk.compose("taylorseer", interval=3, max_order=order, cache_dtype=dtype).apply(model) as handle:
            run_loop(model, inputs, steps=4)
        assert handle.summary().cache_bytes == per_order * (order + 1) * size


def test_clusca_cache_bytes_include_labels_and_centroids(model: FluxTransformer2DModel, inputs: dict[str, Any]) -> None:
    with sdk.compose("taylorseer", interval=3).apply(model) as handle:
        run_loop(model, inputs, steps=4)
    plain = handle.summary().cache_bytes
    with sdk.compose("clusca", interval=3, num_clusters=5).apply(model) as handle:
        run_loop(model, inputs, steps=4)
    labels, centroids = 2 * 16 * 8, 2 * 5 * 16 * 4  # int64 labels, float32 centroids
    assert handle.summary().cache_bytes == plain + labels + centroids


class CustomBlock(FluxTransformerBlock):
    """A user's Flux block with its own forward: the flux adapter must not re-express it."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: Any = None,
        joint_attention_kwargs: Any = None,
    ) -> Any:
        return super().forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)


def test_a_modified_flux_block_falls_back_to_the_generic_adapter(inputs: dict[str, Any]) -> None:
    model = tiny_flux()
    original = model.transformer_blocks[0]
    custom = CustomBlock(dim=16, num_attention_heads=2, attention_head_dim=8)
    custom.load_state_dict(original.state_dict())
    model.transformer_blocks[0] = custom.eval()
    with pytest.raises(AdapterMismatchError, match="stock Flux blocks"):
        sdk.compose("taylorseer", adapter="flux").apply(model)
    reference = run_loop(model, inputs, steps=3)
    with sdk.compose("taylorseer", interval=1).apply(model) as handle:
        out = run_loop(model, inputs, steps=3)
    assert torch.equal(out, reference)
    summary = handle.summary()
    assert summary.adapter == "generic"
    assert any("chosen automatically" in note for note in summary.notes)
    assert "chosen automatically" in summary.table()


def test_ip_adapter_style_attention_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, model: FluxTransformer2DModel, inputs: dict[str, Any]
) -> None:
    attn = model.transformer_blocks[0].attn
    stock = attn.forward
    monkeypatch.setattr(attn, "forward", lambda *a, **k: (*stock(*a, **k), torch.zeros(1)))
    with sdk.compose("taylorseer").apply(model), pytest.raises(AdapterMismatchError, match="IP-Adapter"):
        call(model, inputs, 0.9)
