"""What one stage holds, as ``noether-ckpt list`` shows it: every checkpoint with its
state (committed or not), size and aliases.

A read-only view built on :class:`~noether_dist.stage.index.StageIndex`; listings are
fresh (never cached across calls).
"""

from __future__ import annotations

from dataclasses import dataclass

from .index import StageIndex
from .runs import list_runs, list_stages
from ..format.layout import StageLayout
from ..format.names import TrainingIteration
from ..format.records import AliasRecord, CommitRecord, CorruptRecordError
from ..io.storage import Storage

__all__ = ["list_runs", "list_stages", "StageSummary", "CheckpointSummary", "summarize_stage"]


@dataclass(frozen=True)
class CheckpointSummary:
    """One training point in a stage: committed or not, its size, the aliases naming it."""

    name: str
    iteration: TrainingIteration | None
    committed: bool
    bytes: int
    aliases: tuple[str, ...]
    artifacts: tuple[str, ...]
    record: CommitRecord | None = None
    problem: str | None = None


@dataclass(frozen=True)
class StageSummary:
    """Everything in one stage's checkpoints folder."""

    layout: StageLayout
    checkpoints: tuple[CheckpointSummary, ...]
    aliases: dict[str, AliasRecord | None]


def summarize_stage(storage: Storage, layout: StageLayout) -> StageSummary:
    """Summarise a stage: one listing of the checkpoints folder, one of the commits, one of
    the aliases, each alias and each commit record."""
    index = StageIndex(storage, layout)
    aliases = index.aliases()
    out = []
    for cp in index.find_all():
        record, problem = None, None
        if cp.committed:
            try:
                record = index.record(cp.iteration)
            except CorruptRecordError as exc:
                problem = str(exc)
        size = record.total_bytes if record else sum(storage.size(a.entry.path) for a in cp.artifacts)
        names_of_aliases = tuple(sorted(a for a, rec in aliases.items() if rec is not None and str(rec.iteration) == cp.name))
        out.append(CheckpointSummary(cp.name, cp.iteration, record is not None, size, names_of_aliases,
                                     tuple(a.name for a in cp.artifacts), record, problem))
    return StageSummary(layout, tuple(out), aliases)
