"""Sphinx configuration of bpgpu's documentation.

Build (warnings are errors, as in CI):

    sphinx-build -W --keep-going -b html docs docs/_build/html
    sphinx-build -W --keep-going -b doctest docs docs/_build/doctest
"""

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document the checkout, whatever else is installed

import bpgpu  # noqa: E402

os.environ.setdefault("BPGPU_BACKEND", "numpy")  # the examples print CPU results on any machine

project = "bpgpu"
author = "The bpgpu developers"
copyright = "2026, The bpgpu developers"
version = release = bpgpu.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",  # the repository's Markdown files (changelog, contributing, benchmark results)
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "api/generated/*.md"]
templates_path = ["_templates"]

autosummary_generate = True
autodoc_typehints = "none"  # numpydoc's Parameters sections give the types; the signature stays readable
autodoc_default_options = {"members": False}
numpydoc_show_class_members = False
numpydoc_xref_param_type = False
default_role = "code"

myst_heading_anchors = 3
suppress_warnings = ["myst.header"]  # the included Markdown files start below a page title

# Every `>>>` example (guide pages and docstrings) runs under `-b doctest`, from a clean namespace.
doctest_global_setup = """
import numpy as np
import bpgpu as bp
"""
doctest_test_doctest_blocks = "default"

html_theme = "pydata_sphinx_theme"
html_title = f"bpgpu {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
}
html_static_path = []


def _write_benchmark_pages():
    """One page per folder of benchmarks/results (newest first): its results.md (or
    summary.txt) and its plots, so that every committed run is in the docs as it is."""
    out = pathlib.Path(__file__).parent / "_generated" / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.md"):
        old.unlink()
    up = "../../../benchmarks/results"
    for run in sorted((ROOT / "benchmarks" / "results").iterdir(), reverse=True):
        if not run.is_dir():
            continue
        lines = [f"# {run.name}", "", f"Folder `benchmarks/results/{run.name}/`.", ""]
        if (run / "results.md").exists():
            lines += ["```{include} " + f"{up}/{run.name}/results.md", "```", ""]
        for text in sorted(run.glob("*.txt")):
            lines += ["```{literalinclude} " + f"{up}/{run.name}/{text.name}", ":language: text", "```", ""]
        for image in sorted(run.glob("*.png")):
            lines += [f"![{image.stem.replace('_', ' ')}]({up}/{run.name}/{image.name})", ""]
        data = sorted(f.name for f in run.iterdir() if f.suffix not in (".md", ".txt", ".png"))
        if data:
            lines += ["The folder's data: " + ", ".join(f"`{name}`" for name in data) + ".", ""]
        (out / f"{run.name}.md").write_text("\n".join(lines))


_write_benchmark_pages()


def _skip_scikit_learn_members(app, what, name, obj, skip, options):
    """The estimators' pages list bpgpu's own members; scikit-learn's machinery (metadata
    routing's set_*_request, get_metadata_routing) is documented by scikit-learn."""
    if getattr(obj, "__module__", None) and obj.__module__.startswith("sklearn."):
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_scikit_learn_members)
