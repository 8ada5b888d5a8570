"""The built docs site: formulas rendered by a MathJax the site serves itself, wide content that
scrolls, and every image in place.

The site is built once, as CI builds it (``mkdocs build --strict``), into a temporary directory.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from importlib.resources import files as package_files
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MATHJAX = "assets/mathjax/tex-svg-full.js"
MATHJAX_CONFIG = "javascripts/mathjax-config.js"
EXTRA_CSS = "stylesheets/extra.css"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


class _Tags(HTMLParser):
    """Every start tag of a page as ``(tag, attributes)``."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))


def _tags(page: Path) -> list[tuple[str, dict[str, str]]]:
    parser = _Tags()
    parser.feed(page.read_text())
    return parser.tags


def _local(site: Path, page: Path, url: str) -> Path:
    """The file ``url`` on ``page`` names inside the site (``404.html`` links from the site's root); fails on
    a URL of another host."""
    parts = urlsplit(url)
    assert not parts.scheme and not parts.netloc, f"{page.relative_to(site)} loads {url} from another host"
    return site / urlsplit(urljoin("/" + page.relative_to(site).as_posix(), url)).path.lstrip("/")


def _scripts(page: Path) -> list[str]:
    return [attrs["src"] for tag, attrs in _tags(page) if tag == "script" and "src" in attrs]


def _pages(site: Path) -> list[Path]:
    return sorted(site.rglob("*.html"))


# -- formulas ----------------------------------------------------------------------------------------
def test_bases_page_has_formulas_and_loads_mathjax_from_the_site(site: Path) -> None:
    page = site / "reference" / "bases" / "index.html"
    html = page.read_text()
    assert html.count('class="arithmatex"') >= 20  # the formulas are marked for the renderer
    assert r"\frac{\sigma^i H_i(\sigma k)}{i!}" in html
    scripts = _scripts(page)
    config = [s for s in scripts if s.endswith(MATHJAX_CONFIG)]
    renderer = [s for s in scripts if s.endswith(MATHJAX)]
    assert len(config) == 1 and len(renderer) == 1, scripts
    assert scripts.index(config[0]) < scripts.index(renderer[0])  # MathJax reads its set-up when it loads
    bundle = _local(site, page, renderer[0])
    assert bundle == site / MATHJAX and bundle.is_file()
    shipped = package_files("mathjax") / "static" / "mathjax" / "es5" / "tex-svg-full.js"  # the docs extra's
    assert bundle.read_bytes() == shipped.read_bytes() and b'VERSION="3.' in bundle.read_bytes()
    assert "arithmatex" in _local(site, page, config[0]).read_text()


def test_mathjax_is_served_by_the_site_itself(site: Path) -> None:
    for page in _pages(site):
        html = page.read_text()
        assert not re.search(r"(https?:)?//[^\"' ]*(mathjax|katex|polyfill)", html, flags=re.I), page
        for src in _scripts(page):
            assert _local(site, page, src).is_file(), (page, src)  # every script is a file of the site


def test_no_page_needs_the_network_to_look_right(site: Path) -> None:
    for page in _pages(site):
        for tag, attrs in _tags(page):
            if tag == "link" and attrs.get("rel") in ("stylesheet", "preconnect", "preload"):
                assert _local(site, page, attrs["href"]).exists(), (page, attrs)


# -- wide tables and code ----------------------------------------------------------------------------
def test_extra_css_makes_wide_tables_and_code_scroll(site: Path) -> None:
    css = (site / EXTRA_CSS).read_text()
    rules = dict(re.findall(r"([^{}]+)\{([^}]*)\}", re.sub(r"/\*.*?\*/", "", css, flags=re.S)))
    rules = {" ".join(selector.split()): body for selector, body in rules.items()}
    assert "overflow-x: auto" in rules[".md-typeset table:not([class])"]
    assert "max-width: 100%" in rules[".md-typeset table:not([class])"]
    assert "overflow-x: auto" in rules[".md-typeset pre > code"]
    for page in (site / "benchmarks" / "index.html", site / "index.html", site / "reference" / "bases" / "index.html"):
        sheets = [a["href"] for t, a in _tags(page) if t == "link" and a.get("rel") == "stylesheet"]
        extra = [href for href in sheets if href.endswith(EXTRA_CSS)]
        assert extra and _local(site, page, extra[0]) == site / EXTRA_CSS, sheets
        assert sheets.index(extra[0]) == len(sheets) - 1  # after the theme's, so it wins


# -- images ------------------------------------------------------------------------------------------
MARKDOWN_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)")


@pytest.mark.parametrize("page", sorted(DOCS.rglob("*.md")), ids=lambda p: str(p.relative_to(DOCS)))
def test_every_image_referenced_by_the_docs_exists(page: Path) -> None:
    for target in MARKDOWN_IMAGE.findall(page.read_text()):
        assert not urlsplit(target).scheme, f"{page.relative_to(ROOT)}: remote image {target}"
        assert (page.parent / target).is_file(), f"{page.relative_to(ROOT)}: missing image {target}"


def test_every_image_of_the_site_is_in_the_site(site: Path) -> None:
    for page in _pages(site):
        for tag, attrs in _tags(page):
            if tag == "img":
                assert _local(site, page, attrs["src"]).is_file(), (page, attrs["src"])


@pytest.mark.parametrize("image", ["samples.png", "speed_vs_error.png"])
def test_benchmarks_page_shows_the_bench_plots_with_their_provenance(site: Path, image: str) -> None:
    text = (DOCS / "benchmarks.md").read_text()
    shown = [t for t in MARKDOWN_IMAGE.findall(text) if Path(t).name == image]
    assert len(shown) == 1, f"benchmarks.md shows {image} once"
    file = DOCS / shown[0]
    assert file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    after = text.split(shown[0], 1)[1].split("\n\n", 2)[1]  # the paragraph under the image
    assert "hicache bench" in after and "Machine" in after, after
    page = site / "benchmarks" / "index.html"
    sources = [_local(site, page, a["src"]) for t, a in _tags(page) if t == "img"]
    assert any(source.name == image and source.read_bytes() == file.read_bytes() for source in sources)
