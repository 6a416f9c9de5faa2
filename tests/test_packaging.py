"""The package's metadata: one version, the typed-package marker shipped, the license that pyproject names."""

import pathlib
import re

import pytest

import bpgpu as bp

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_version_is_written_once():
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "bpgpu.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", bp.__version__)
    assert f"## [{bp.__version__}]" in (ROOT / "CHANGELOG.md").read_text()


def test_py_typed_is_shipped():
    assert (ROOT / "bpgpu" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["bpgpu"]


def test_license_file_is_the_one_pyproject_names():
    assert PYPROJECT["project"]["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
