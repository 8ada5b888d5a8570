"""``hicache frontier`` on a reduced setting (one digit, one seed, six steps, one repeat), its sweep plan and
its option checking."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from helpers import cli_status, refuse_json_token

from hicache_sdk.bench import frontier
from hicache_sdk.bench.frontier import (
    BASELINE_SWEEP,
    FRONTIER_FILES,
    SWEEP,
    Knob,
    parse_knob_values,
    plan_sweep,
)
from hicache_sdk.cli import FRONTIER_BASELINES, build_parser, main
from hicache_sdk.errors import InvalidParameterError

SMALL = ["--quick", "--steps", "6", "--digits", "3", "--seeds-per-digit", "1", "--repeats", "1", "--no-progress"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    out = tmp_path_factory.mktemp("frontier")
    argv = ["frontier", *SMALL, "--policies", "taylorseer", "--bases", "taylor"]
    argv += ["--baselines", "diffusers-first-block", "--knob-values", "diffusers-first-block=0.2", "--out", str(out)]
    assert main(argv) == 0
    payload = json.loads((out / "frontier.json").read_text(), parse_constant=refuse_json_token)  # strict JSON
    return out, payload, (out / "frontier.md").read_text()


def test_quick_run_writes_the_json_table_and_plot(quick_run: tuple[Path, dict[str, Any], str]) -> None:
    out, payload, markdown = quick_run
    assert sorted(p.name for p in out.iterdir()) == sorted(FRONTIER_FILES)  # no staging folder left behind
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert payload["settings"]["steps"] == 6 and payload["settings"]["repeats"] == 1
    assert payload["command"].startswith("hicache frontier --steps 6 --digits 3 --seeds-per-digit 1 --repeats 1")
    assert payload["command"] in markdown
    assert payload["wall_check"]["trusted"] is not True and payload["wall_check"]["note"] in markdown  # one repeat


def test_quick_run_points_are_consistent(quick_run: tuple[Path, dict[str, Any], str]) -> None:
    _, payload, markdown = quick_run
    shared = dict(SWEEP["taylorseer"].shared)
    assert payload["sweep"] == {
        "taylorseer": {"family": "hicache", "knob": "interval", "values": [2, 3], "shared": shared},
        "diffusers-first-block": {"family": "diffusers", "knob": "threshold", "values": [0.2], "shared": {}},
    }
    points = payload["points"]
    full = points[0]
    assert full["series"] == "full" and full["value"] is None
    assert full["scores"]["rel_l2"] == 0.0 and full["flops_speedup"] == 1.0 and full["scores"]["psnr"] is None
    measured = [(p["series"], p["value"]) for p in points[1:]]
    assert measured == [("taylorseer", 2), ("taylorseer", 3), ("diffusers-first-block", 0.2)]
    for p in points:
        assert p["skipped"] is None and len(p["wall_seconds"]) == 1 and p["wall_speedup"] > 0
        assert p["scores"]["rel_l2"] >= 0 and math.isfinite(p["flops_speedup"])
        if p["family"] == "hicache":
            assert p["flops_speedup"] >= 1.0 and p["scores"]["rel_l2"] > 0
            assert p["flops_speedup"] == pytest.approx(p["sdk_flops_speedup"], rel=2e-3)  # counted = SDK's own
            assert p["setting"].startswith("taylorseer[taylor](interval=" + str(p["value"]))
        knob = "-" if p["value"] is None else f"{p['knob']}={p['value']:g}"
        assert f"| {p['series']} | {p['family']} | {knob} | {p['flops_speedup']:.2f}x |" in markdown, p["label"]


def test_default_sweep_skips_unregistered_policies_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(frontier.SWEEP, "not_a_policy", Knob("threshold", (0.1,), (0.1,)))
    series, notes = plan_sweep(policies=None, bases=None, knob_values={}, baselines=(), quick=False, steps=50)
    assert notes[-1] == "note: policy 'not_a_policy' is not registered here; skipped"
    names = [s.name for s in series]
    assert "fora" in names and "fora+hermite" not in names  # FORA only reuses: one basis
    assert {"taylorseer", "taylorseer+hermite", "taylorseer+newton"} <= set(names)
    assert all(s.values == SWEEP[s.policy].values for s in series if s.policy)
    quick, _ = plan_sweep(policies=None, bases=None, knob_values={}, baselines=(), quick=True, steps=50)
    assert [s.name for s in quick] == [s.policy for s in quick]  # one line per policy, the taylor basis
    assert all(s.values == SWEEP[s.policy].quick for s in quick if s.policy)


def test_a_policy_at_order_zero_runs_one_basis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(frontier.SWEEP, "taylorseer", Knob("interval", (2, 4), (2,), shared={"max_order": 0}))
    series, _ = plan_sweep(
        policies=["taylorseer"], bases=["taylor", "hermite"], knob_values={}, baselines=(), quick=False, steps=50
    )
    assert [(s.name, s.values) for s in series] == [("taylorseer", (2, 4))]


def test_default_step_counts_beyond_the_steps_are_left_out_with_a_note() -> None:
    series, notes = plan_sweep(
        policies=["taylorseer"],
        bases=["taylor"],
        knob_values={},
        baselines=["diffusers-taylorseer"],
        quick=False,
        steps=4,
    )
    assert [(s.name, s.values) for s in series] == [("taylorseer", (2, 3)), ("diffusers-taylorseer", (2, 3))]
    assert notes == [
        "note: taylorseer: interval [5, 8] exceed the 4 steps; left out",
        "note: diffusers-taylorseer: interval [5, 8] exceed the 4 steps; left out",
    ]


def test_knob_values_replace_the_defaults_sorted() -> None:
    values = parse_knob_values(["taylorseer=5, 2", "cache-dit=0.3,0.1"])
    assert values == {"taylorseer": (2, 5), "cache-dit": (0.1, 0.3)}
    series, _ = plan_sweep(
        policies=["taylorseer"], bases=["taylor"], knob_values=values, baselines=["cache-dit"], quick=False, steps=50
    )
    assert [(s.name, s.values) for s in series] == [("taylorseer", (2, 5)), ("cache-dit", (0.1, 0.3))]
    assert series[0].label(5) == "taylorseer interval=5" and series[1].label(0.1) == "cache-dit threshold=0.1"


def test_the_cli_offers_every_baseline_of_the_sweep() -> None:
    assert FRONTIER_BASELINES == tuple(BASELINE_SWEEP)
    help_text = build_parser()._subparsers._group_actions[0].choices["frontier"].format_help()  # type: ignore[union-attr]
    assert "85 points x 4 generations: 45 minutes on a 2-core x86_64 CPU" in " ".join(help_text.split())


def test_plan_sweep_refuses_unknown_names() -> None:
    with pytest.raises(
        InvalidParameterError, match=r"--policies: unknown policy 'taylorsear'.*Did you mean 'taylorseer'"
    ):
        plan_sweep(policies=["taylorsear"], bases=None, knob_values={}, baselines=(), quick=True, steps=50)
    with pytest.raises(InvalidParameterError, match="nothing to sweep"):
        plan_sweep(policies=[], bases=None, knob_values={}, baselines=(), quick=True, steps=50)


# --------------------------------------------------------------------------- bad options: exit 2, no output

BAD_OPTIONS = [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--seeds-per-digit", "0"], "--seeds-per-digit must be >= 1, got 0"),
    (["--digits", "10"], "--digits must be in 0..9, got [10]"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--baselines", "diffusers-magcache", "--seed", str(2**63 - 1000)], "--seed must be <= "),
    (["--policies", "taylorsear"], "--policies: unknown policy 'taylorsear'"),
    (["--bases", "hermit"], "--bases: unknown basis 'hermit'"),
    (["--knob-values", "taylorseer"], "--knob-values 'taylorseer': expected NAME=v1,v2,..."),
    (["--knob-values", "taylorseer=0"], "--knob-values taylorseer: values must be finite numbers > 0, got 0"),
    (["--knob-values", "taylorseer=fast"], "--knob-values taylorseer: values must be finite numbers > 0, got 'fast'"),
    (["--knob-values", "taylorseer=2,2"], "--knob-values taylorseer: a value is listed twice"),
    (["--knob-values", "taylorseer=2", "taylorseer=3"], "--knob-values names 'taylorseer' twice"),
    (["--knob-values", "taylorseer=2.5"], "--knob-values taylorseer: interval must be an integer in 1..6"),
    (["--knob-values", "taylorseer=7"], "--knob-values taylorseer: interval must be an integer in 1..6"),
    (["--knob-values", "diffusers-taylorseer=9"], "--knob-values diffusers-taylorseer: interval must be an integer"),
    (["--knob-values", "fora=2", "--policies", "taylorseer"], "--knob-values names 'fora', which this sweep does not"),
    (
        ["--no-baselines", "--knob-values", "cache-dit=0.1"],
        "--knob-values names 'cache-dit', which this sweep does not",
    ),
    (["--baselines", "magcache"], "argument --baselines: invalid choice: 'magcache'"),
    (["--baselines", "cache-dit", "--no-baselines"], "argument --no-baselines: not allowed with argument --baselines"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_options_exit_2_naming_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    out = tmp_path / "out"
    # small settings and one policy first, so that an option that slipped through fails in seconds
    small = [*SMALL, "--policies", "taylorseer", "--bases", "taylor"]
    if "--baselines" not in argv and "--no-baselines" not in argv:
        small += ["--baselines", "diffusers-taylorseer"]
    assert cli_status(["frontier", *small, *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"hicache: error: {message}" in err, err
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())
