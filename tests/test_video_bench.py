"""The video bench: its task table, the temporal error, clip scores, the animated report and the CLI.

Random-weight models and classifiers wherever the shipped weights are not the point; the tests
marked "shipped" run the embedded video DiT and frame classifier (``hicache bench --model video``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
from helpers import cli_status, refuse_json_token
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from PIL import Image

from hicache_sdk.bench import report as report_module
from hicache_sdk.bench.methods import BENCH_METHODS, DEFAULT_METHODS, DYNAMIC_METHODS, PAPER_SETTING, parse_methods
from hicache_sdk.bench.metrics import psnr, relative_l2, ssim, temporal_error
from hicache_sdk.bench.report import (
    GIF_CELL,
    REPORT_FILES,
    clip_grid_frames,
    markdown_table,
    report_files,
    write_report,
)
from hicache_sdk.bench.runner import BenchReport, BenchSettings, MethodResult, run_bench
from hicache_sdk.bench.tasks import TASKS, clip_fidelity, fidelity, get_task, resolve_model
from hicache_sdk.cli import main
from hicache_sdk.errors import InvalidParameterError
from hicache_sdk.models.classifier import (
    FRAME_CLASSIFIER_WEIGHTS,
    DigitClassifier,
    build_digit_classifier,
    save_digit_classifier,
)
from hicache_sdk.models.digits import (
    DIT_WEIGHTS,
    DigitsModel,
    build_digits_model,
    default_weights_path,
    save_digits_model,
)
from hicache_sdk.models.formats import WeightsError
from hicache_sdk.models.video import (
    VIDEO_WEIGHTS,
    VideoConfig,
    VideoModel,
    build_video_model,
    classifier_frames,
    clip_frames,
    save_video_model,
)

VIDEO_FILES = ("bench.json", "bench.md", "samples.gif", "speed_vs_error.png")
#: the reduced video bench of CI: one clip, 4 steps, full compute and one cached row
VIDEO_SMALL = ["--steps", "4", "--digits", "3", "--seeds-per-digit", "1", "--repeats", "1", "--no-progress"]
SHARED = {"interval": 3, "warmup": 1, "max_order": 1}
FRAMES, SIDE = VideoConfig().frames, VideoConfig().frame_size  # the video model's clips (8 frames)
SHAPE_ERROR = f"this video model was trained on {FRAMES}-frame clips of {SIDE}x{SIDE} pixels"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _clips(seed: int, shape: tuple[int, ...] = (2, 1, 4, 3, 3), dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture(scope="module")
def classifier() -> DigitClassifier:
    return build_digit_classifier(0).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def video_model() -> VideoModel:
    return build_video_model(0).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def digits_model() -> DigitsModel:
    return build_digits_model(0).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def weights_files(tmp_path_factory: pytest.TempPathFactory, video_model: VideoModel) -> dict[str, Path]:
    """A random video-DiT file, a random digits-DiT file, a frame-classifier file and random bytes."""
    folder = tmp_path_factory.mktemp("weights")
    files = {name: folder / f"{name}.safetensors" for name in ("video", "digits", "classifier", "corrupt")}
    save_video_model(video_model, files["video"])
    save_digits_model(build_digits_model(1), files["digits"])
    save_digit_classifier(build_digit_classifier(0), files["classifier"], frames=True)
    files["corrupt"].write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return files


# -- temporal error ---------------------------------------------------------------------------------


def test_temporal_error_by_hand() -> None:
    reference = torch.tensor([0.0, 1.0, 3.0]).view(1, 1, 3, 1, 1)  # motion (1, 2)
    sample = torch.tensor([0.0, 2.0, 3.0]).view(1, 1, 3, 1, 1)  # motion (2, 1): off by (1, -1)
    assert temporal_error(sample, reference) == pytest.approx(math.sqrt(2 / 5), rel=1e-12)
    # over the whole batch: a second clip that moves exactly like its reference adds to the denominator only
    reference2 = torch.cat([reference, torch.tensor([0.0, 2.0, 2.0]).view(1, 1, 3, 1, 1)])
    sample2 = torch.cat([sample, torch.tensor([5.0, 7.0, 7.0]).view(1, 1, 3, 1, 1)])
    assert temporal_error(sample2, reference2) == pytest.approx(math.sqrt(2 / 9), rel=1e-12)


def test_temporal_error_is_zero_for_identical_clips() -> None:
    clips = _clips(0)
    assert temporal_error(clips, clips.clone()) == 0.0


@hypothesis_settings(max_examples=8)
@given(seed=st.integers(0, 2**16), scale=st.floats(-2.0, 2.0))
def test_temporal_error_ignores_a_still_offset(seed: int, scale: float) -> None:
    reference = _clips(seed)
    offset = scale * _clips(seed + 1, (2, 1, 1, 3, 3))  # the same error in every frame
    assert temporal_error(reference + offset, reference) == pytest.approx(0.0, abs=1e-12)
    assert temporal_error(reference + offset, reference + offset) == 0.0


@hypothesis_settings(max_examples=8)
@given(seed=st.integers(0, 2**16), size=st.floats(1e-3, 1.0), c=st.floats(1e-3, 1e3))
def test_temporal_error_is_positive_and_scale_invariant(seed: int, size: float, c: float) -> None:
    reference = _clips(seed)
    sample = reference + size * _clips(seed + 1)  # an error that changes from frame to frame
    error = temporal_error(sample, reference)
    assert math.isfinite(error) and error > 0.0
    assert temporal_error(c * sample, c * reference) == pytest.approx(error, rel=1e-9)
    # float32 clips are scored in float64 as well
    assert temporal_error(sample.float(), reference.float()) == pytest.approx(error, rel=1e-3)


def test_temporal_error_of_single_frames_is_nan() -> None:
    assert math.isnan(temporal_error(_clips(0, (2, 1, 1, 3, 3)), _clips(1, (2, 1, 1, 3, 3))))


def test_temporal_error_against_a_still_reference() -> None:
    still = _clips(0, (1, 1, 1, 3, 3)).expand(1, 1, 4, 3, 3).contiguous()
    assert temporal_error(_clips(1, (1, 1, 4, 3, 3)), still) == math.inf  # the sample moves, the reference not
    assert temporal_error(still + 0.25, still) == 0.0  # neither moves


@pytest.mark.parametrize(
    ("sample_shape", "reference_shape"),
    [
        ((2, 1, 3, 3), (2, 1, 3, 3)),  # images, not clips
        ((1, 2, 1, 4, 3, 3), (1, 2, 1, 4, 3, 3)),
        ((2, 1, 4, 3, 3), (2, 1, 5, 3, 3)),  # different frame counts
        ((2, 1, 4, 3, 3), (1, 1, 4, 3, 3)),
    ],
)
def test_temporal_error_refuses_other_shapes(sample_shape: tuple[int, ...], reference_shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"expected two clips of shape \(N, C, F, H, W\)"):
        temporal_error(torch.zeros(sample_shape), torch.zeros(reference_shape))


# -- clip scores ------------------------------------------------------------------------------------


def test_clip_frames_are_clip_major() -> None:
    clips = _clips(0, (2, 1, 3, 32, 32), torch.float32)
    frames = clip_frames(clips)
    assert frames.shape == (6, 1, 32, 32)
    for i in range(2):
        for t in range(3):
            assert torch.equal(frames[3 * i + t], clips[i, :, t])


def _scored_clips(side: int) -> tuple[torch.Tensor, torch.Tensor]:
    reference = _clips(0, (2, 1, 3, side, side), torch.float32)
    return (reference + 0.1 * _clips(1, (2, 1, 3, side, side), torch.float32)).clamp(0, 1), reference


def _frame_psnr(clips: torch.Tensor, reference: torch.Tensor) -> float:
    values = []
    for i in range(clips.shape[0]):
        for t in range(clips.shape[2]):
            mse = float((clips[i, :, t].double() - reference[i, :, t].double()).pow(2).mean())
            values.append(10 * math.log10(1 / mse))
    return sum(values) / len(values)


@pytest.mark.parametrize("side", [SIDE, 32])
def test_clip_fidelity_counts_frames(classifier: DigitClassifier, side: int) -> None:
    clips, reference = _scored_clips(side)
    frames = classifier_frames(clips)
    assert frames.shape == (6, 1, 32, 32)  # what the frame classifier reads
    ours = [[int(classifier.classify(frames[3 * i + t : 3 * i + t + 1])[0]) for t in range(3)] for i in range(2)]
    # clip 0 asks for the digit its first frame is read as, clip 1 for one none of its frames is read as
    digits = [ours[0][0], next(d for d in range(10) if d not in ours[1])]
    scores = clip_fidelity(clips, reference, classifier, digits)
    assert scores.accuracy == pytest.approx(sum(p == digits[0] for p in ours[0]) / 6)
    assert 0 < scores.accuracy <= 0.5
    assert scores.temporal == pytest.approx(temporal_error(clips, reference), rel=1e-12)
    assert scores.temporal > 0 and math.isfinite(scores.frechet) and scores.frechet >= 0


def test_clip_fidelity_image_scores_on_32_pixel_frames(classifier: DigitClassifier) -> None:
    clips, reference = _scored_clips(32)  # frames the classifier reads as they are
    scores = clip_fidelity(clips, reference, classifier, [1, 2])
    assert scores.psnr == pytest.approx(_frame_psnr(clips, reference), rel=1e-9)
    rel = float((clips.double() - reference.double()).norm() / reference.double().norm())
    assert scores.rel_l2 == pytest.approx(rel, rel=1e-9)
    assert scores.ssim == pytest.approx(ssim(clip_frames(clips), clip_frames(reference)), rel=1e-12)


def test_clip_fidelity_image_scores_on_the_models_frames(classifier: DigitClassifier) -> None:
    clips, reference = _scored_clips(SIDE)  # the video model's frames, upscaled only for the classifier
    scores = clip_fidelity(clips, reference, classifier, [1, 2])
    assert scores.psnr == pytest.approx(_frame_psnr(clips, reference), rel=1e-9)
    assert scores.rel_l2 == pytest.approx(relative_l2(clips, reference), rel=1e-9)  # "over the whole clips"
    assert scores.ssim == pytest.approx(ssim(clip_frames(clips), clip_frames(reference)), rel=1e-12)


def test_clip_fidelity_of_identical_clips(classifier: DigitClassifier) -> None:
    clips = _clips(2, (2, 1, 3, SIDE, SIDE), torch.float32)
    scores = clip_fidelity(clips, clips.clone(), classifier, [4, 5])
    assert scores.rel_l2 == 0.0 and scores.temporal == 0.0 and scores.frechet == 0.0
    assert scores.psnr == math.inf and scores.ssim == pytest.approx(1.0)


def test_image_fidelity_has_no_temporal_error(classifier: DigitClassifier) -> None:
    images = _clips(3, (2, 1, 32, 32), torch.float32)
    scores = fidelity(images, images * 0.9, classifier, [1, 2])
    assert math.isnan(scores.temporal)
    assert scores.rel_l2 == pytest.approx(relative_l2(images, images * 0.9))
    assert scores.psnr == pytest.approx(psnr(images, images * 0.9))


# -- tasks and --model ------------------------------------------------------------------------------


def test_the_two_tasks() -> None:
    assert sorted(TASKS) == ["digits", "video"]
    assert (TASKS["digits"].model_type, TASKS["digits"].grid_file) == (DigitsModel, "samples.png")
    assert (TASKS["video"].model_type, TASKS["video"].grid_file) == (VideoModel, "samples.gif")
    assert get_task("video") is TASKS["video"]


def test_get_task_suggests_a_name() -> None:
    with pytest.raises(InvalidParameterError, match=r"unknown task 'vidoe'.*Did you mean 'video'\?"):
        get_task("vidoe")


def test_resolve_model_by_name() -> None:
    assert resolve_model(None) == (TASKS["digits"], None)
    assert resolve_model(None, "video") == (TASKS["video"], None)
    assert resolve_model("video") == (TASKS["video"], None)
    assert resolve_model("digits", "digits") == (TASKS["digits"], None)
    with pytest.raises(InvalidParameterError, match="--model video is not the model of --task digits"):
        resolve_model("video", "digits")
    with pytest.raises(InvalidParameterError, match="--model digits is not the model of --task video"):
        resolve_model("digits", "video")


def test_resolve_model_reads_the_task_from_the_file(weights_files: dict[str, Path]) -> None:
    shipped = default_weights_path(DIT_WEIGHTS)
    assert resolve_model(shipped) == (TASKS["digits"], shipped)
    assert resolve_model(str(weights_files["digits"])) == (TASKS["digits"], weights_files["digits"])
    assert resolve_model(weights_files["video"]) == (TASKS["video"], weights_files["video"])
    assert resolve_model(weights_files["video"], "video") == (TASKS["video"], weights_files["video"])


def test_resolve_model_refuses_a_file_of_the_other_task(weights_files: dict[str, Path]) -> None:
    with pytest.raises(WeightsError, match=r"holds the digits DiT .*not the video model's weights"):
        resolve_model(weights_files["digits"], "video")
    with pytest.raises(WeightsError, match=r"holds the video DiT .*not the digits model's weights"):
        resolve_model(weights_files["video"], "digits")
    with pytest.raises(WeightsError, match=r"holds the video-frame classifier .*one of \['digits', 'video'\]"):
        resolve_model(weights_files["classifier"])
    with pytest.raises(WeightsError, match="unreadable"):
        resolve_model(weights_files["corrupt"])
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_model(weights_files["video"].with_name("missing.safetensors"))


def test_resolve_model_tells_a_file_named_like_a_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weights_files: dict[str, Path]
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsError, match=r"weights file vidoe does not exist\. Did you mean 'video'\?"):
        resolve_model("vidoe")
    with pytest.raises(WeightsError, match="weights file video does not exist"):
        resolve_model(Path("video"))  # a Path is always a file
    (tmp_path / "video").write_bytes(weights_files["video"].read_bytes())
    assert resolve_model("video") == (TASKS["video"], None)  # a task name: the shipped weights
    assert resolve_model("./video") == (TASKS["video"], Path("video"))
    assert resolve_model(Path("video"), "video") == (TASKS["video"], Path("video"))


def test_task_shape_checks(video_model: VideoModel, digits_model: DigitsModel) -> None:
    TASKS["video"].check_shape(video_model, None, None)
    TASKS["video"].check_shape(video_model, FRAMES, SIDE)
    for frames, size in ((16, None), (None, 64), (1, SIDE), (FRAMES, 2 * SIDE)):
        with pytest.raises(InvalidParameterError, match=SHAPE_ERROR):
            TASKS["video"].check_shape(video_model, frames, size)
    TASKS["digits"].check_shape(digits_model, None, 32)
    with pytest.raises(InvalidParameterError, match="frame count applies to the video model"):
        TASKS["digits"].check_shape(digits_model, 8, None)
    with pytest.raises(InvalidParameterError, match="32x32 images"):
        TASKS["digits"].check_shape(digits_model, None, 64)


# -- run_bench ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("task", "wrong"), [("video", "digits_model"), ("digits", "video_model")])
def test_run_bench_refuses_a_model_of_another_task(
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    classifier: DigitClassifier,
    task: str,
    wrong: str,
) -> None:
    calls: list[str] = []

    def generate(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append("generate")
        raise AssertionError("generated before checking the model")

    monkeypatch.setitem(TASKS, task, attrs.evolve(TASKS[task], generate=generate))
    model = request.getfixturevalue(wrong)
    settings = BenchSettings(methods=tuple(parse_methods(["full"])), steps=2, digits=(1,), seeds_per_digit=1, task=task)
    expected = "VideoModel, got DigitsModel" if task == "video" else "DigitsModel, got VideoModel"
    with pytest.raises(InvalidParameterError, match=f"the {task} bench needs a {expected}"):
        run_bench(settings, model=model, classifier=classifier)
    assert calls == []


def test_run_bench_refuses_an_unknown_task(video_model: VideoModel) -> None:
    settings = BenchSettings(methods=(), steps=2, digits=(1,), seeds_per_digit=1, task="vidoe")
    with pytest.raises(InvalidParameterError, match="Did you mean 'video'"):
        run_bench(settings, model=video_model)


@pytest.fixture(scope="module")
def video_report(video_model: VideoModel, classifier: DigitClassifier) -> BenchReport:
    settings = BenchSettings(
        methods=tuple(parse_methods(["full", "taylorseer", "fora"])),
        shared=SHARED,
        steps=6,
        digits=(1, 2),
        seeds_per_digit=1,
        repeats=1,
        task="video",
    )
    return run_bench(settings, model=video_model, classifier=classifier)


def test_video_run_bench(video_report: BenchReport) -> None:
    rows = {r.label: r for r in video_report.results}
    assert list(rows) == ["full", "taylorseer", "fora"]
    for label, clips in video_report.images.items():
        assert clips.shape == (2, 1, FRAMES, SIDE, SIDE), label
        assert 0.0 <= float(clips.min()) and float(clips.max()) <= 1.0
    assert rows["full"].temporal == 0.0 and rows["full"].rel_l2 == 0.0 and rows["full"].psnr == math.inf
    for row in rows.values():
        assert math.isfinite(row.temporal) and row.temporal >= 0.0, row.label
    for label in ("taylorseer", "fora"):
        row = rows[label]
        assert row.full_steps + row.forecast_steps == 6
        assert row.forecast_steps > 0 and row.flops_speedup > 1.0
        assert row.temporal > 0.0 and row.rel_l2 > 0.0
        # the row's scores are the clip scores of its clips against full compute's
        assert row.temporal == pytest.approx(
            temporal_error(video_report.images[label], video_report.images["full"]), rel=1e-12
        )


# -- the report -------------------------------------------------------------------------------------


def _digits_result(label: str) -> MethodResult:
    return MethodResult(
        label=label,
        tag=label,
        flops_speedup=1.0,
        wall_speedup=1.0,
        wall_seconds=(1.0,),
        rel_l2=0.0,
        psnr=math.inf,
        ssim=1.0,
        accuracy=1.0,
        frechet=0.0,
        full_steps=6,
        forecast_steps=0,
        cache_bytes=0,
        fallbacks=0,
    )


def test_report_files_by_task(video_report: BenchReport) -> None:
    assert report_files(video_report) == VIDEO_FILES
    digits = attrs.evolve(video_report, settings=attrs.evolve(video_report.settings, task="digits"))
    assert report_files(digits) == REPORT_FILES


def test_temporal_column_only_for_clips(video_report: BenchReport) -> None:
    table = markdown_table(video_report.results)
    header = [cell.strip() for cell in table.splitlines()[0].strip("|").split("|")]
    assert header.index("temporal err") == header.index("Frechet") + 1
    full_row = [cell.strip() for cell in table.splitlines()[2].strip("|").split("|")]
    assert full_row[0] == "full" and full_row[header.index("temporal err")] == "0.0000"
    assert all(len(line.strip("|").split("|")) == len(header) for line in table.splitlines())
    digits_table = markdown_table([_digits_result("full"), _digits_result("fora")])
    assert "temporal" not in digits_table


def test_write_video_report(tmp_path: Path, video_report: BenchReport) -> None:
    written = write_report(video_report, tmp_path)
    assert [p.name for p in written] == list(VIDEO_FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(VIDEO_FILES)  # no samples.png, no staging folder
    with Image.open(tmp_path / "samples.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames == FRAMES and gif.is_animated
        frames = []
        for t in range(gif.n_frames):
            gif.seek(t)
            frames.append(np.asarray(gif.convert("L")))
    # frame t of the GIF shows frame t of each clip: find the full row's first clip, then follow it in time
    clip = video_report.images["full"][0, 0]
    expected = [_gif_cell(clip[t]) for t in range(FRAMES)]
    y, x = _find(frames[0], expected[0])
    side = expected[0].shape[0]
    for t in range(FRAMES):
        assert np.array_equal(frames[t][y : y + side, x : x + side], expected[t]), t
    markdown = (tmp_path / "bench.md").read_text()
    assert "| temporal err |" in markdown and f"Model: {TASKS['video'].describe}." in markdown
    assert "2 clips (digits [1, 2]" in markdown
    payload = json.loads((tmp_path / "bench.json").read_text(), parse_constant=refuse_json_token)
    assert payload["settings"]["task"] == "video"
    rows = {r["label"]: r for r in payload["results"]}
    assert rows["full"]["temporal"] == 0.0 and rows["full"]["psnr"] is None
    assert rows["fora"]["temporal"] == pytest.approx({r.label: r for r in video_report.results}["fora"].temporal)


def _gif_cell(frame: torch.Tensor) -> np.ndarray:
    pixels = (frame.float().clamp(0, 1).numpy() * 255).round().astype("uint8")
    scale = max(1, GIF_CELL // pixels.shape[-1])  # a whole factor, to about GIF_CELL pixels
    return np.kron(pixels, np.ones((scale, scale), dtype="uint8"))


def _find(picture: np.ndarray, cell: np.ndarray) -> tuple[int, int]:
    windows = np.lib.stride_tricks.sliding_window_view(picture, cell.shape)
    hits = np.argwhere((windows == cell).all(axis=(2, 3)))
    assert len(hits) >= 1, "the clip's first frame is not in the GIF's first frame"
    return int(hits[0][0]), int(hits[0][1])


def test_gif_grows_with_rows_and_columns(video_report: BenchReport) -> None:
    full = clip_grid_frames(video_report)
    fewer_rows = clip_grid_frames(attrs.evolve(video_report, results=video_report.results[:2]))
    settings = attrs.evolve(video_report.settings, digits=(1,))
    fewer_columns = clip_grid_frames(attrs.evolve(video_report, settings=settings))
    assert len(full) == len(fewer_rows) == len(fewer_columns) == FRAMES
    (width, height), (w_rows, h_rows), (w_cols, h_cols) = full[0].size, fewer_rows[0].size, fewer_columns[0].size
    assert w_rows == width and h_rows < height
    assert h_cols == height and w_cols < width
    assert all(frame.size == (width, height) for frame in full)


def test_digits_report_table_and_files_have_no_clips(tmp_path: Path) -> None:
    settings = BenchSettings(methods=tuple(parse_methods(["full"])), steps=6, digits=(1, 7), seeds_per_digit=1)
    result = _digits_result("full")
    images = {"full": _clips(0, (2, 1, 32, 32), torch.float32)}
    report = BenchReport(settings=settings, results=(result,), images=images, machine="test", deterministic=True)
    write_report(report, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(REPORT_FILES)
    assert "temporal" not in (tmp_path / "bench.md").read_text()


def test_a_report_replaces_the_other_tasks_picture(tmp_path: Path, video_report: BenchReport) -> None:
    settings = BenchSettings(methods=tuple(parse_methods(["full"])), steps=6, digits=(1, 7), seeds_per_digit=1)
    images = {"full": _clips(0, (2, 1, 32, 32), torch.float32)}
    digits = BenchReport(
        settings=settings, results=(_digits_result("full"),), images=images, machine="test", deterministic=True
    )
    write_report(digits, tmp_path)
    write_report(video_report, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(VIDEO_FILES)  # the digits samples.png is gone
    write_report(digits, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(REPORT_FILES)


@pytest.mark.parametrize("failing", ["save_clip_grid", "speed_error_plot"])
def test_a_failed_write_leaves_no_report_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, video_report: BenchReport, failing: str
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(report_module, failing, boom)
    out = tmp_path / "report"
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_report(video_report, out)
    assert list(out.iterdir()) == []  # neither report files nor the staging folder


# -- methods --------------------------------------------------------------------------------------


def test_bench_methods() -> None:
    specs = parse_methods(BENCH_METHODS)
    labels = [s.label for s in specs]
    assert labels == list(BENCH_METHODS) and len(set(labels)) == len(labels)
    assert BENCH_METHODS[: len(DEFAULT_METHODS)] == DEFAULT_METHODS
    assert set(DYNAMIC_METHODS) <= set(BENCH_METHODS)
    assert {"first_block", "easycache", "speca", "pab"} <= {s.policy for s in specs}
    for spec in specs:
        assert (spec.accelerator(PAPER_SETTING) is None) == spec.is_full, spec.label


# -- the CLI ------------------------------------------------------------------------------------------


def _shipped_video() -> bool:
    return default_weights_path(VIDEO_WEIGHTS).is_file() and default_weights_path(FRAME_CLASSIFIER_WEIGHTS).is_file()


def test_video_weights_are_shipped() -> None:
    assert _shipped_video(), "the video DiT and the frame classifier must ship with the package"


@pytest.mark.skipif(not _shipped_video(), reason="the shipped video weights are not there yet")
def test_cli_video_bench(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    methods = ["full", "taylorseer:interval=2,warmup=1"]
    shape = ["--frames", str(FRAMES), "--size", str(SIDE)]  # the model's own clip shape is accepted
    assert main(["bench", "--model", "video", *VIDEO_SMALL, *shape, "--methods", *methods, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(VIDEO_FILES)
    with Image.open(out / "samples.gif") as gif:
        assert gif.n_frames == FRAMES
    payload = json.loads((out / "bench.json").read_text(), parse_constant=refuse_json_token)
    assert payload["settings"]["task"] == "video"
    rows = {r["label"]: r for r in payload["results"]}
    assert list(rows) == methods
    assert rows["full"]["temporal"] == 0.0
    assert rows[methods[1]]["full_steps"] + rows[methods[1]]["forecast_steps"] == 4
    assert rows[methods[1]]["temporal"] is not None and rows[methods[1]]["temporal"] >= 0.0
    printed = capsys.readouterr().out
    assert "video model" in printed and "temporal err" in printed


@pytest.mark.skipif(not _shipped_video(), reason="the shipped video weights are not there yet")
def test_cli_video_bench_draws_one_clip_per_digit_by_default(tmp_path: Path) -> None:
    out = tmp_path / "report"
    argv = ["bench", "--model", "video", "--steps", "2", "--digits", "3", "5", "--repeats", "1", "--no-progress"]
    assert main([*argv, "--methods", "full", "--out", str(out)]) == 0
    payload = json.loads((out / "bench.json").read_text(), parse_constant=refuse_json_token)
    assert payload["settings"]["seeds_per_digit"] == TASKS["video"].seeds_per_digit == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "video", "--model", "{digits_shipped}"], "holds the digits DiT"),
        (["--task", "digits", "--model", "{video}"], "holds the video DiT"),
        (["--task", "digits", "--model", "video"], "--model video is not the model of --task digits"),
        (["--model", "{corrupt}"], "is unreadable"),
        (["--model", "vidoe"], "does not exist. Did you mean 'video'?"),
        (["--model", "{classifier}"], "holds the video-frame classifier"),
        (["--model", "digits", "--frames", "8"], "a frame count applies to the video model"),
        (["--model", "digits", "--size", "64"], "trained on 32x32 images"),
        (["--model", "{video}", "--frames", "0"], "--frames must be >= 1"),
    ],
)
def test_cli_bench_refuses_bad_models_without_writing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    weights_files: dict[str, Path],
    args: list[str],
    message: str,
) -> None:
    paths = {name: str(path) for name, path in weights_files.items()}
    paths["digits_shipped"] = str(default_weights_path(DIT_WEIGHTS))
    out = tmp_path / "report"
    argv = ["bench", *VIDEO_SMALL, *[a.format(**paths) for a in args], "--methods", "full", "--out", str(out)]
    assert cli_status(argv) == 2
    err = capsys.readouterr().err
    assert "hicache: error: " in err and message in err, err
    assert not out.exists()


@pytest.mark.skipif(not _shipped_video(), reason="the shipped video weights are not there yet")
@pytest.mark.parametrize(
    "args",
    [
        ["--frames", "16"],
        ["--size", "64"],
        ["--frames", str(FRAMES), "--size", str(2 * SIDE)],
        ["--task", "video", "--size", "8"],
    ],
)
def test_cli_bench_refuses_a_clip_shape_the_video_model_does_not_draw(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    out = tmp_path / "report"
    argv = ["bench", "--model", "video", *VIDEO_SMALL, *args, "--methods", "full", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"hicache: error: {SHAPE_ERROR}" in err
    assert not out.exists()


DIGITS_ONLY = [
    ["run", "--steps", "2", "--no-progress"],
    ["trajectory", "--steps", "2"],
    ["compare", "--steps", "8", "--no-compile", "--no-overhead", "--no-progress"],
    ["frontier", "--quick", "--no-baselines", "--no-progress"],
]


@pytest.mark.parametrize("argv", DIGITS_ONLY, ids=lambda argv: argv[0])
def test_digits_only_commands_refuse_the_video_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    out = tmp_path / "out"
    assert main([*argv, "--model", "video", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"hicache: error: hicache {argv[0]} runs on the digits model only" in err
    assert "hicache bench --model video" in err
    assert not out.exists()


@pytest.mark.parametrize("argv", DIGITS_ONLY[:2], ids=lambda argv: argv[0])
def test_digits_only_commands_refuse_a_video_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], weights_files: dict[str, Path], argv: list[str]
) -> None:
    out = tmp_path / "out"
    assert main([*argv, "--model", str(weights_files["video"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "hicache: error: " in err and "holds the video DiT" in err and "not the digits model's weights" in err
