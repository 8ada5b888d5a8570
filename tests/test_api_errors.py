"""Bad input to the Python API: clear errors at compose() or apply(), never later or silently."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import flux_inputs, run_loop, tiny_flux
from hicache_sdk.plugins.bases import HermiteBasis, TaylorBasis
from hicache_sdk.plugins.policies import TaylorSeer

import hicache_sdk as sdk
from hicache_sdk import hookimpl
from hicache_sdk.errors import ForecastLayoutError, InvalidParameterError


@pytest.mark.parametrize("policy", [None, 3, TaylorSeer, ["taylorseer"]])
def test_policy_must_be_a_name(policy: Any) -> None:
    with pytest.raises(InvalidParameterError, match=r"policy must be a registered policy name .*registered policies"):
        sdk.compose(policy)


@pytest.mark.parametrize("value", ["no", "yes", 0, 1, None])
def test_check_finite_must_be_a_bool(value: Any) -> None:
    with pytest.raises(InvalidParameterError, match=rf"check_finite must be True or False, got {value!r}"):
        sdk.compose("fora", check_finite=value)


def test_a_basis_instance_with_basis_parameters_says_where_they_go() -> None:
    with pytest.raises(InvalidParameterError) as info:
        sdk.compose("taylorseer", basis=HermiteBasis(sigma=0.3), sigma=0.5)
    message = str(info.value)
    assert "['sigma'] are parameters of basis 'hermite', which was given as an instance (hermite(sigma=0.3))" in message
    assert "takes nothing more" not in message
    # a basis parameter the instance's class does not have is still "for nobody"
    with pytest.raises(InvalidParameterError, match=r"no one takes \['sigma'\]"):
        sdk.compose("taylorseer", basis=TaylorBasis(), sigma=0.5)


def test_adapter_must_be_a_name() -> None:
    with pytest.raises(InvalidParameterError, match="adapter must be a registered adapter name"):
        sdk.compose("fora", adapter=object())  # type: ignore[arg-type]


@pytest.mark.parametrize("block", [2, 99, -3])
def test_cluster_block_outside_the_model_is_refused_at_apply(block: int) -> None:
    model = tiny_flux()  # 2 double-stream blocks
    accelerator = sdk.compose("clusca", cluster_block=block)
    with pytest.raises(
        InvalidParameterError,
        match=rf"cluster_block must be in \[-2, 1\] for FluxTransformer2DModel \(2 clustering blocks\), got {block}",
    ):
        accelerator.apply(model)
    assert not hasattr(model, "_diffusers_hook")  # nothing attached
    with sdk.compose("clusca", cluster_block=-2).apply(model):
        run_loop(model, flux_inputs(), steps=4)


# -- a policy's forecast must match the unit's outputs ---------------------------------------------
def _bad_policy(name: str, forecast: Callable[[tuple[torch.Tensor, ...]], Any]) -> type[TaylorSeer]:
    def method(self: Any, ctx: Any, unit: Any, token_paths: Any) -> Any:
        return forecast(TaylorSeer.forecast(self, ctx, unit, token_paths))

    return type(name.title(), (TaylorSeer,), {"name": name, "forecast": method})


BAD_FORECASTS: dict[str, Callable[[tuple[torch.Tensor, ...]], Any]] = {
    "shape": lambda outs: tuple(o[..., :1] for o in outs),
    "dtype": lambda outs: tuple(o.double() for o in outs),
    "count": lambda outs: (*outs, outs[0]),
    "device": lambda outs: tuple(o.to("meta") for o in outs),
    "not_a_tensor": lambda outs: tuple(1.0 for _ in outs),
}


@pytest.mark.parametrize("fault", sorted(BAD_FORECASTS))
def test_a_forecast_of_the_wrong_layout_names_the_policy_and_the_unit(fresh_registry: Any, fault: str) -> None:
    policy = _bad_policy(f"bad_{fault}", BAD_FORECASTS[fault])

    class Plugin:
        @staticmethod
        @hookimpl
        def hicache_register_policies(register: Callable[[type], None]) -> None:
            register(policy)

    sdk.register_plugin(Plugin, name=f"bad-{fault}")
    model = tiny_flux()
    with sdk.compose(f"bad_{fault}", interval=3, warmup=1).apply(model):
        with pytest.raises(
            ForecastLayoutError, match=rf"policy 'bad_{fault}' forecast unit 'transformer_blocks.0.attn'"
        ):
            run_loop(model, flux_inputs(), steps=3)
