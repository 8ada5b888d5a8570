"""The ``hicache`` command line on small settings (the embedded model, a few steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli_status, refuse_json_token

from hicache_sdk.bench.methods import DEFAULT_METHODS, parse_method
from hicache_sdk.bench.report import REPORT_FILES
from hicache_sdk.cli import main
from hicache_sdk.errors import InvalidParameterError

# two repeats, so that "repeats bit-identical" compares two runs and the spread of the wall times exists
SMALL = ["--steps", "6", "--digits", "1", "7", "--seeds-per-digit", "1", "--repeats", "2", "--no-progress"]


def test_bench_writes_a_complete_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    methods = ["full", "taylorseer+hermite:interval=3", "clusca:interval=3,num_clusters=4"]
    assert main(["bench", *SMALL, "--methods", *methods, "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(REPORT_FILES)
    report = json.loads((tmp_path / "bench.json").read_text(), parse_constant=refuse_json_token)  # strict JSON
    rows = {r["label"]: r for r in report["results"]}
    assert list(rows) == methods
    assert rows["full"]["rel_l2"] == 0.0 and rows["full"]["flops_speedup"] == 1.0
    assert rows["full"]["psnr"] is None  # +inf for identical images, written as null
    for label in methods[1:]:
        row = rows[label]
        assert row["full_steps"] + row["forecast_steps"] == 6
        assert row["flops_speedup"] > 1.0  # counted, so it depends on the schedule
        assert 0.0 < row["rel_l2"] < 1.0
    for row in rows.values():
        seconds = row["wall_seconds"]
        assert len(seconds) == 2
        assert row["wall"]["spread"] == pytest.approx(max(seconds) / min(seconds))
        paired = [f / s for f, s in zip(rows["full"]["wall_seconds"], seconds, strict=True)]
        assert [row["wall"]["speedup_min"], row["wall"]["speedup_max"]] == pytest.approx(sorted(paired))
    assert report["deterministic"] is True  # two repeats of each method gave identical images
    assert report["wall_check"]["tolerance"] == 1.25 and report["wall_check"]["trusted"] in (True, False)
    markdown = (tmp_path / "bench.md").read_text()
    assert "| taylorseer+hermite:interval=3 |" in markdown
    assert "| time spread |" in markdown and report["wall_check"]["note"] in markdown
    out = capsys.readouterr().out
    assert "taylorseer+hermite" in out and report["wall_check"]["note"] in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "ful"], "Did you mean 'full'"),
        (["--methods", "taylorseer+hermit"], "Did you mean 'hermite'"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--digits", "12"], "--digits must be in 0..9, got [12]"),
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


def test_trajectory_samples_in_the_models_dtype(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # --dtype (and --device) place the model; the trajectory's sampler must follow it, not assume cpu/float32
    assert main(["trajectory", "--steps", "6", "--interval", "2", "--dtype", "bfloat16", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "trajectory.png").stat().st_size > 0
    assert "taylor: relative L2" in capsys.readouterr().out


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
    assert not out.exists()  # the weights are read before the output folder is made


# --------------------------------------------------------------------------- bad input: exit 2, no traceback

BAD_OPTIONS = [
    (["bench", "--threads", "-1"], "--threads must be >= 1, got -1"),
    (["bench", "--threads", "0"], "--threads must be >= 1, got 0"),
    (["bench", "--device", "tpu"], "--device 'tpu' is not a torch device"),
    (["bench", "--device", "meta"], "--device 'meta' is not supported"),
    (["bench", "--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["bench", "--seeds-per-digit", "0"], "--seeds-per-digit must be >= 1, got 0"),
    (["bench", "--digits", "-1", "3"], "--digits must be in 0..9, got [-1]"),
    (["bench", "--seed", "-1"], "--seed must be >= 0, got -1"),
    (["bench", "--interval", "0"], "--interval must be >= 1, got 0"),
    (["bench", "--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["bench", "--max-order", "7"], "--max-order must be <= 6, got 7"),
    (["bench", "--sigma", "0"], "--sigma must be a finite number > 0, got 0.0"),
    (["bench", "--sigma", "nan"], "--sigma must be a finite number > 0, got nan"),
    (["compare", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["compare", "--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["compare", "--seeds-per-digit", "-2"], "--seeds-per-digit must be >= 1, got -2"),
    (["compare", "--digits", "10"], "--digits must be in 0..9, got [10]"),
    (["compare", "--compile-steps", "0"], "--compile-steps must be >= 1, got 0"),
    (["compare", "--first-block-thresholds", "0.1", "-0.2"], "--first-block-thresholds must be a finite number > 0"),
    (["compare", "--mag-thresholds", "inf"], "--mag-thresholds must be a finite number > 0, got inf"),
    (["compare", "--cache-dit-thresholds", "0"], "--cache-dit-thresholds must be a finite number > 0, got 0.0"),
    (["compare", "--threads", "0"], "--threads must be >= 1, got 0"),
    (["compare", "--compile-backend", "inductr"], "--compile-backend 'inductr' is not a torch.compile backend"),
    (["run", "--samples", "0"], "--samples must be >= 1, got 0"),
    (["run", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["run", "--digit", "3", "10"], "--digit must be in 0..9, got [10]"),
    (["run", "--interval", "0"], "--interval must be >= 1, got 0"),
    (["run", "--device", "tpu"], "--device 'tpu' is not a torch device"),
    (["trajectory", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["trajectory", "--digit", "12"], "--digit must be in 0..9, got 12"),
    (["trajectory", "--max-order", "-1"], "--max-order must be >= 0, got -1"),
    # argparse's own errors carry the same prefix
    (["bench", "--threads", "abc"], "argument --threads: invalid int value: 'abc'"),
    (["run", "--samples", "1.5"], "argument --samples: invalid int value: '1.5'"),
    (["bench", "--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    (["bench", "--no-such-option"], "unrecognized arguments: --no-such-option"),
    ([], "the following arguments are required: COMMAND"),
]


# small settings put before the bad option (the later value of an option wins), so that an option that
# slipped through fails the test in seconds instead of starting a full run
SMALL_FOR = {
    "bench": [*SMALL, "--methods", "full"],
    "compare": [*SMALL, "--targets", "2x", "--methods", "taylorseer", "--baselines", "taylorseer", "--no-overhead"],
    "run": ["--steps", "2", "--no-progress"],
    "trajectory": ["--steps", "4"],
}


@pytest.mark.parametrize(("argv", "message"), BAD_OPTIONS, ids=[" ".join(a) or "none" for a, _ in BAD_OPTIONS])
def test_bad_options_exit_2_naming_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    out = tmp_path / "out"
    if argv:
        small = SMALL_FOR[argv[0]]
        if argv[0] == "compare" and "--compile-backend" not in argv:
            small = [*small, "--no-compile"]
        argv = [argv[0], *small, *argv[1:], "--out", str(out)]
    assert cli_status(argv) == 2
    err = capsys.readouterr().err
    assert f"hicache: error: {message}" in err, err
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(("device", "what"), [("cuda", "CUDA"), ("cuda:0", "CUDA"), ("mps", "MPS")])
def test_unavailable_accelerator_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, device: str, what: str
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    out = tmp_path / "out"
    assert cli_status(["bench", *SMALL, "--methods", "full", "--device", device, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"hicache: error: --device '{device}': {what} is not available" in err, err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(("args", "message"), [(["--threads", "-1"], "--threads must be >= 1, got -1")])
def test_command_line_exit_status_and_stderr(args: list[str], message: str) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-m", "hicache_sdk", "bench", *args], capture_output=True, text=True, env=env
    )
    assert done.returncode == 2
    assert f"hicache: error: {message}" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""


# --------------------------------------------------------------------------- a model that draws no digits


def _scaled_weights(path: Path, factor: float, only: str = "") -> Path:
    """The shipped weights with every tensor whose name contains ``only`` multiplied by ``factor``: finite,
    so the file passes every load check."""
    import torch

    from hicache_sdk.models import load_digits_model
    from hicache_sdk.models.digits import save_digits_model

    model = load_digits_model()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if only in name and tensor.is_floating_point():
                tensor.mul_(factor)
    save_digits_model(model, path)
    load_digits_model(path)  # accepted by the loader: the problem shows only in what it draws
    return path


@pytest.mark.parametrize(
    ("factor", "only", "message"),
    [
        (10.0, "", "the model's output is saturated: 100% of the pixels of sample 0"),
        (1e30, "proj_out", "the model's output is not finite"),
    ],
)
def test_run_refuses_a_model_that_draws_no_digits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], factor: float, only: str, message: str
) -> None:
    weights = _scaled_weights(tmp_path / "scaled.safetensors", factor, only)
    out = tmp_path / "out"
    argv = ["run", "--model", str(weights), "--steps", "4", "--samples", "2", "--no-progress", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"hicache: error: {message}" in err, err
    assert not list(out.glob("*.png"))


def test_bench_refuses_a_saturated_model_without_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = _scaled_weights(tmp_path / "scaled.safetensors", 10.0)
    out = tmp_path / "report"
    methods = ["--methods", "full", "fora:interval=3"]
    assert main(["bench", *SMALL, *methods, "--model", str(weights), "--out", str(out)]) == 2
    assert "hicache: error: the model's output is saturated" in capsys.readouterr().err
    assert not any(out.iterdir())


# --------------------------------------------------------------------------- the wall check through the CLI


@pytest.mark.parametrize(
    ("row_seconds", "trusted", "flags", "verdict"),
    [
        # full compute 1.0 s each repeat; the cached row 0.5 s then 0.1 s: spread 5x, and a median wall
        # speedup of 1 / 0.3 = 3.33x above its FLOPs speedup (about 1.5x: 4 of 6 steps full)
        ((0.5, 0.1), False, ["noisy", "wall > FLOPs"], "too noisy to trust the wall column"),
        # 0.8 s and 0.82 s: spread 1.025x, wall speedup 1.23x below its FLOPs speedup
        ((0.8, 0.82), True, [], "the wall column is consistent"),
    ],
)
def test_bench_flags_noisy_wall_times(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    row_seconds: tuple[float, float],
    trusted: bool,
    flags: list[str],
    verdict: str,
) -> None:
    from hicache_sdk.bench import runner

    real_timed = runner.timed
    scripted = iter([1.0, row_seconds[0], 1.0, row_seconds[1]])  # interleaved: full, row, full, row

    def timed(fn, device):  # type: ignore[no-untyped-def]
        return real_timed(fn, device)[0], next(scripted)

    monkeypatch.setattr(runner, "timed", timed)
    assert main(["bench", *SMALL, "--methods", "full", "taylorseer:interval=3", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench.json").read_text(), parse_constant=refuse_json_token)
    full, row = report["results"]
    assert row["wall_seconds"] == list(row_seconds)
    assert 1.3 < row["flops_speedup"] < 1.6  # 4 of 6 steps full: between the two cases' wall speedups
    assert row["wall"]["spread"] == pytest.approx(max(row_seconds) / min(row_seconds))
    assert row["wall"]["flags"] == flags and full["wall"]["flags"] == []
    assert report["wall_check"]["trusted"] is trusted and verdict in report["wall_check"]["note"]
    assert verdict in (tmp_path / "bench.md").read_text() and verdict in capsys.readouterr().out
