"""The documentation cannot drift from the package: the API reference lists every public
name, and CI builds the site with warnings as errors and runs its examples."""

import pathlib
import re

import bpgpu as bp

ROOT = pathlib.Path(__file__).resolve().parents[1]
API = (ROOT / "docs" / "api.rst").read_text()


def _listed(module_heading: str | None = None) -> set[str]:
    """Names in the autosummary blocks of docs/api.rst (those after ``module_heading`` only)."""
    text = API if module_heading is None else API[API.index(module_heading) :]
    return set(re.findall(r"^   ([A-Za-z_][A-Za-z_0-9]*)$", text, re.M))


def test_api_reference_lists_every_public_name():
    missing = set(bp.__all__) - _listed() - {"__version__"}
    assert not missing, f"docs/api.rst does not document {sorted(missing)}"
    assert ".. data:: __version__" in API


def test_api_reference_lists_the_dask_functions():
    import bpgpu.dask as bd

    public = {
        name
        for name, obj in vars(bd).items()
        if callable(obj) and not name.startswith("_") and getattr(obj, "__module__", "") == "bpgpu.dask"
    }
    assert public <= _listed("Dask: ``bpgpu.dask``"), sorted(public - _listed("Dask: ``bpgpu.dask``"))


def test_ci_builds_the_docs_with_warnings_as_errors_and_runs_the_doctests_before_the_tests():
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    html = lines.index("sphinx-build -W --keep-going -b html docs docs/_build/html")
    doctest = lines.index("sphinx-build -W --keep-going -b doctest docs docs/_build/doctest")
    tests = next(i for i, line in enumerate(lines) if line.endswith("python -m pytest"))
    assert html < tests and doctest < tests
