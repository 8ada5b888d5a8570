"""The ``hicache`` command line on small settings (the embedded model, a few steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hicache_sdk.bench.methods import DEFAULT_METHODS, parse_method
from hicache_sdk.bench.report import REPORT_FILES
from hicache_sdk.cli import main
from hicache_sdk.errors import InvalidParameterError

SMALL = ["--steps", "6", "--digits", "1", "7", "--seeds-per-digit", "1", "--repeats", "1", "--no-progress"]


def test_bench_writes_a_complete_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    methods = ["full", "taylorseer+hermite:interval=3", "clusca:interval=3,num_clusters=4"]
    assert main(["bench", *SMALL, "--methods", *methods, "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(REPORT_FILES)
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["label"]: r for r in report["results"]}
    assert list(rows) == methods
    assert rows["full"]["rel_l2"] == 0.0 and rows["full"]["flops_speedup"] == 1.0
    for label in methods[1:]:
        row = rows[label]
        assert row["full_steps"] + row["forecast_steps"] == 6
        assert row["flops_speedup"] > 1.0  # counted, so it depends on the schedule
        assert 0.0 < row["rel_l2"] < 1.0
        assert len(row["wall_seconds"]) == 1
    assert report["deterministic"] is True
    assert "| taylorseer+hermite:interval=3 |" in (tmp_path / "bench.md").read_text()
    assert "taylorseer+hermite" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "ful"], "Did you mean 'full'"),
        (["--methods", "taylorseer+hermit"], "Did you mean 'hermite'"),
        (["--steps", "0"], "steps must be >= 1"),
        (["--digits", "12"], "digits must be in 0..9"),
        (["--interval", "9"], "larger than the 6 steps"),
        (["--methods", "taylorseer:interval=0"], "interval must be >= 1"),
    ],
)
def test_bench_rejects_bad_input_without_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    out = tmp_path / "report"
    assert main(["bench", *SMALL, *args, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_bench_reports_an_unwritable_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["bench", *SMALL, "--methods", "full", "--out", str(blocker / "out")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_run_saves_pngs_and_prints_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["run", "--policy", "clusca", "--basis", "hermite", "--digit", "3", "--samples", "2", "--steps", "6"]
    assert main([*args, "--interval", "3", "--param", "num_clusters=4", "--out", str(tmp_path), "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["digit3_seed0.png", "digit3_seed1.png"]
    out = capsys.readouterr().out
    assert "clusca[hermite(sigma=0.5)]" in out and "forecast" in out


def test_run_rejects_unknown_parameter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--param", "intervall=3", "--out", str(tmp_path)]) == 2
    assert "Did you mean 'interval'" in capsys.readouterr().err


def test_plugins_lists_every_registration_with_its_distribution(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for name in ("taylor", "hermite", "newton", "fora", "taylorseer", "clusca", "flux", "generic"):
        assert f" {name} " in out
    assert "hicache-sdk" in out


def test_trajectory_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trajectory", "--steps", "8", "--interval", "3", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "trajectory.png").stat().st_size > 0
    assert "hermite: relative L2" in capsys.readouterr().out


def test_trajectory_rejects_unknown_unit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trajectory", "--steps", "4", "--unit", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown unit 'nope'" in capsys.readouterr().err


def test_module_entry_point_shows_help() -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-m", "hicache_sdk", "bench", "--help"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0 and "--methods" in done.stdout


def test_default_methods_parse() -> None:
    specs = [parse_method(m) for m in DEFAULT_METHODS]
    assert specs[0].is_full and [s.policy for s in specs[1:]] == [
        "fora",
        "taylorseer",
        "taylorseer",
        "clusca",
        "clusca",
        "taylorseer",
    ]
    with pytest.raises(InvalidParameterError, match="key=value"):
        parse_method("taylorseer:interval")


@pytest.mark.parametrize("content", [None, b"not a safetensors file"])
def test_bench_reports_missing_or_corrupt_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None
) -> None:
    weights = tmp_path / "model.safetensors"
    if content is not None:
        weights.write_bytes(content)
    out = tmp_path / "report"
    assert main(["bench", *SMALL, "--model", str(weights), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(weights) in err and ("does not exist" in err or "unreadable" in err)
    assert not any(out.iterdir())
