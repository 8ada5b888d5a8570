"""Mutation check: plant known bugs one at a time in a copy of the repository and run the tests named for each.

Run from anywhere::

    .venv/bin/python tests/mutation_check.py            # every mutant; a table and the score
    .venv/bin/python tests/mutation_check.py --list     # the mutants, without running anything
    .venv/bin/python tests/mutation_check.py --only clustering-l2 ladder-bf16-accumulation

Each mutant is a file, an exact source snippet (found exactly once), its replacement and the test
files to run. The working tree's tracked and untracked-but-not-ignored files are copied to a
temporary directory (the repository itself is never edited); the ``package-dir`` mapping of
``pyproject.toml`` (``plugins/`` installed as ``hicache_sdk.plugins``...) is recreated there with
symbolic links, and the tests run with ``PYTHONPATH`` set to the copy, which is checked to be what
``import hicache_sdk`` and its plugins resolve to (not the editable install of the working tree).

The test files are first run on the unmodified copy: a test failing there is not counted as
catching a mutant (so the check still measures something while other work leaves a test red).
A mutant is *caught* when a test that passed on the unmodified copy fails with it; it *survives*
when none does. A snippet no longer found (the code moved) is reported as a *stale mutant*:
update its snippet. The exit status is 0 only when every mutant was caught.

This file is not a test module (pytest collects ``test_*.py`` only); it is run on demand.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
__test__ = False  # a script, not a test module (its name keeps pytest away too)


@dataclass(frozen=True)
class Mutant:
    """One planted bug: ``snippet`` in ``path`` becomes ``replacement``; ``tests`` should catch it."""

    name: str
    path: str
    snippet: str
    replacement: str
    tests: tuple[str, ...]
    what: str


MUTANTS: tuple[Mutant, ...] = (
    # -- the five survivors of the first measurement ---------------------------------------------
    Mutant(
        "finite-first-output-only",
        "hicache_sdk/runtime.py",
        "return all(bool(torch.isfinite(t.sum(dtype=torch.float32))) for t in tensors)",
        "return bool(torch.isfinite(tensors[0].sum(dtype=torch.float32)))",
        ("tests/test_behaviour_finite_check.py", "tests/test_policies.py"),
        "the non-finite check reads only a unit's first output",
    ),
    Mutant(
        "clustering-l2",
        "hicache_sdk/clustering.py",
        "torch.cdist(x, centroids, p=1)",
        "torch.cdist(x, centroids, p=2)",
        ("tests/test_behaviour_clusca.py", "tests/test_policies.py"),
        "k-means assigns tokens by L2 instead of L1 distance",
    ),
    Mutant(
        "ladder-bf16-accumulation",
        "hicache_sdk/ladder.py",
        "compute_dtype = torch.promote_types(dtype, torch.float32)",
        "compute_dtype = dtype",
        ("tests/test_ladder.py", "tests/test_behaviour_low_precision.py"),
        "the weighted sum accumulates in the feature dtype (bf16) instead of float32",
    ),
    Mutant(
        "bench-relative-l1",
        "hicache_sdk/bench/metrics.py",
        "(sample.double() - reference.double()).norm() / reference.double().norm()",
        "(sample.double() - reference.double()).abs().sum() / reference.double().abs().sum()",
        ("tests/test_metrics.py",),
        "the bench's rel. L2 is computed as a relative L1",
    ),
    Mutant(
        "generation-on-equal-level",
        "hicache_sdk/runtime.py",
        "level > ctx.last_level",
        "level >= ctx.last_level",
        ("tests/test_generation_lifecycle.py", "tests/test_contexts.py"),
        "an equal noise level starts a new generation",
    ),
    # -- bugs the suite caught before: kept to measure again after each interface change -----------
    Mutant(
        "ladder-unit-spacing",
        "hicache_sdk/ladder.py",
        "spacing = float(step - self._last_step)",
        "spacing = 1.0",
        ("tests/test_ladder.py",),
        "the ladder divides by 1 instead of the real spacing between anchors",
    ),
    Mutant(
        "ladder-in-place-alpha",
        "hicache_sdk/ladder.py",
        "terms[j].sub_(terms[i], alpha=spacing**i)",
        "terms[j].sub_(terms[i], alpha=spacing)",
        ("tests/test_ladder.py",),
        "the in-place update unrolls the recurrence with the wrong power of the spacing",
    ),
    Mutant(
        "hermite-sigma-power",
        "plugins/bases.py",
        "self.sigma**i * h[i] / math.factorial(i)",
        "self.sigma * h[i] / math.factorial(i)",
        ("tests/test_bases.py",),
        "hermite scales the coefficients by sigma instead of sigma^i",
    ),
    Mutant(
        "newton-shift",
        "plugins/bases.py",
        "weights[-1] * (offset + (i - 1) * spacing) / i",
        "weights[-1] * (offset + i * spacing) / i",
        ("tests/test_bases.py",),
        "newton's weights shifted by one spacing",
    ),
    Mutant(
        "schedule-offset",
        "hicache_sdk/schedule.py",
        "return step < first or (step - (first - 1)) % interval == 0",
        "return step < first or (step - first) % interval == 0",
        ("tests/test_schedule.py",),
        "the reference schedule's full steps offset by one",
    ),
    Mutant(
        "warmup-rule-off-by-one",
        "hicache_sdk/policy.py",
        "ctx.step >= self.config.warmup - 1",
        "ctx.step >= self.config.warmup",
        ("tests/test_policies.py", "tests/test_behaviour_clusca.py"),
        "higher orders start one anchor late after warm-up",
    ),
    Mutant(
        "fora-order-one",
        "hicache_sdk/policy.py",
        'return int(getattr(self.config, "max_order", 0))',
        'return int(getattr(self.config, "max_order", 1))',
        ("tests/test_policies.py",),
        "FORA keeps a first-order ladder instead of plain reuse",
    ),
    Mutant(
        "clusca-gamma-complement",
        "plugins/clusca.py",
        "d0.lerp_(per_token, self.config.gamma)",
        "d0.lerp_(per_token, 1.0 - self.config.gamma)",
        ("tests/test_policies.py", "tests/test_behaviour_clusca.py"),
        "ClusCa propagates with weight 1 - gamma",
    ),
    Mutant(
        "clusca-token-outside-cluster",
        "hicache_sdk/clustering.py",
        "return torch.where(member, scores[:, None, :], -1.0).argmax(dim=-1)",
        "return torch.where(member, -1.0, scores[:, None, :]).argmax(dim=-1)",
        ("tests/test_policies.py", "tests/test_behaviour_clusca.py"),
        "ClusCa recomputes a token drawn outside each cluster",
    ),
    Mutant(
        "clusca-cold-start",
        "plugins/clusca.py",
        "init=state.centroids,",
        "init=None,",
        ("tests/test_policies.py", "tests/test_behaviour_clusca.py"),
        "k-means restarts from random tokens at every full step instead of the previous centroids",
    ),
    Mutant(
        "clusca-last-block-only",
        "plugins/clusca.py",
        "if block_index != chosen % num_blocks:",
        "if block_index != num_blocks - 1:",
        ("tests/test_policies.py", "tests/test_behaviour_clusca.py"),
        "ClusCa clusters the last block whatever cluster_block says",
    ),
    Mutant(
        "fallback-keeps-ladder",
        "hicache_sdk/runtime.py",
        "                ladder.reset()",
        "                pass",
        ("tests/test_policies.py",),
        "a fallback does not restart the unit's ladder",
    ),
    Mutant(
        "fallback-counted-as-computed",
        "hicache_sdk/runtime.py",
        "        if not fallback:\n            state.counts.computed += 1",
        "        if fallback or not fallback:\n            state.counts.computed += 1",
        ("tests/test_policies.py", "tests/test_behaviour_finite_check.py"),
        "a fallback is also counted as a computed step",
    ),
    Mutant(
        "summary-cache-bytes-one-context",
        "hicache_sdk/summary.py",
        "cache_bytes=sum(c.nbytes for c in contexts)",
        "cache_bytes=max((c.nbytes for c in contexts), default=0)",
        ("tests/test_contexts.py", "tests/test_compose.py"),
        "the summary's cache bytes count one context only",
    ),
    Mutant(
        "summary-units-last-context",
        "hicache_sdk/summary.py",
        "acc[i] += v",
        "acc[i] = v",
        ("tests/test_contexts.py", "tests/test_pipeline.py"),
        "per-unit counts keep the last context instead of the sum over contexts",
    ),
    # -- the hardening issue's root causes -------------------------------------------------------
    Mutant(
        "failed-step-keeps-generation",
        "hicache_sdk/runtime.py",
        "        self._signature = None\n        self.end_generation()",
        "        self._signature = None",
        ("tests/test_generation_lifecycle.py",),
        "a forward that raises leaves its generation open for the next call",
    ),
    Mutant(
        "diffusers-schedule-reference-ladder",
        "hicache_sdk/policy.py",
        'extend = self.config.schedule == "diffusers" or ctx.step >= self.config.warmup - 1',
        "extend = ctx.step >= self.config.warmup - 1",
        ("tests/test_schedule_diffusers.py",),
        "schedule='diffusers' restarts the ladder during warm-up as the reference code does",
    ),
    Mutant(
        "tail-ignored",
        "hicache_sdk/policy.py",
        "        return step >= total_steps - tail",
        "        return False",
        ("tests/test_generation_lifecycle.py",),
        "the always-full tail computes nothing",
    ),
    Mutant(
        "second-cache-unchecked",
        "hicache_sdk/coexistence.py",
        "    found = other_caches(model)\n    if found:",
        "    found = other_caches(model)\n    if False:",
        ("tests/test_coexistence.py",),
        "another feature cache on the model is not refused",
    ),
    Mutant(
        "broken-plugin-fatal",
        "hicache_sdk/registry.py",
        "                    plugin = ep.load()\n                except Exception as exc:",
        "                    plugin = ep.load()\n                except ZeroDivisionError as exc:",
        ("tests/test_registry.py",),
        "a third-party plugin that fails to import takes every call down",
    ),
    Mutant(
        "forecast-layout-unchecked",
        "hicache_sdk/runtime.py",
        "        if got != state.layout:",
        "        if len(got) != len(state.layout):",
        ("tests/test_api_errors.py",),
        "a forecast of the wrong shape, dtype or device is broadcast into the model",
    ),
    # -- the decision API: per-sample masks, rejected drafts, dynamic policies --------------------
    Mutant(
        "mask-of-one-kind-runs-a-sub-batch",
        "hicache_sdk/runtime.py",
        "                rows = None\n",
        "",
        ("tests/test_policy_contract.py",),
        "a per-sample mask whose samples all agree still runs a (possibly empty) sub-batch",
    ),
    Mutant(
        "rejected-draft-not-charged",
        "hicache_sdk/runtime.py",
        "ctx.flops_overhead += total - saved  # what the draft forward executed",
        "ctx.flops_overhead += 0.0",
        ("tests/test_dynamic_policies.py",),
        "a rejected draft's work is not charged against the savings",
    ),
    Mutant(
        "sample-ladders-share-the-anchor-step",
        "hicache_sdk/ladder.py",
        "weights = basis.weights(step - last, size - 1, spacing or 1.0)",
        "weights = basis.weights(step - self._last_step, size - 1, spacing or 1.0)",
        ("tests/test_dynamic_policies.py",),
        "samples anchored at different steps are all forecast from the newest anchor's step",
    ),
    Mutant(
        "first-block-reference-follows-every-step",
        "plugins/first_block.py",
        "            state.decision = Decision.FORECAST\n            state.consecutive += 1",
        "            state.decision = Decision.FORECAST\n            state.consecutive += 1\n"
        "            state.reference = residual",
        ("tests/test_dynamic_policies.py",),
        "first_block compares with the previous step's probe instead of the last computed step's",
    ),
    Mutant(
        "guard-ignores-the-step-count",
        "hicache_sdk/policy.py",
        "if c.guard and total_steps is not None and total_steps < c.min_steps:",
        "if False:",
        ("tests/test_dynamic_policies.py",),
        "the few-step guard never fails open",
    ),
    Mutant(
        "speca-verifies-every-block",
        "plugins/speca.py",
        "if state.verifying and unit.block >= 0 and self._is_verifier(unit.block, ctx):",
        "if state.verifying:",
        ("tests/test_dynamic_policies.py",),
        "speca runs every unit as a verifier (no FLOPs saved)",
    ),
    Mutant(
        "pab-ignores-the-unit-kind",
        "plugins/pab.py",
        "if start is None or (ctx.step - start) % self.interval_of(unit.kind) == 0:",
        "if start is None or (ctx.step - start) % self.config.attention_interval == 0:",
        ("tests/test_dynamic_policies.py",),
        "pab broadcasts every unit at the attention interval",
    ),
)


@dataclass
class Outcome:
    mutant: Mutant
    status: str  # "caught", "SURVIVED", "STALE", "AMBIGUOUS"
    detail: str
    seconds: float
    failed: tuple[str, ...] = ()  # the tests that caught it


def repository_files(root: Path) -> list[str]:
    """Tracked files and untracked files that git does not ignore, as they are in the working tree."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout.decode()
    return sorted({name for name in listed.split("\0") if name and (root / name).is_file()})


def make_copy(root: Path, target: Path) -> None:
    """Copy the repository's files into ``target`` and lay out the installed packages there."""
    for name in repository_files(root):
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, destination)
    for package, folder in package_dir(target / "pyproject.toml").items():
        where = target / package.replace(".", "/")
        source = target / folder
        if where.resolve() != source.resolve() and not where.exists():
            where.parent.mkdir(parents=True, exist_ok=True)
            where.symlink_to(os.path.relpath(source, where.parent), target_is_directory=True)


def package_dir(pyproject: Path) -> dict[str, str]:
    """``[tool.setuptools] package-dir`` (an inline table on one line), without a TOML parser (Python 3.10)."""
    line = re.search(r"^package-dir\s*=\s*\{(.*)\}\s*$", pyproject.read_text(), flags=re.MULTILINE)
    return dict(re.findall(r'"([^"]+)"\s*=\s*"([^"]+)"', line.group(1))) if line else {}


def environment(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["CI"] = "true"
    return env


def check_imports(copy: Path) -> None:
    """Fail unless the package and its plugins are imported from the copy."""
    probe = (
        "import json, hicache_sdk, hicache_sdk.plugins.clusca, hicache_sdk.adapters.flux, hicache_sdk.runtime;"
        "print(json.dumps([m.__file__ for m in (hicache_sdk, hicache_sdk.plugins.clusca,"
        " hicache_sdk.adapters.flux, hicache_sdk.runtime)]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=copy, env=environment(copy), capture_output=True, text=True, check=True
    )
    files = json.loads(done.stdout.strip().splitlines()[-1])
    outside = [f for f in files if not Path(os.path.abspath(f)).is_relative_to(copy)]
    if outside:
        raise SystemExit(f"imports do not resolve to the copy {copy}: {outside}")


def run_tests(copy: Path, tests: tuple[str, ...], report: Path, timeout: float) -> tuple[int, set[str], set[str]]:
    """Run ``tests`` in the copy; return the exit status, the failed and the passed test ids."""
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={report}",
        "-o",
        "junit_family=xunit1",
        *tests,
    ]
    try:
        done = subprocess.run(command, cwd=copy, env=environment(copy), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, {"<timeout>"}, set()
    failed: set[str] = set()
    passed: set[str] = set()
    if report.exists():
        for case in ET.parse(report).getroot().iter("testcase"):
            test_id = f"{case.get('file') or case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                failed.add(test_id)
            elif case.find("skipped") is None:
                passed.add(test_id)
        report.unlink()
    if done.returncode not in (0, 1) and not failed:  # collection error, crash: no test ran
        failed.add(f"<pytest exit {done.returncode}: {done.stdout.strip().splitlines()[-1:]}>")
    return done.returncode, failed, passed


def check_mutant(copy: Path, mutant: Mutant, baseline_passed: set[str], timeout: float) -> Outcome:
    path = copy / mutant.path
    source = path.read_text()
    found = source.count(mutant.snippet)
    if found == 0:
        return Outcome(mutant, "STALE", f"stale mutant: snippet not found in {mutant.path}", 0.0)
    if found > 1:
        return Outcome(mutant, "AMBIGUOUS", f"snippet found {found} times in {mutant.path}", 0.0)
    start = time.monotonic()
    path.write_text(source.replace(mutant.snippet, mutant.replacement))
    try:
        _, failed, _ = run_tests(copy, mutant.tests, copy / ".mutation-report.xml", timeout)
    finally:
        path.write_text(source)
    seconds = time.monotonic() - start
    newly = sorted(f for f in failed if f in baseline_passed or f.startswith("<"))
    if newly:
        first = newly[0].split("::", 1)[-1]
        more = f" (+{len(newly) - 1} more)" if len(newly) > 1 else ""
        return Outcome(mutant, "caught", f"{first}{more}", seconds, tuple(newly))
    return Outcome(mutant, "SURVIVED", "no test that passed unmodified failed", seconds)


def print_table(outcomes: list[Outcome]) -> None:
    rows = [("mutant", "file", "result", "by / detail", "s")]
    rows += [(o.mutant.name, o.mutant.path, o.status, o.detail, f"{o.seconds:.0f}") for o in outcomes]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)) + "  " + row[4])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--verbose", action="store_true", help="list every test that caught each mutant")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run (default 900)")
    args = parser.parse_args(argv)

    mutants = list(MUTANTS)
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in MUTANTS})
        if unknown:
            parser.error(f"unknown mutants {unknown}; see --list")
        mutants = [m for m in MUTANTS if m.name in args.only]
    if args.list:
        for m in mutants:
            print(f"{m.name:34} {m.path:30} {m.what}\n{'':34} tests: {' '.join(m.tests)}")
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="hicache-mutants-"))
    copy = workdir / "repo"
    try:
        make_copy(ROOT, copy)
        check_imports(copy)
        tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
        missing = [t for t in tests if not (copy / t).exists()]
        if missing:
            print(f"test files not found: {missing}", file=sys.stderr)
            return 2
        print(f"copy: {copy}\nbaseline: {len(tests)} test files on the unmodified copy...", flush=True)
        _, baseline_failed, baseline_passed = run_tests(copy, tests, copy / ".mutation-report.xml", args.timeout)
        if baseline_failed:
            print(f"note: {len(baseline_failed)} tests fail without any mutant and are not counted:")
            for test_id in sorted(baseline_failed):
                print(f"  {test_id}")
        if not baseline_passed:
            print("no test passed on the unmodified copy: nothing to measure", file=sys.stderr)
            return 2
        outcomes = []
        for mutant in mutants:
            outcome = check_mutant(copy, mutant, baseline_passed, args.timeout)
            print(f"  {mutant.name}: {outcome.status} {outcome.detail} ({outcome.seconds:.0f} s)", flush=True)
            if args.verbose:
                for test_id in outcome.failed:
                    print(f"      {test_id}")
            outcomes.append(outcome)
    finally:
        if args.keep:
            print(f"kept {copy}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print_table(outcomes)
    caught = sum(o.status == "caught" for o in outcomes)
    stale = [o.mutant.name for o in outcomes if o.status in ("STALE", "AMBIGUOUS")]
    survived = [o.mutant.name for o in outcomes if o.status == "SURVIVED"]
    print(f"\nscore: {caught}/{len(outcomes)} caught")
    if survived:
        print(f"survived: {', '.join(survived)}")
    if stale:
        print(f"stale mutants (update their snippets): {', '.join(stale)}")
    return 0 if caught == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
