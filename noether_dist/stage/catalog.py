"""What exists under an output dir: runs, stages, committed and uncommitted checkpoints.

Read-only views used by resume (to say what exists when something does not) and by the
CLI. Listings are fresh (never cached).
"""

from __future__ import annotations

from dataclasses import dataclass

from .commit import AliasRecord, CommitRecord, CorruptRecordError, list_commits, read_alias, read_commit
from ..format.layout import ALIASES_DIR, CHECKPOINTS_DIR, COMMITS_DIR, StageLayout, join_url
from ..format.names import TrainingIteration, is_tag, parse_artifact
from ..io.storage import Storage

__all__ = ["list_runs", "list_stages", "StageSummary", "CheckpointSummary", "summarize_stage"]


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
    """Summarise a stage: one listing of the checkpoints folder, one of the commits, the
    aliases, and each commit record."""
    entries = storage.list(layout.checkpoints_dir)
    committed = {str(it): it for it in list_commits(storage, layout)}
    by_point: dict[str, list] = {}
    for entry in entries:
        if entry.name in (COMMITS_DIR, ALIASES_DIR):
            continue
        try:
            art = parse_artifact(entry.name)
        except ValueError:
            continue
        if committed and is_tag(art.checkpoint):
            continue  # Noether's tag files beside committed points (copies written by convert)
        by_point.setdefault(art.checkpoint, []).append(entry)
    aliases: dict[str, AliasRecord | None] = {}
    for entry in storage.list(layout.aliases_dir):
        name = StageLayout.alias_of_file(entry.name)
        if name:
            aliases[name] = read_alias(storage, layout, name)
    names = sorted(set(by_point) | set(committed), key=_sort_key)
    out = []
    for name in names:
        it = committed.get(name)
        record, problem = None, None
        if it is not None:
            try:
                record = read_commit(storage, layout, it)
            except CorruptRecordError as exc:
                problem = str(exc)
        else:
            try:
                it = TrainingIteration.parse(name)
            except ValueError:
                it = None
        size = record.total_bytes if record else sum(storage.size(e.path) for e in by_point.get(name, []))
        names_of_aliases = tuple(sorted(a for a, rec in aliases.items() if rec is not None and str(rec.iteration) == name))
        out.append(CheckpointSummary(name, it, record is not None, size, names_of_aliases,
                                     tuple(sorted(e.name for e in by_point.get(name, []))), record, problem))
    return StageSummary(layout, tuple(out), aliases)


def _sort_key(name: str):
    try:
        return (0, TrainingIteration.parse(name), name)
    except ValueError:
        return (1, TrainingIteration(0, 0, 0), name)
