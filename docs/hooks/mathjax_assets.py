"""MkDocs hook: the site serves MathJax itself, so its formulas render offline (no CDN).

The ``docs`` extra installs ``django-static-mathjax``, a wheel of MathJax 3's browser build. This
hook adds its one-file TeX-to-SVG bundle (Apache-2.0) to the site as ``assets/mathjax/tex-svg-full.js``, which
``mkdocs.yml`` loads after ``javascripts/mathjax-config.js``.
"""

from __future__ import annotations

from importlib.resources import files as package_files

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

BUNDLE = "assets/mathjax/tex-svg-full.js"


def on_files(files: Files, *, config: MkDocsConfig) -> Files:
    source = package_files("mathjax") / "static" / "mathjax" / "es5" / "tex-svg-full.js"
    files.append(File.generated(config, BUNDLE, abs_src_path=str(source)))
    return files
