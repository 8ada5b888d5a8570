"""The tiny model of every diffusers DiT family runs: finite, batched, deterministic, sigma-dependent, bf16."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from hicache_sdk.testing.families import FAMILY_CASES, cast_inputs
from hicache_sdk.testing.model_case import ModelCase

# Chroma's own module imports FluxPosEmbed from its deprecated location: diffusers' warning, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:`FluxPosEmbed` is deprecated:FutureWarning")

FAMILIES = sorted(FAMILY_CASES)


def _run(case: ModelCase, model: torch.nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
    """The main output of one forward without autograd."""
    with torch.no_grad():
        return case.output(model(**kwargs))


def test_every_family_is_listed_under_its_own_name() -> None:
    assert set(FAMILY_CASES) == {
        "flux",
        "chroma",
        "flux2",
        "qwenimage",
        "wan",
        "hunyuanvideo",
        "hunyuanvideo15",
        "sd3",
        "pixart",
        "dit",
        "cogvideox",
        "ltx",
        "sana",
        "zimage",
        "hidream",
        "cogview4",
    }
    assert all(case.family == name for name, case in FAMILY_CASES.items())


@pytest.mark.parametrize("name", FAMILIES)
def test_fp32_forward_is_finite_deterministic_and_depends_on_sigma(name: str) -> None:
    case = FAMILY_CASES[name]
    model = case.build()
    assert all(p.dtype == torch.float32 for p in model.parameters()) and not model.training

    out = _run(case, model, case.inputs(2, 0.6, 0))
    assert out.shape[0] == 2 and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.equal(out, _run(case, model, case.inputs(2, 0.6, 0))), "two identical calls differ"
    assert torch.equal(out, _run(case, case.build(), case.inputs(2, 0.6, 0))), "two builds differ"
    assert not torch.equal(out, _run(case, model, case.inputs(2, 0.3, 0))), "the output ignores sigma"

    alone = _run(case, model, case.inputs(1, 0.6, 0))
    assert alone.shape[0] == 1
    torch.testing.assert_close(alone[0], out[0], rtol=1e-4, atol=1e-4 * float(out.abs().max()))


@pytest.mark.parametrize("name", FAMILIES)
def test_bf16_forward_is_finite(name: str) -> None:
    case = FAMILY_CASES[name]
    model = case.build().to(torch.bfloat16)
    for batch in (1, 2):
        out = _run(case, model, cast_inputs(case.inputs(batch, 0.6, 0), torch.bfloat16))
        assert out.shape[0] == batch and out.dtype == torch.bfloat16
        assert torch.isfinite(out).all()


def test_cast_inputs_casts_floating_tensors_only_also_inside_containers() -> None:
    kwargs = {
        "x": [torch.zeros(2), torch.zeros(2, dtype=torch.float64)],
        "pair": (torch.ones(1), 3),
        "ids": torch.arange(3),
        "mask": torch.ones(2, dtype=torch.bool),
        "extra": {"size": torch.ones(2), "none": None},
        "shapes": [[(1, 4, 4)]],
    }
    cast = cast_inputs(kwargs, torch.bfloat16)
    assert [t.dtype for t in cast["x"]] == [torch.bfloat16, torch.bfloat16]
    assert cast["pair"][0].dtype == torch.bfloat16 and cast["pair"][1] == 3
    assert cast["ids"] is kwargs["ids"] and cast["mask"] is kwargs["mask"]
    assert cast["extra"]["size"].dtype == torch.bfloat16 and cast["extra"]["none"] is None
    assert cast["shapes"] == [[(1, 4, 4)]]
    assert kwargs["x"][0].dtype == torch.float32, "the input dict was changed"
