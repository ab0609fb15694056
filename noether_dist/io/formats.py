"""Artifact formats behind one interface: look up how an artifact is checked, listed,
loaded and written from the format its commit record names.

``artifact_io(art.format)`` returns the implementation of
:class:`~noether_dist.io.format_api.ArtifactIO` (its docstring gives the order of calls):

- ``ArtifactFormat.DCP``: :class:`noether_dist.io.dcp_format.DcpFormat`, a DCP directory
  (sharded; loading reshards);
- ``ArtifactFormat.CONSOLIDATED``: :class:`noether_dist.io.consolidated_format.ConsolidatedFormat`,
  one ``torch.save`` file laid out as Noether writes it (ours after ``noether-ckpt convert
  --to consolidated``, and Noether's own files, which have no commit record).

Callers never compare formats themselves: they ask the implementation. The interface's
types are re-exported here, so that callers import from one place.
"""

from __future__ import annotations

from ..format.names import ArtifactFormat
from .consolidated_format import ConsolidatedFormat
from .dcp_format import DcpFormat
from .format_api import ArtifactIO, KeyInfo, LoadTarget, TrainerContent, WriteContext, flat_keys

__all__ = ["ArtifactIO", "LoadTarget", "TrainerContent", "WriteContext", "KeyInfo", "artifact_io", "flat_keys"]

_REGISTRY: dict[ArtifactFormat, ArtifactIO] = {impl.format: impl for impl in (DcpFormat(), ConsolidatedFormat())}


def artifact_io(fmt: ArtifactFormat | str) -> ArtifactIO:
    """The implementation of ``fmt`` (a member, or the value a commit record stores)."""
    return _REGISTRY[ArtifactFormat.parse(fmt)]
