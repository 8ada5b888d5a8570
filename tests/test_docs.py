"""The documentation is tested: tutorial code runs, hook signatures and weight tables match the code.

Every ```python block of every ``docs/tutorials/*.md`` runs, in order, in one fresh namespace per
file (a block preceded by a ``<!-- skip -->`` line is left out).
"""

from __future__ import annotations

import inspect
import re
import textwrap
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import torch

import hicache_sdk as sdk
from hicache_sdk import hookspecs

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TUTORIALS = sorted((DOCS / "tutorials").glob("*.md"))
EXAMPLE = DOCS / "examples" / "hicache-plugin-example"
SKIP_MARK = "<!-- skip -->"


def code_blocks(text: str, language: str = "python") -> list[tuple[int, str, bool]]:
    """``(first line number, code, skipped)`` for each fenced block in ``language``."""
    blocks: list[tuple[int, str, bool]] = []
    lines = text.splitlines()
    skip = False
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped.startswith("```"):
            info = stripped[3:].split()
            end = i + 1
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            if info and info[0] == language:
                blocks.append((i + 2, textwrap.dedent("\n".join(lines[i + 1 : end])), skip))
            skip = False
            i = end + 1
            continue
        if stripped == SKIP_MARK:
            skip = True
        elif stripped:
            skip = False
        i += 1
    return blocks


def test_code_block_parser() -> None:
    text = (
        "intro\n```python\na = 1\n```\n\n<!-- skip -->\n```python\nb = 2\n```\n```toml\nx = 1\n```\n```python\nc\n```\n"
    )
    assert code_blocks(text) == [(3, "a = 1", False), (8, "b = 2", True), (14, "c", False)]
    assert code_blocks(text, "toml") == [(11, "x = 1", False)]


# -- tutorials ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("page", TUTORIALS, ids=lambda p: p.name)
def test_tutorial_code_runs(
    page: Path, fresh_registry: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = [(line, code) for line, code, skipped in code_blocks(page.read_text()) if not skipped]
    monkeypatch.chdir(tmp_path)  # files a tutorial writes land in a temporary directory
    torch.manual_seed(0)
    namespace: dict[str, Any] = {"__name__": f"docs_tutorial_{page.stem.replace('-', '_')}"}
    for line, code in blocks:
        exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)
    capsys.readouterr()


def test_basis_plugin_tutorial_shows_the_example_distribution_verbatim() -> None:
    text = (DOCS / "tutorials" / "write-a-basis-plugin.md").read_text()
    python = code_blocks(text)
    module = (EXAMPLE / "src" / "hicache_plugin_example" / "__init__.py").read_text().rstrip()
    tests = (EXAMPLE / "tests" / "test_damped_taylor.py").read_text().rstrip()
    assert python[0] == (python[0][0], module, False)  # the first block is the module itself, and runs
    assert (tests, True) in [(code, skipped) for _, code, skipped in python]
    assert [code for _, code, _ in code_blocks(text, "toml")] == [(EXAMPLE / "pyproject.toml").read_text().rstrip()]


# -- hooks -------------------------------------------------------------------------------------------
class _Annotation:
    """Prints an annotation's source text as is (inspect would quote the strings of postponed annotations)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _bare(annotation: Any) -> Any:
    if annotation is inspect.Parameter.empty:
        return annotation
    return _Annotation(annotation if isinstance(annotation, str) else inspect.formatannotation(annotation))


def spec_source(function: Any) -> str:
    """The decorator line and the ``def`` line of a hookspec, as the hooks reference shows them."""
    signature = inspect.signature(function)
    signature = signature.replace(
        parameters=[p.replace(annotation=_bare(p.annotation)) for p in signature.parameters.values()],
        return_annotation=_bare(signature.return_annotation),
    )
    options = {k: v for k, v in getattr(function, f"{hookspecs.PROJECT_NAME}_spec").items() if v not in (False, None)}
    decorator = "@hookspec" + (f"({', '.join(f'{k}={v!r}' for k, v in options.items())})" if options else "")
    return f"{decorator}\ndef {function.__name__}{signature}"


HOOKSPECS = [
    obj for name, obj in vars(hookspecs).items() if name.startswith("hicache_") and hasattr(obj, "hicache_spec")
]


def test_hookspecs_found() -> None:
    assert {f.__name__ for f in HOOKSPECS} == {
        "hicache_register_bases",
        "hicache_register_policies",
        "hicache_register_adapters",
        "hicache_select_adapter",
    }
    assert spec_source(hookspecs.hicache_select_adapter) == (
        "@hookspec(firstresult=True)\ndef hicache_select_adapter(model: torch.nn.Module) -> str | None"
    )


@pytest.mark.parametrize("spec", HOOKSPECS, ids=lambda f: f.__name__)
def test_every_hookspec_documented_with_its_exact_signature(spec: Any) -> None:
    text = (DOCS / "reference" / "hooks.md").read_text()
    assert f"\n## {spec.__name__}\n" in text
    section = text.split(f"\n## {spec.__name__}\n", 1)[1].split("\n## ", 1)[0]
    assert f"```python\n{spec_source(spec)}\n```" in section


def test_hooks_reference_documents_no_other_hook() -> None:
    text = (DOCS / "reference" / "hooks.md").read_text()
    documented = set(re.findall(r"^## (hicache_\w+)$", text, flags=re.M))
    assert documented == {f.__name__ for f in HOOKSPECS}


@pytest.mark.parametrize("spec", HOOKSPECS, ids=lambda f: f.__name__)
def test_every_hookspec_is_exercised_by_a_test(spec: Any) -> None:
    sources = [p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != Path(__file__).name]
    assert any(spec.__name__ in source for source in sources)


# -- bases reference ---------------------------------------------------------------------------------
BASES_PAGE = DOCS / "reference" / "bases.md"


def test_every_builtin_basis_has_a_section() -> None:
    text = BASES_PAGE.read_text()
    builtin = [r.name for r in sdk.list_plugins() if r.kind == "basis" and r.distribution.startswith("hicache-sdk ")]
    assert sorted(builtin) == ["hermite", "newton", "scaled_taylor", "taylor"]
    for name in builtin:
        assert f"\n## `{name}`\n" in text


def _reference_rows() -> list[tuple[str, str, str, str]]:
    text = BASES_PAGE.read_text().split("## Reference values", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([^`]+)` \| ([^|]+) \| ([^|]+) \| ([^|]+) \|$", text, flags=re.M)


def test_reference_table_matches_the_code() -> None:
    rows = _reference_rows()
    assert len(rows) >= 8
    for tag, offset, spacing, weights in rows:
        match = re.fullmatch(r"(\w+)(?:\((\w+)=([\d.]+)\))?", tag)
        assert match, tag
        name, key, value = match.groups()
        basis = sdk.get_basis(name)(**({key: float(value)} if key else {}))
        expected = [float(Fraction(w.strip())) for w in weights.split(",")]
        h = 1.0 if spacing.strip() == "any" else float(spacing)
        got = basis.weights(float(offset), len(expected) - 1, h)
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-15), tag
        if spacing.strip() == "any":
            assert basis.weights(float(offset), len(expected) - 1, 7.0) == got, f"{tag} depends on the spacing"


def test_sigma_ablation_figures_are_attributed() -> None:
    text = BASES_PAGE.read_text()
    for figure in ("0.9683", "0.9979", "0.9623", "0.7586"):
        assert figure in text
    assert "figures from the\npaper, not measured here" in text


# -- API reference -----------------------------------------------------------------------------------
def test_api_reference_covers_the_public_api() -> None:
    text = (DOCS / "reference" / "api.md").read_text()
    entries = re.findall(r"^::: ([\w.]+)$", text, flags=re.M)
    for entry in entries:  # every entry names a real object
        module, _, attr = entry.rpartition(".")
        target = __import__(entry, fromlist=["_"]) if not attr or entry.count(".") == 0 else None
        if target is None:
            try:
                target = getattr(__import__(module, fromlist=["_"]), attr)
            except (ImportError, AttributeError):
                target = __import__(entry, fromlist=["_"])
        assert target is not None, entry
    documented = {e.split(".")[-1] for e in entries}
    missing = set(sdk.__all__) - documented - {"__version__", "hookimpl", "hookspec"}
    assert not missing, f"public names without an API entry: {sorted(missing)}"
