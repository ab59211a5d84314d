"""Sphinx configuration for pyro_symmetry."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "pyro_symmetry"
author = "The pyro_symmetry developers"
copyright = "2026, The pyro_symmetry developers"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_ivar = True
nitpicky = False
exclude_patterns = ["_build", "benchmarks/*.md", "examples/_*"]
html_theme = "alabaster"
suppress_warnings = ["myst.header"]
