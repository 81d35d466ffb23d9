"""Packaging metadata: both pyproject files apply without setuptools deprecation warnings."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("pyproject", [ROOT / "pyproject.toml", ROOT / "client" / "pyproject.toml"])
def test_pyproject_applies_without_deprecations(pyproject: Path, tmp_path: Path, monkeypatch) -> None:
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    monkeypatch.chdir(pyproject.parent)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dist = apply_configuration(Distribution(), str(pyproject))
    assert dist.metadata.license_expression == "Apache-2.0" or dist.metadata.license == "Apache-2.0"


def test_readme_tells_a_cpu_host_how_to_skip_the_cuda_wheels() -> None:
    text = (ROOT / "README.md").read_text()
    assert "download.pytorch.org/whl/cpu" in text and "5.5 GB" in text
