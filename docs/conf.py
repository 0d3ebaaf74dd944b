"""Sphinx configuration of the lightning-htsr documentation (``make docs`` -> docs/_build/html)."""

from __future__ import annotations

import lightning_htsr

project = "lightning-htsr"
author = "lightning-htsr developers"
release = lightning_htsr.__version__
version = release

extensions = [
    "myst_parser",  # Markdown pages
    "sphinx.ext.autodoc",  # the API reference from the docstrings
    "sphinx.ext.napoleon",  # Google-style docstrings
    "sphinx.ext.viewcode",
    "sphinxarg.ext",  # the command-line reference from the argparse parser
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3  # `[text](page.md#a-heading)` links to headings

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
nitpicky = False

html_theme = "furo"
html_title = f"lightning-htsr {release}"
