"""The docs' snippets use today's APIs and install into the project's own environment.

diffusers 0.42 reads ``dtype=`` and deprecates ``torch_dtype=``; the plugin tutorial installs the
example plugin with the interpreter hicache-sdk lives in (the set-up commands' ``.venv``).
"""

from __future__ import annotations

import re
import shlex
import warnings
from pathlib import Path

import pytest
import torch
from test_docs import code_blocks

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
VENV = ".venv/bin/"
PLUGIN_PAGES = [
    DOCS / "tutorials" / "write-a-basis-plugin.md",
    DOCS / "examples" / "hicache-plugin-example" / "README.md",
    DOCS / "tutorials" / "write-a-policy-plugin.md",
    DOCS / "examples" / "hicache-policy-example" / "README.md",
]


def _snippets(page: Path) -> list[tuple[int, str]]:
    """``(first line number, code)`` of every fenced block, whatever its language, and of every indented line."""
    snippets: list[tuple[int, str]] = []
    fence: list[str] | None = None
    for number, line in enumerate(page.read_text().splitlines(), start=1):
        if line.strip().startswith("```"):
            if fence is None:
                fence, start = [], number + 1
            else:
                snippets.append((start, "\n".join(fence)))
                fence = None
        elif fence is not None:
            fence.append(line)
        elif line.startswith("    "):
            snippets.append((number, line))
    assert fence is None, f"{page}: unclosed code fence"
    return snippets


def test_snippets_are_found() -> None:
    # keyed by the path in the repository: several pages share a file name (README.md, index.md)
    found = {page.relative_to(ROOT).as_posix(): len(_snippets(page)) for page in PAGES}
    assert len(found) == len(PAGES)
    assert found["docs/tutorials/accelerate-a-pipeline.md"] > 10
    assert found["docs/tutorials/write-a-policy-plugin.md"] > 10
    assert found["docs/index.md"] >= 1 and found["README.md"] >= 2
    for name in ("first_block", "easycache", "speca", "pab"):  # each policy page shows how to compose it
        assert found[f"docs/reference/policies/{name}.md"] >= 1, name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_snippet_uses_torch_dtype(page: Path) -> None:
    offending = [line for line, code in _snippets(page) if "torch_dtype" in code]
    assert not offending, f"{page.relative_to(ROOT)}: torch_dtype= in the snippets at lines {offending}; use dtype="


def test_docs_load_pipelines_with_dtype() -> None:
    calls = [code for page in PAGES for _, code in _snippets(page) if ".from_pretrained(" in code]
    assert calls and all(re.search(r"(?<!\w)dtype=torch\.bfloat16", code) for code in calls), calls


def test_diffusers_reads_dtype_and_deprecates_torch_dtype(tmp_path: Path) -> None:
    """What the snippets rely on: ``FluxPipeline.from_pretrained(..., dtype=...)`` loads in that dtype
    without a deprecation warning; ``torch_dtype=`` still works but warns."""
    from diffusers import FluxPipeline

    from hicache_sdk.bench.policy_calls import build_pipeline

    build_pipeline(hidden_heads=2, head_dim=16, double=1, single=1, text_dim=32, seed=0).save_pretrained(tmp_path)
    absent = dict.fromkeys(("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
    for keyword, deprecated in (("dtype", False), ("torch_dtype", True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe = FluxPipeline.from_pretrained(tmp_path, **{keyword: torch.bfloat16}, **absent)
        assert pipe.transformer.dtype == torch.bfloat16, keyword
        warned = [w for w in caught if issubclass(w.category, FutureWarning) and "torch_dtype" in str(w.message)]
        assert bool(warned) == deprecated, keyword


def _shell_commands(page: Path) -> list[list[str]]:
    commands = []
    for _, code, _ in code_blocks(page.read_text(), "bash"):
        for line in code.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


@pytest.mark.parametrize("page", PLUGIN_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_plugin_is_installed_into_the_sdks_environment(page: Path) -> None:
    commands = _shell_commands(page)
    installs = [c for c in commands if "pip" in c or any(w.endswith("/pip") for w in c)]
    assert installs, "the page shows how to install the plugin"
    for words in installs:  # the same interpreter as hicache-sdk, never a bare pip
        assert words[:4] == [f"{VENV}python", "-m", "pip", "install"] or words[:2] == [f"{VENV}pip", "install"], words
        target = ROOT / words[-1]
        assert words[-2] == "-e" and (target / "pyproject.toml").is_file(), words
    for words in commands:  # and everything else runs in that environment too
        assert words[0].startswith(VENV), words
