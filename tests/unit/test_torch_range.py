"""The torch this environment runs is one the package declares support for (run in both the
main and the Noether environment: both ends of the range)."""

from __future__ import annotations

import pytest
import torch
from packaging.version import Version

from tests.support.torch_range import declared_torch_range

pytestmark = pytest.mark.torch_compat


def test_installed_torch_is_inside_the_declared_range():
    installed = Version(torch.__version__).base_version
    spec = declared_torch_range()
    assert spec.contains(installed), f"torch {torch.__version__} is outside the declared range {spec}"
    # A range, not a pin, with an upper bound (an unbounded one lets pip pull a newer CUDA build).
    assert not any(s.operator in ("==", "===") for s in spec), spec
    assert any(s.operator in ("<", "<=") for s in spec), spec
