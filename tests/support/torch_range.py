"""The torch range the package declares (pyproject.toml), for the tests that check it."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

__all__ = ["declared_torch_range"]


def declared_torch_range() -> SpecifierSet:
    """The specifier of ``torch`` in the project's dependencies."""
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    deps = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    (spec,) = [Requirement(d).specifier for d in deps if Requirement(d).name == "torch"]
    return spec
