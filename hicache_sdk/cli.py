"""The ``hicache`` command line: ``bench``, ``compare``, ``run``, ``plugins`` and ``trajectory``."""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .basis import MAX_SUPPORTED_ORDER
from .errors import HicacheError, InvalidParameterError, PluginLoadWarning, did_you_mean
from .validation import check_int

__all__ = ["build_parser", "main"]

PROG = "hicache"


_TASK_NAMES = ("digits", "video")
"""``hicache bench --task`` choices: the names of :data:`hicache_sdk.bench.tasks.TASKS` (a test keeps them equal)."""
_DIGITS_MODEL_HELP = (
    "'digits' or a digits-DiT weights file (default: the shipped one; see hicache_sdk.models.train; "
    "the video model runs in hicache bench only)"
)


class _Parser(argparse.ArgumentParser):
    """argparse with every usage error reported as ``hicache: error: ...`` (exit status 2), sub-commands too."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{PROG}: error: {message}\n")


def _common(parser: argparse.ArgumentParser, *, out: str, steps: int = 50, model: bool = True) -> None:
    parser.add_argument("--steps", type=int, default=steps, help="denoising steps (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="first sample seed (default %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default %(default)s)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="model dtype (default %(default)s)",
    )
    parser.add_argument("--out", type=Path, default=Path(out), help="output folder (default %(default)s)")
    if model:
        parser.add_argument("--model", help=_DIGITS_MODEL_HELP)


def _setting_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--interval", type=int, help="N: full step every N steps")
    parser.add_argument("--warmup", type=int, help="W: leading full steps")
    parser.add_argument("--max-order", type=int, help="m: highest finite-difference order")
    parser.add_argument("--sigma", type=float, help="sigma of the hermite/scaled_taylor bases")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one sub-command per job)."""
    parser = _Parser(prog=PROG, description="Feature caching for diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench = sub.add_parser(
        "bench",
        help="speed and fidelity of every method on an embedded model, digits or video (the main job)",
        description="Run every method on an embedded model against full compute and write bench.json, bench.md, "
        "the samples (samples.png; for the video model the animated samples.gif: rows are methods, columns "
        "clips) and speed_vs_error.png.",
    )
    _common(bench, out="hicache-report", model=False)
    bench.add_argument(
        "--model",
        help="'digits' (default), 'video', or a weights file of either (its task is read from the file; see "
        "hicache_sdk.models.train and hicache_sdk.models.train_video)",
    )
    bench.add_argument(
        "--task",
        choices=_TASK_NAMES,
        help="the model the bench must run; a --model file of the other model is refused (default: --model's)",
    )
    bench.add_argument(
        "--frames", type=int, help="clip length: must be the video model's (8 for the shipped one); checked only"
    )
    bench.add_argument(
        "--size",
        type=int,
        help="image or frame side in pixels: must be the model's (32 for both shipped); checked only",
    )
    bench.add_argument(
        "--methods",
        nargs="+",
        metavar="METHOD",
        help="'full' or policy[+basis][:key=value,...] (default: full, fora, taylorseer, taylorseer+hermite, "
        "clusca, clusca+hermite, taylorseer+newton, first_block, easycache, speca, speca+hermite, pab)",
    )
    _setting_flags(bench)
    bench.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats (default %(default)s)")
    bench.add_argument("--seeds-per-digit", type=int, help="samples per digit (default 2 for digits, 1 clip for video)")
    bench.add_argument("--digits", type=int, nargs="+", default=list(range(10)), help="digits to draw (default 0-9)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")

    compare = sub.add_parser(
        "compare", help="this SDK beside diffusers' caches and cache-dit: fidelity, speed, memory, overhead, compile"
    )
    _common(compare, out="hicache-compare")
    compare.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats (default %(default)s)")
    compare.add_argument("--seeds-per-digit", type=int, default=3, help="samples per digit (default %(default)s)")
    compare.add_argument("--digits", type=int, nargs="+", default=list(range(10)), help="digits to draw (default 0-9)")
    compare.add_argument(
        "--targets", nargs="+", default=None, metavar="NAME", help="speedup targets (default: 2x 3.5x 5.5x)"
    )
    compare.add_argument(
        "--methods", nargs="+", default=None, metavar="METHOD", help="this SDK's methods (default: all five)"
    )
    for flag, library, values in (
        ("--first-block-thresholds", "diffusers' First Block Cache", "0.05 0.2"),
        ("--mag-thresholds", "diffusers' MagCache", "0.06 0.15"),
        ("--cache-dit-thresholds", "cache-dit's DBCache", "0.08 0.25"),
    ):
        compare.add_argument(flag, type=float, nargs="+", help=f"{library} thresholds, one row each (default {values})")
    compare.add_argument(
        "--baselines",
        choices=("all", "taylorseer"),
        default="all",
        help="other libraries' rows: all, or diffusers' matched TaylorSeer only (default %(default)s)",
    )
    compare.add_argument("--no-overhead", action="store_true", help="skip the SDK overhead measurements")
    compare.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurements")
    compare.add_argument(
        "--compile-steps", type=int, default=20, help="steps of the compile runs (default %(default)s)"
    )
    compare.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default %(default)s)")
    compare.add_argument("--no-progress", action="store_true", help="no progress bar")

    _frontier_parser(sub)

    run = sub.add_parser("run", help="generate digits with one method, save PNGs, print its summary")
    _common(run, out="hicache-run")
    run.add_argument("--policy", default="taylorseer", help="registered policy (default %(default)s)")
    run.add_argument("--basis", default="taylor", help="registered basis (default %(default)s)")
    run.add_argument("--digit", type=int, nargs="+", default=[3], help="digit(s) to draw (default 3)")
    run.add_argument("--samples", type=int, default=1, help="samples per digit (default %(default)s)")
    _setting_flags(run)
    run.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="any other parameter")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    sub.add_parser("plugins", help="registered bases, policies and adapters with their distributions")

    traj = sub.add_parser("trajectory", help="PC1 of one unit's feature across steps: truth vs taylor vs hermite")
    _common(traj, out="hicache-trajectory")
    traj.add_argument("--unit", default="transformer_blocks.1.attn", help="unit key (default %(default)s)")
    traj.add_argument("--digit", type=int, default=3, help="digit (default %(default)s)")
    traj.add_argument("--policy", default="taylorseer", help="policy of the forecasts (default %(default)s)")
    _setting_flags(traj)
    return parser


#: ``hicache frontier``'s other libraries' series (``hicache_sdk.bench.frontier.BASELINE_SWEEP``)
FRONTIER_BASELINES = ("diffusers-first-block", "diffusers-magcache", "diffusers-taylorseer", "cache-dit")
#: ``hicache frontier``'s sample settings: the default sweep's, and ``--quick``'s
_FRONTIER_DEFAULTS = {"steps": 50, "digits": list(range(10)), "seeds_per_digit": 1, "repeats": 3}
_FRONTIER_QUICK = {"steps": 20, "digits": [3, 8], "seeds_per_digit": 1, "repeats": 2}


def _frontier_parser(sub: Any) -> None:
    frontier = sub.add_parser(
        "frontier",
        help="error against FLOPs and wall speedup: each policy x basis swept over its speed knob, beside "
        "diffusers' and cache-dit's caches",
        description="Sweep each policy x basis over its speed knob (interval N, or threshold) on the embedded model, "
        "beside diffusers' First Block Cache, MagCache and TaylorSeer and cache-dit's DBCache + TaylorSeer, "
        "and write frontier.json, frontier.md and frontier.png (rel. L2 against counted FLOPs speedup and against "
        "wall speedup). Cost: every point is one FLOP-counting generation plus one per repeat. The default sweep "
        "(fora and pab; taylorseer, clusca, first_block, easycache and speca with the taylor, hermite and newton "
        "bases; 4 knob values each; 16 points of the other libraries; 50 steps, 10 samples, 3 repeats) is 85 "
        "points x 4 generations: 45 minutes on a 2-core x86_64 CPU shared with other jobs (load 4 to 8), less "
        "on an idle one. --quick (taylor basis only, 2 values per series, 20 steps, 2 samples, 2 repeats: 23 "
        "points) is a smoke test: 66 s on the idle 2-core CPU, 15 minutes beside other jobs.",
    )
    frontier.add_argument("--steps", type=int, help="denoising steps (default 50; 20 with --quick)")
    frontier.add_argument("--seed", type=int, default=0, help="first sample seed (default %(default)s)")
    frontier.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default %(default)s)")
    frontier.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    frontier.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="model dtype (default %(default)s)",
    )
    frontier.add_argument(
        "--out", type=Path, default=Path("hicache-frontier"), help="output folder (default %(default)s)"
    )
    frontier.add_argument("--model", help=_DIGITS_MODEL_HELP)
    frontier.add_argument("--repeats", type=int, help="interleaved timing repeats (default 3; 2 with --quick)")
    frontier.add_argument("--seeds-per-digit", type=int, help="samples per digit (default 1; 1 with --quick)")
    frontier.add_argument("--digits", type=int, nargs="+", help="digits to draw (default 0-9; 3 8 with --quick)")
    frontier.add_argument(
        "--policies",
        nargs="+",
        metavar="POLICY",
        help="this SDK's policies to sweep (default: fora, taylorseer, clusca, first_block, easycache, speca, pab; "
        "those not registered are skipped with a note)",
    )
    frontier.add_argument(
        "--bases",
        nargs="+",
        metavar="BASIS",
        help="bases of the policies that forecast (default: taylor hermite newton; taylor with --quick); "
        "policies that only reuse (fora, pab at m = 0) run once",
    )
    frontier.add_argument(
        "--knob-values",
        nargs="+",
        default=[],
        metavar="NAME=V1,V2",
        help="knob values of a policy or baseline instead of the defaults, e.g. taylorseer=3,5,8 "
        "diffusers-magcache=0.1,0.3",
    )
    others = frontier.add_mutually_exclusive_group()
    others.add_argument(
        "--baselines",
        nargs="+",
        choices=FRONTIER_BASELINES,
        metavar="NAME",
        help=f"other libraries' series to run (default: all of {', '.join(FRONTIER_BASELINES)})",
    )
    others.add_argument("--no-baselines", action="store_true", help="no other libraries' series")
    frontier.add_argument("--quick", action="store_true", help="2 values per series and few samples (tests, CI)")
    frontier.add_argument("--no-progress", action="store_true", help="no progress bar")


#: integer options: smallest and largest accepted value (None: no bound)
_INT_OPTIONS: dict[str, tuple[int, int | None]] = {
    "steps": (1, 2**31 - 1),
    "threads": (1, None),
    "repeats": (1, None),
    "seeds_per_digit": (1, None),
    "samples": (1, None),
    "compile_steps": (1, 2**31 - 1),
    "frames": (1, None),
    "size": (1, None),
    "interval": (1, None),
    "warmup": (0, None),
    "max_order": (0, MAX_SUPPORTED_ORDER),
}
#: digit options (a list, or one digit)
_DIGIT_OPTIONS = ("digits", "digit")
#: real options (each a number or a list of them) that must be finite and > 0
_POSITIVE_OPTIONS = ("sigma", "first_block_thresholds", "mag_thresholds", "cache_dit_thresholds")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _seed_span(args: argparse.Namespace) -> int:
    """How many consecutive seeds from ``--seed`` the command uses."""
    if args.command == "compare":  # MagCache calibration draws seed + 1000 + i, one per digit
        return max(args.seeds_per_digit, 1000 + len(args.digits))
    if args.command == "bench" and args.seeds_per_digit is None:  # the task's default
        from .bench.tasks import TASKS

        return max(task.seeds_per_digit for task in TASKS.values())
    return int(getattr(args, "seeds_per_digit", None) or getattr(args, "samples", None) or 1)


def _check_device(text: str) -> None:
    """A torch device this machine has: ``cpu``, ``cuda``/``cuda:N`` with CUDA available, or ``mps``."""
    import torch

    expected = "expected cpu, cuda, cuda:N or mps"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise InvalidParameterError(f"--device {text!r} is not a torch device ({expected})") from exc
    if device.type == "cpu" and device.index is None:
        return
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None
            why = "no CUDA device is visible" if built else "this torch build has no CUDA support"
            raise InvalidParameterError(
                f"--device {text!r}: CUDA is not available ({why}; torch {torch.__version__}); use --device cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise InvalidParameterError(f"--device {text!r}: this machine has {count} CUDA device(s)")
        return
    if device.type == "mps" and device.index is None:
        if not torch.backends.mps.is_available():
            raise InvalidParameterError(f"--device {text!r}: MPS is not available on this machine; use --device cpu")
        return
    raise InvalidParameterError(f"--device {text!r} is not supported ({expected})")


def _check_compile_backend(name: str) -> None:
    import torch

    known = torch.compiler.list_backends(exclude_tags=None)  # debug and experimental ones too
    if name not in known:
        common = sorted({*torch.compiler.list_backends(), "eager", "aot_eager"})
        raise InvalidParameterError(
            f"--compile-backend {name!r} is not a torch.compile backend (e.g. {', '.join(common)})."
            f"{did_you_mean(name, known)}"
        )


def _check_args(args: argparse.Namespace) -> None:
    """Refuse bad option values before any work, each error naming the option as the user typed it."""
    for name, (low, high) in _INT_OPTIONS.items():
        value = getattr(args, name, None)
        if value is not None:
            check_int(_flag(name), value, minimum=low, maximum=high)
    for name in _DIGIT_OPTIONS:
        value = getattr(args, name, None)
        if value is None:
            continue
        bad = [d for d in (value if isinstance(value, list) else [value]) if not 0 <= d <= 9]
        if bad:
            raise InvalidParameterError(
                f"{_flag(name)} must be in 0..9, got {bad if isinstance(value, list) else bad[0]}"
            )
    for name in _POSITIVE_OPTIONS:
        value = getattr(args, name, None)
        for number in [] if value is None else value if isinstance(value, list) else [value]:
            if not (math.isfinite(number) and number > 0):
                raise InvalidParameterError(f"{_flag(name)} must be a finite number > 0, got {number}")
    if getattr(args, "seed", None) is not None:
        check_int("--seed", args.seed, minimum=0, maximum=2**63 - _seed_span(args))
    if getattr(args, "device", None) is not None:
        _check_device(args.device)
    if args.command == "compare" and not args.no_compile:
        _check_compile_backend(args.compile_backend)


def _settings(args: argparse.Namespace, defaults: dict[str, Any]) -> dict[str, Any]:
    values = dict(defaults)
    for name in ("interval", "warmup", "max_order", "sigma"):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    return values


def _load_model(args: argparse.Namespace) -> Any:
    """The digits model of ``--model`` (``compare``, ``frontier``, ``run``, ``trajectory``: digits only)."""
    import torch

    from .bench.tasks import resolve_model
    from .models import load_digits_model

    if args.model is not None and str(args.model) == "video":
        raise InvalidParameterError(
            f"hicache {args.command} runs on the digits model only; the video model runs in hicache bench --model video"
        )
    _, path = resolve_model(args.model, "digits")
    return load_digits_model(path, device=args.device, dtype=getattr(torch, args.dtype))


def _load_bench_model(args: argparse.Namespace) -> tuple[Any, str]:
    """``hicache bench``'s model and task name from ``--model`` / ``--task``, its clip shape checked."""
    import torch

    from .bench.tasks import resolve_model

    task, path = resolve_model(args.model, args.task)
    model = task.load_model(path, device=args.device, dtype=getattr(torch, args.dtype))
    task.check_shape(model, args.frames, args.size)
    return model, task.name


def _bench_settings(args: argparse.Namespace, **fields: Any) -> Any:
    """The samples, repeats and placement shared by ``bench`` and ``compare``."""
    from .bench.runner import BenchSettings

    return BenchSettings(
        steps=args.steps,
        digits=tuple(args.digits),
        seeds_per_digit=args.seeds_per_digit,
        seed=args.seed,
        repeats=args.repeats,
        device=args.device,
        dtype=args.dtype,
        **fields,
    )


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="run", file=sys.stderr)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench.methods import BENCH_METHODS, PAPER_SETTING, parse_methods
    from .bench.report import check_writable, markdown_table, wall_check, write_report
    from .bench.runner import check_settings, run_bench
    from .bench.tasks import get_task

    specs = parse_methods(args.methods or BENCH_METHODS)
    model, task = _load_bench_model(args)
    if args.seeds_per_digit is None:
        args.seeds_per_digit = get_task(task).seeds_per_digit
    settings = _bench_settings(args, methods=tuple(specs), shared=_settings(args, dict(PAPER_SETTING)), task=task)
    check_settings(settings)
    check_writable(args.out)
    runs = settings.repeats * (len(specs) + (0 if any(s.is_full for s in specs) else 1))
    with _progress_bar(runs, not args.no_progress) as bar:
        started = [0]

        def step(label: str) -> None:
            if started[0]:
                bar.update()
            started[0] += 1
            bar.set_description(label)

        report = run_bench(settings, model=model, progress=step)
        bar.update()
    files = write_report(report, args.out)
    print(f"{report.machine}; {task} model; {settings.steps} steps; shared setting {dict(settings.shared)}")
    print(f"{settings.repeats} interleaved repeats; repeats bit-identical: {report.deterministic}")
    print(markdown_table(report.results))
    print(wall_check(report.results)[1])
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def _compare_command(args: argparse.Namespace, settings: Any) -> list[str]:
    """The ``hicache compare`` command line that reproduces this run's rows."""
    words = ["hicache", "compare", "--steps", str(settings.steps), "--digits", *map(str, settings.digits)]
    words += ["--seeds-per-digit", str(settings.seeds_per_digit), "--repeats", str(settings.repeats)]
    words += ["--seed", str(settings.seed)]
    for flag in ("targets", "methods", "first_block_thresholds", "mag_thresholds", "cache_dit_thresholds"):
        if getattr(args, flag) is not None:
            words += ["--" + flag.replace("_", "-"), *map(str, getattr(args, flag))]
    if args.baselines != "all":
        words += ["--baselines", args.baselines]
    words += [flag for flag in ("--no-overhead", "--no-compile") if getattr(args, flag[2:].replace("-", "_"))]
    return words


def _cmd_compare(args: argparse.Namespace) -> int:
    from .bench.compare import calibrate, default_rows, run_compare
    from .bench.compare_extras import compile_section, overhead_section
    from .bench.compare_report import compare_markdown, write_compare
    from .bench.report import check_writable
    from .bench.rows import SDK_METHODS, TARGETS
    from .bench.runner import check_settings

    settings = _bench_settings(args, methods=())
    check_settings(settings)
    targets = {t.name: t for t in TARGETS}
    unknown = [t for t in args.targets or () if t not in targets]
    if unknown:
        raise InvalidParameterError(f"unknown targets {unknown}: expected some of {list(targets)}")
    chosen = [targets[t] for t in args.targets] if args.targets else list(TARGETS)
    too_long = [t.name for t in chosen if t.interval > settings.steps]
    if too_long:
        raise InvalidParameterError(f"targets {too_long} need more than the {settings.steps} steps")
    model = _load_model(args)  # a bad --model fails before the output folder is made
    check_writable(args.out)
    ratios = calibrate(model, settings) if args.baselines == "all" else []
    rows = default_rows(
        model,
        settings,
        targets=chosen,
        methods=args.methods or SDK_METHODS,
        mag_ratios=ratios,
        baselines=args.baselines,
        **{
            name: tuple(getattr(args, name))
            for name in ("first_block_thresholds", "mag_thresholds", "cache_dit_thresholds")
            if getattr(args, name) is not None
        },
    )
    with _progress_bar(len(rows) * (settings.repeats + 1), not args.no_progress) as bar:

        def step(label: str) -> None:
            bar.update()
            bar.set_description(label[:40])

        report = run_compare(settings, rows, model=model, progress=step, mag_ratios=ratios)
    extras: dict[str, Any] = {}
    overhead = compiled = None
    if not args.no_overhead:
        overhead, extras["overhead"] = overhead_section(model, settings, chosen[-1])
    if not args.no_compile:
        compiled, extras["compile"] = compile_section(
            model, settings, chosen[-1], steps=args.compile_steps, backend=args.compile_backend
        )
    command = " ".join(_compare_command(args, settings))
    markdown = compare_markdown(report, command=command, overhead=overhead, compiled=compiled)
    files = write_compare(report, markdown, args.out, extras)
    print(markdown)
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def _frontier_command(args: argparse.Namespace, settings: Any) -> list[str]:
    """The ``hicache frontier`` command line that reproduces this run's points."""
    words = ["hicache", "frontier", "--steps", str(settings.steps), "--digits", *map(str, settings.digits)]
    words += ["--seeds-per-digit", str(settings.seeds_per_digit), "--repeats", str(settings.repeats)]
    words += ["--seed", str(settings.seed)]
    for flag in ("policies", "bases", "knob_values", "baselines"):
        if getattr(args, flag):
            words += ["--" + flag.replace("_", "-"), *getattr(args, flag)]
    words += [flag for flag in ("--no-baselines", "--quick") if getattr(args, flag[2:].replace("-", "_"))]
    return words


def _cmd_frontier(args: argparse.Namespace) -> int:
    from .bench.frontier import frontier_table, parse_knob_values, plan_sweep, run_frontier, write_frontier
    from .bench.report import check_writable
    from .bench.runner import check_settings

    for name, value in (_FRONTIER_QUICK if args.quick else _FRONTIER_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    settings = _bench_settings(args, methods=())
    check_settings(settings)
    baselines = [] if args.no_baselines else list(args.baselines or FRONTIER_BASELINES)
    series, notes = plan_sweep(
        policies=args.policies,
        bases=args.bases,
        knob_values=parse_knob_values(args.knob_values),
        baselines=baselines,
        quick=args.quick,
        steps=settings.steps,
    )
    if "diffusers-magcache" in baselines:  # its calibration draws seeds seed + 1000 + i, one per digit
        check_int("--seed", args.seed, minimum=0, maximum=2**63 - 1000 - len(settings.digits))
    model = _load_model(args)  # a bad --model fails before the output folder is made
    check_writable(args.out)
    for note in notes:
        print(note)
    points = 1 + sum(len(s.values) for s in series)
    digits, _ = settings.samples()
    print(
        f"frontier: {points} points (full compute included) x {settings.repeats + 1} generations "
        f"({settings.steps} steps, {len(digits)} samples)"
    )
    total = points * (settings.repeats + 1) + int("diffusers-magcache" in baselines)
    with _progress_bar(total, not args.no_progress) as bar:

        def step(label: str) -> None:
            bar.update()
            bar.set_description(label[:40])

        report = run_frontier(settings, series, model=model, progress=step, notes=notes)
    command = " ".join(_frontier_command(args, settings))
    files = write_frontier(report, args.out, command=command)
    print(frontier_table(report.points))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .accelerator import compose
    from .bench.methods import parse_params
    from .bench.report import check_writable
    from .models import sample

    params = _settings(args, {})
    params.update(parse_params(args.param))
    accelerator = compose(args.policy, basis=args.basis, **params)
    model = _load_model(args)  # a bad --model fails before the output folder is made
    check_writable(args.out)
    digits = [d for d in args.digit for _ in range(args.samples)]
    seeds = [args.seed + j for _ in args.digit for j in range(args.samples)]
    with accelerator.apply(model.transformer) as handle:
        images = sample(
            model,
            digits,
            seeds,
            steps=args.steps,
            device=args.device,
            dtype=model.transformer.dtype,
            progress=not args.no_progress,
        )
        summary = handle.summary()
    from PIL import Image

    for image, digit, seed in zip(images, digits, seeds, strict=True):
        pixels = (image[0].float().cpu().numpy() * 255).round().astype("uint8")
        Image.fromarray(pixels, mode="L").resize((128, 128), Image.Resampling.NEAREST).save(
            args.out / f"digit{digit}_seed{seed}.png"
        )
    print(summary)
    print(f"wrote {len(digits)} PNGs to {args.out}")
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from . import list_plugin_problems, list_plugins

    rows = [(r.kind, r.name, r.plugin, r.distribution) for r in list_plugins()]
    widths = [max(len(str(row[i])) for row in [("kind", "name", "plugin", "distribution"), *rows]) for i in range(4)]
    for row in [("kind", "name", "plugin", "distribution"), *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    problems = list_plugin_problems()
    if problems:
        print(f"\nnot loaded ({len(problems)}; HICACHE_STRICT_PLUGINS=1 makes this an error):")
        for problem in problems:
            print(f"  {problem}")
    return 0


def _cmd_trajectory(args: argparse.Namespace) -> int:

    from .bench.methods import PAPER_SETTING
    from .bench.report import check_writable
    from .bench.trajectory import record_unit, save_trajectory_plot

    model = _load_model(args)  # a bad --model fails before the output folder is made
    check_writable(args.out)
    setting = _settings(args, dict(PAPER_SETTING))
    schedule = {k: v for k, v in setting.items() if k != "sigma"}
    common = {"unit": args.unit, "digit": args.digit, "seed": args.seed, "steps": args.steps}
    truth, _ = record_unit(model, policy="fora", basis="taylor", params={"interval": 1}, **common)
    runs = {
        name: record_unit(model, policy=args.policy, basis=name, params=params, **common)
        for name, params in (("taylor", schedule), ("hermite", {**schedule, "sigma": setting["sigma"]}))
    }
    path = args.out / "trajectory.png"
    title = f"{args.unit}, digit {args.digit}, {args.policy} N={setting['interval']} m={setting['max_order']}"
    save_trajectory_plot(truth, runs, title, path)
    for name, (feats, _) in runs.items():
        err = float((feats - truth).norm() / truth.norm())
        print(f"{name}: relative L2 of the unit trajectory against truth {err:.4f}")
    print(f"wrote {path}")
    return 0


_COMMANDS = {
    "bench": _cmd_bench,
    "compare": _cmd_compare,
    "frontier": _cmd_frontier,
    "run": _cmd_run,
    "plugins": _cmd_plugins,
    "trajectory": _cmd_trajectory,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hicache`` and ``python -m hicache_sdk``; returns the exit status.

    A bad option value, a bad weights file or a model that draws no digits prints
    ``hicache: error: ...`` on stderr and returns 2; argparse's own usage errors (an unknown option,
    a value that is not a number) exit with status 2 and the same prefix.
    """
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning(warnings.showwarning)
        try:
            _check_args(args)
            if getattr(args, "threads", None) is not None:
                import torch

                torch.set_num_threads(args.threads)
            return _COMMANDS[args.command](args)
        except (HicacheError, KeyError, ValueError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            print(f"hicache: error: {message}", file=sys.stderr)
            return 2


def _show_warning(fallback: Any) -> Any:
    """``warnings.showwarning`` that prints a plugin that failed to load as ``hicache: warning: ...``."""

    def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, PluginLoadWarning):
            print(f"hicache: warning: {message}", file=sys.stderr)
        else:
            fallback(message, category, *args, **kwargs)

    return show
