"""Commit records and aliases: the only things that make a checkpoint visible.

A checkpoint exists only once its commit record exists. The record is one small JSON
object, written last (after every rank reported success) and exactly once
(``Storage.write_once``), so on an object store it appears in a single PUT or not at all.
It lists every artifact with every file each rank wrote (size, CRC32).

Aliases (``latest``, ``last``, ``best.<metric>``) are small JSON objects replaced in one
write; they name a training point. ``last`` and ``best.<metric>`` are written after that
point committed; ``latest`` just before its record, and selection ignores an alias whose
point has no commit record.
Finding ``latest`` costs two reads (alias, commit record); a listing of ``_commits/`` is
the fallback when an alias is missing or broken (:class:`~noether_dist.stage.index.StageIndex`
decides). This module reads, writes and lists the records on a store; their schema and JSON
form are :mod:`noether_dist.format.records`.
"""

from __future__ import annotations

import logging

import math
from collections.abc import Mapping, Sequence

from ..errors import AliasUpdateError, InvalidNameError
from ..format.layout import StageLayout
from ..format.names import TrainingIteration, validate_name
from ..format.records import AliasRecord, CommitRecord, CorruptRecordError
from ..io.storage import Storage

__all__ = ["write_commit", "read_commit", "commit_files", "list_commits", "alias_files", "read_alias", "write_alias",
           "move_aliases", "publish"]

log = logging.getLogger(__name__)


def write_commit(storage: Storage, layout: StageLayout, record: CommitRecord) -> None:
    """Write the commit record once; FileExistsError if this point already committed."""
    storage.write_once(layout.commit_path(record.iteration), record.to_json())


def read_commit(storage: Storage, layout: StageLayout, iteration: TrainingIteration) -> CommitRecord | None:
    """The commit record of a training point, None if it never committed.
    CorruptRecordError if it exists but is damaged."""
    path = layout.commit_path(iteration)
    try:
        raw = storage.read(path)
    except FileNotFoundError:
        return None
    record = CommitRecord.from_json(raw, where=f"commit record {path}")
    if record.iteration != iteration:
        raise CorruptRecordError(f"commit record {path} names {record.iteration}, not {iteration}")
    return record


def commit_files(storage: Storage, layout: StageLayout) -> dict[TrainingIteration, str]:
    """Every committed training point of the stage, oldest first, with the path of its
    record as the store lists it (one listing)."""
    found = {}
    for entry in storage.list(layout.commits_dir):
        it = StageLayout.iteration_of_commit_file(entry.name)
        if it is not None and not entry.is_dir:
            found[it] = entry.path
    return dict(sorted(found.items()))


def list_commits(storage: Storage, layout: StageLayout) -> list[TrainingIteration]:
    """Every committed training point of the stage, oldest first (one listing)."""
    return list(commit_files(storage, layout))


def alias_files(storage: Storage, layout: StageLayout) -> dict[str, str]:
    """Every alias of the stage by name, with the path of its file as the store lists it
    (one listing; folders, hidden files such as a write in progress, and names no alias can
    have are not aliases)."""
    found = {}
    for entry in storage.list(layout.aliases_dir):
        name = StageLayout.alias_of_file(entry.name)
        if name and not entry.is_dir and not entry.name.startswith(".") and _valid_alias(name):
            found[name] = entry.path
    return dict(sorted(found.items()))


def _valid_alias(name: str) -> bool:
    try:
        validate_name(name, "alias name")
    except InvalidNameError:
        return False
    return True


def read_alias(storage: Storage, layout: StageLayout, name: str, *, strict: bool = False) -> AliasRecord | None:
    """The alias, or None when it does not exist. A damaged alias is logged and read as
    None (callers then fall back to a listing), or with ``strict`` raises
    CorruptRecordError; other store errors raise."""
    path = layout.alias_path(name)
    try:
        raw = storage.read(path)
    except FileNotFoundError:
        return None
    try:
        return AliasRecord.from_json(raw, where=f"alias {path}")
    except CorruptRecordError as exc:
        if strict:
            raise
        log.warning("%s; ignoring it", exc)
        return None


def write_alias(storage: Storage, layout: StageLayout, alias: AliasRecord) -> None:
    """Point an alias at a committed training point (one write)."""
    storage.replace(layout.alias_path(alias.name), alias.to_json())


def move_aliases(storage: Storage, layout: StageLayout, iteration: TrainingIteration, requested: Sequence[str],
                 metrics: Mapping[str, float], best_metrics: Mapping[str, str], *,
                 include_latest: bool = True) -> tuple[str, ...]:
    """Point the ``requested`` aliases (latest, last, best.<metric>) at a committed point
    (``latest`` never backwards), and each ``best.<metric>`` of ``best_metrics`` (metric ->
    min/max) whose value in ``metrics`` beats the alias's; return the names moved."""
    moved = []
    for alias in requested:
        if alias == "latest" and not include_latest:
            continue
        current = read_alias(storage, layout, alias)
        if alias == "latest" and current is not None and current.iteration > iteration:
            continue  # never move latest backwards
        write_alias(storage, layout, AliasRecord(alias, iteration))
        moved.append(alias)
    for metric, mode in best_metrics.items():
        value = metrics.get(metric)
        if value is None or not math.isfinite(value):
            continue
        name = f"best.{metric}"
        current = read_alias(storage, layout, name)
        better = (current is None or current.value is None
                  or (value < current.value if mode == "min" else value > current.value))
        if better:
            write_alias(storage, layout, AliasRecord(name, iteration, value, mode))
            moved.append(name)
    if moved:
        log.info("aliases %s -> %s", ", ".join(moved), iteration)
    return tuple(moved)


def publish(storage: Storage, layout: StageLayout, record: CommitRecord, requested: Sequence[str],
            best_metrics: Mapping[str, str], previous: AliasRecord | None) -> tuple[str, ...]:
    """The coordinator's commit: ``latest`` (``previous`` is its value before this save), the
    commit record (once), then the other aliases; return the aliases moved.

    ``latest`` moves just BEFORE the record: a crash in between leaves it naming a point that
    is not committed, which selection skips (one listing finds the newest committed). Moved
    after, a crash in between would leave it one checkpoint behind. A failed record write puts
    ``latest`` back; a failure after the record raises :class:`AliasUpdateError`."""
    moved_latest = previous is None or previous.iteration <= record.iteration
    if moved_latest:
        write_alias(storage, layout, AliasRecord("latest", record.iteration))
    try:
        write_commit(storage, layout, record)
    except BaseException:
        if moved_latest and previous is not None:
            write_alias(storage, layout, previous)
        raise
    log.info("committed %s in %s (%d artifacts, %d bytes)", record.iteration, layout.checkpoints_dir,
             len(record.artifacts), record.total_bytes)
    try:
        others = move_aliases(storage, layout, record.iteration, requested, record.metrics, best_metrics,
                              include_latest=False)
    except Exception as exc:  # noqa: BLE001 - reported as such, on every rank
        raise AliasUpdateError(f"{record.iteration} is committed, but moving its aliases failed: {exc}") from exc
    return (("latest",) if moved_latest else ()) + others
