"""The Noether environment: noether_dist installs and imports beside the real Noether."""

from __future__ import annotations

import sys
from importlib.metadata import requires, version
from pathlib import Path

from packaging.requirements import Requirement

from tests.support.torch_range import declared_torch_range

ROOT = Path(__file__).resolve().parents[3]


def test_noether_and_noether_dist_import_together_from_this_checkout():
    import noether
    import noether_dist
    from noether.core.callbacks import CheckpointCallback  # noqa: F401 - what the adapter builds on

    assert Path(noether_dist.__file__).resolve().parent == ROOT / "noether_dist"
    assert Path(noether.__file__).resolve().parent.parent.name == "site-packages"
    assert sys.version_info[:2] >= (3, 12)  # emmiai-noether requires it


def test_noethers_torch_pin_is_inside_our_declared_range():
    # pip refuses the pair when Noether's own torch requirement cannot meet ours.
    (pin,) = [Requirement(r) for r in requires("emmiai-noether") or [] if Requirement(r).name == "torch"]
    ours = declared_torch_range()
    pinned = [s.version for s in pin.specifier if s.operator == "=="]
    assert pinned, f"emmiai-noether {version('emmiai-noether')} no longer pins torch ({pin}): revisit the range"
    assert ours.contains(pinned[0]), f"Noether pins torch {pinned[0]}, outside our range {ours}"
    import torch

    assert torch.__version__.split("+")[0] == pinned[0]
