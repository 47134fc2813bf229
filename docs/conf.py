"""Sphinx configuration: MyST Markdown pages, the pydata theme (NumPy's, SciPy's), the CLI and API generated."""

from dlc_snapshot_fix import __version__

project = "dlc-snapshot-fix"
author = "the dlc-snapshot-fix developers"
copyright = "2026, " + author
release = version = __version__

extensions = [
    "myst_parser",  # the pages are Markdown, as the README was
    "sphinx.ext.autodoc",  # the Python API from its docstrings
    "sphinx_click",  # the command-line reference from the click commands themselves
]
myst_heading_anchors = 3
myst_enable_extensions = ["substitution"]
myst_substitutions = {"release": release}
autodoc_typehints = "description"
autodoc_member_order = "bysource"
exclude_patterns = ["_build"]

html_theme = "pydata_sphinx_theme"
html_title = f"dlc-snapshot-fix {release}"
html_theme_options = {"navigation_with_keys": False, "show_toc_level": 2}
