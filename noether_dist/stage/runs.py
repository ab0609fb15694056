"""Runs and stages under an output dir: folders that hold a checkpoints folder.

Listings are fresh (never cached). A stage's own checkpoints are the job of
:class:`~noether_dist.stage.index.StageIndex`.
"""

from __future__ import annotations

from ..format.layout import CHECKPOINTS_DIR, join_url
from ..io.storage import Storage

__all__ = ["list_runs", "list_stages"]


def list_runs(storage: Storage, output_dir: str) -> list[str]:
    """Run ids under ``output_dir`` (folders that hold a checkpoints folder, directly or in a stage)."""
    runs = []
    for entry in storage.list(output_dir):
        if entry.is_dir and list_stages(storage, join_url(output_dir, entry.name)) is not None:
            runs.append(entry.name)
    return runs


def list_stages(storage: Storage, run_dir: str) -> list[str] | None:
    """Stage names of a run ("" for a run without stage folder); None if it is no run."""
    entries = storage.list(run_dir)
    if not entries:
        return None
    stages = []
    for entry in entries:
        if not entry.is_dir:
            continue
        if entry.name == CHECKPOINTS_DIR:
            stages.append("")
        elif any(e.name == CHECKPOINTS_DIR and e.is_dir for e in storage.list(join_url(run_dir, entry.name))):
            stages.append(entry.name)
    return stages
