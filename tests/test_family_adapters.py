"""Adapters declared as data (:mod:`hicache_sdk.family`): refusals, timestep conventions, bad declarations."""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Any

import pytest
import torch

import hicache_sdk as sdk
from hicache_sdk.family import BlockSpec, Family, Unit, family_adapter
from hicache_sdk.granularity import GRANULARITIES
from hicache_sdk.testing.families import FAMILY_CASES

STEPS = 6


def generate(model: torch.nn.Module, family: str, steps: int = STEPS, batch: int = 1) -> list[torch.Tensor]:
    case = FAMILY_CASES[family]
    with torch.no_grad():
        return [case.output(model(**case.inputs(batch, 1.0 - s / steps, 0))) for s in range(steps)]


def test_a_module_called_twice_in_a_block_is_refused_not_mixed() -> None:
    """CogView4 calls one feed-forward for image and then text tokens: one unit key cannot serve both."""
    family = Family(
        "cogview4_units_only",
        models=("CogView4Transformer2DModel",),
        block_lists=("transformer_blocks",),
        blocks=(
            BlockSpec(
                "CogView4TransformerBlock", units=(Unit("attn1", "attention", ("img", "txt")), Unit("ff", "mlp"))
            ),
        ),
    )
    adapter = family_adapter(family)

    @sdk.hookimpl
    def hicache_register_adapters(register: Any) -> None:
        register(adapter)

    sdk.register_plugin(types.SimpleNamespace(hicache_register_adapters=hicache_register_adapters), "units-only")
    try:
        model = FAMILY_CASES["cogview4"].build()
        with sdk.compose("taylorseer", interval=2, adapter=adapter.name).apply(model):
            with pytest.raises(
                sdk.AdapterMismatchError, match=r"'transformer_blocks.0.ff' was served twice in one step"
            ):
                generate(model, "cogview4")
        generate(model, "cogview4")  # the failed generation left nothing behind
    finally:
        sdk.get_registry().unregister_plugin("units-only")


def test_an_adapter_named_for_another_family_is_refused_by_name() -> None:
    model = FAMILY_CASES["wan"].build()
    with pytest.raises(
        sdk.AdapterMismatchError,
        match=r"the qwenimage adapter serves QwenImageTransformer2DModel, not WanTransformer3DModel",
    ):
        sdk.compose("fora", adapter="qwenimage").apply(model)
    assert not hasattr(model, "_diffusers_hook")


class ExtraOutputProcessor:
    """An attention processor returning one more output than the stock one (as IP-Adapter's do)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None, **kwargs: Any) -> Any:
        image, text = self.inner(attn, hidden_states, encoder_hidden_states, **kwargs)
        return image, text, image


def test_an_attention_with_extra_outputs_is_a_clear_error() -> None:
    model = FAMILY_CASES["sd3"].build()
    attn = model.transformer_blocks[0].attn
    attn.set_processor(ExtraOutputProcessor(attn.processor))
    with sdk.compose("taylorseer", interval=2).apply(model):
        with pytest.raises(sdk.AdapterMismatchError, match=r"returned 3 outputs.*IP-Adapter"):
            generate(model, "sd3")


def test_a_model_that_counts_time_backwards_keeps_one_generation() -> None:
    """Z-Image takes 1 - sigma: its timestep rises along a generation, its noise level falls."""
    model = FAMILY_CASES["zimage"].build()
    reference = generate(model, "zimage")
    with sdk.compose("taylorseer", interval=2, warmup=1).apply(model) as handle:
        outputs = generate(model, "zimage")
        assert handle.adapter.noise_level(0.25) == 0.75
    summary = handle.summary()
    assert summary.adapter == "zimage"
    assert (summary.steps, summary.full_steps) == (STEPS, 3)  # one generation, not one per step
    assert torch.equal(outputs[0], reference[0]) and not torch.equal(outputs[1], reference[1])


def test_family_adapter_classes_belong_to_the_declaring_module() -> None:
    registered = sdk.get_registry().entries("adapter")["wan"].obj
    assert registered.__module__ == "hicache_sdk.adapters.families"
    assert registered.family.name == "wan" and registered.priority > 0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Unit("attn", "attn"), "kind must be one of"),
        (lambda: Unit("", "attention"), "module must not be empty"),
        (lambda: Unit("ff", "mlp", tokens="pixels"), "tokens"),
        (lambda: BlockSpec("Block"), "needs units or a forward"),
        (
            lambda: Family(
                "x", ("M",), ("a", "b"), (BlockSpec("B", units=(Unit("ff", "mlp"),)),), observed_lists=("b",)
            ),
            "must lead block_lists",
        ),
    ],
)
def test_bad_declarations_are_refused(make: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_the_supported_models_page_lists_every_adapter_with_its_model_class() -> None:
    page = (Path(__file__).parents[1] / "docs" / "reference" / "adapters" / "families.md").read_text()
    rows: dict[str, str] = {}
    for line in page.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip(), line)  # the matrix comes first
    for name, registration in sdk.get_registry().entries("adapter").items():
        assert name in rows, f"adapter {name!r} is missing from the supported-models matrix"
        family = getattr(registration.obj, "family", None)
        if family is not None:
            assert f"`{family.models[0]}`" in rows[name]


def test_the_supported_models_page_lists_the_granularities_each_family_refuses() -> None:
    page = (Path(__file__).parents[1] / "docs" / "reference" / "adapters" / "families.md").read_text()
    kinds = "|".join(GRANULARITIES)
    listed = set(re.findall(rf"^\| (\w+) \| `({kinds})` \|", page, flags=re.MULTILINE))
    refused = {
        (name, kind)
        for name, registration in sdk.get_registry().entries("adapter").items()
        for kind in GRANULARITIES
        if kind not in getattr(registration.obj, "granularities", GRANULARITIES)
    }
    assert listed == refused and refused  # the families that refuse some units=, and only those


@pytest.mark.parametrize("family", sorted(FAMILY_CASES))
def test_the_generic_adapter_serves_every_family_as_a_fallback(family: str) -> None:
    """What a model of a family falls back to when its blocks were modified: exact at interval 1, then caching."""
    model = FAMILY_CASES[family].build()
    reference = generate(model, family)
    with sdk.compose("fora", interval=1, adapter="generic").apply(model):
        assert all(torch.equal(a, b) for a, b in zip(generate(model, family), reference, strict=True))
    with sdk.compose("taylorseer", interval=2, warmup=1, adapter="generic").apply(model) as handle:
        outputs = generate(model, family)
    assert handle.summary().forecast_steps == 3 and all(torch.isfinite(o).all() for o in outputs)  # steps 1, 3, 5


def test_controlnet_residuals_between_blocks_are_served_as_usual() -> None:
    """SD3 adds ControlNet residuals after its blocks: units inside the blocks still fit (exact at interval 1)."""
    case = FAMILY_CASES["sd3"]
    model = case.build()
    control = [torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(1))]

    def run() -> list[torch.Tensor]:
        with torch.no_grad():
            return [
                case.output(model(**case.inputs(1, 1.0 - s / STEPS, 0), block_controlnet_hidden_states=control))
                for s in range(STEPS)
            ]

    reference = run()
    assert not torch.equal(reference[0], generate(model, "sd3")[0])  # the residuals change the output
    with sdk.compose("fora", interval=1).apply(model) as handle:
        assert all(torch.equal(a, b) for a, b in zip(run(), reference, strict=True))
    assert handle.summary().adapter == "sd3"
    with sdk.compose("taylorseer", interval=2, warmup=1).apply(model) as handle:
        outputs = run()
    assert handle.summary().forecast_steps == 3 and all(torch.isfinite(o).all() for o in outputs)


def test_a_block_with_another_diffusers_hook_is_not_stock() -> None:
    """Layer skipping (skip-layer guidance) is a diffusers hook that changes a block: the family adapter, whose
    re-expressed single-stream forward never calls the block's own, must leave it to the generic adapter."""
    from diffusers.hooks import LayerSkipConfig, apply_layer_skip

    from hicache_sdk.family import is_stock

    case = FAMILY_CASES["hunyuanvideo"]
    model = case.build()
    apply_layer_skip(model, LayerSkipConfig(indices=[0], fqn="single_transformer_blocks"))
    assert not is_stock(model.single_transformer_blocks[0])
    inputs = case.inputs(1, 1.0, 0)
    with torch.no_grad():
        skipped = case.output(model(**inputs))
        with sdk.compose("fora", interval=1).apply(model) as handle:
            served = case.output(model(**inputs))
    assert handle.adapter.name == "generic" and torch.equal(served, skipped)
