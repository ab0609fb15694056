"""Selecting the checkpoint to load: the coordinator's part of resume (no collectives).

Committed checkpoints are found with O(1) reads (alias, then commit record); a listing of
``_commits/`` only when an alias is missing or broken, or for a partial spec (E10, U100,
S200). A stage without any commit record may hold checkpoints that Noether itself wrote
(single files, no commit record): those are found by one listing of the folder and
described by a synthesized record (format ``consolidated``).
"""

from __future__ import annotations

import logging
from typing import NoReturn

from .catalog import list_runs, list_stages
from .commit import ArtifactRecord, CommitRecord, CorruptRecordError, list_commits, read_alias, read_commit
from ..errors import AmbiguousCheckpointError, CheckpointNotFoundError, InvalidNameError
from ..format.layout import StageLayout
from ..format.names import ArtifactKind, CheckpointRef, TrainingIteration, parse_artifact, parse_checkpoint
from ..io.storage import Storage

__all__ = ["select_checkpoint", "select_record", "resolve_record", "legacy_record"]

log = logging.getLogger(__name__)


def _missing_context(storage: Storage, layout: StageLayout) -> str:
    runs = list_runs(storage, layout.output_dir)
    if layout.run_id not in runs:
        return f"run {layout.run_id!r} does not exist under {layout.output_dir}; runs there: {runs or 'none'}"
    stages = list_stages(storage, layout.run_dir) or []
    shown = [s or "(no stage)" for s in stages]
    if (layout.stage_name or "") not in stages:
        return f"stage {layout.stage_name or '(no stage)'!r} does not exist in run {layout.run_id!r}; stages: {shown}"
    return f"no committed checkpoint in {layout.checkpoints_dir}"


def select_checkpoint(storage: Storage, layout: StageLayout, ref: CheckpointRef,
                      model_name: str | None = None) -> TrainingIteration:
    """Resolve ``ref`` to one committed training point (no collective; the coordinator's
    part). Raises CheckpointNotFoundError / AmbiguousCheckpointError listing what exists."""
    return select_record(storage, layout, ref).iteration


def select_record(storage: Storage, layout: StageLayout, ref: CheckpointRef) -> CommitRecord:
    """The commit record ``ref`` names. ``latest`` and other aliases cost two reads (alias,
    record); a listing only when the alias is missing or broken, or for E10/U100/S200."""
    if ref.kind is CheckpointRef.Kind.ITERATION:
        record = read_commit(storage, layout, ref.iteration)
        if record is None:
            _not_found(storage, layout, f"checkpoint {ref.iteration} is not committed")
        return record
    if ref.is_alias:
        alias = read_alias(storage, layout, ref.alias_name)
        if alias is not None:
            record = _read_or_warn(storage, layout, alias.iteration)
            if record is not None:
                return record
            log.warning("alias %s names %s, which is not an intact commit; falling back to a listing",
                        ref.alias_name, alias.iteration)
        if ref.kind is not CheckpointRef.Kind.LATEST:
            _not_found(storage, layout, f"alias {ref.alias_name} does not exist")
        for it in reversed(list_commits(storage, layout)):
            record = _read_or_warn(storage, layout, it)
            if record is not None:
                return record
        _not_found(storage, layout, "no committed checkpoint")
    partial = ref.partial
    points = list_commits(storage, layout)
    matches = [p for p in points if partial.matches(p)]
    if not matches:
        _not_found(storage, layout, f"no committed checkpoint matches {partial}")
    if len(matches) > 1:
        raise AmbiguousCheckpointError(
            f"resume_checkpoint {partial} matches {len(matches)} committed checkpoints: "
            f"{', '.join(map(str, matches))}; use a part that names one (e.g. U{matches[-1].update})"
        )
    record = read_commit(storage, layout, matches[0])
    if record is None:
        _not_found(storage, layout, f"checkpoint {matches[0]} vanished")
    return record


def _read_or_warn(storage: Storage, layout: StageLayout, it: TrainingIteration) -> CommitRecord | None:
    try:
        return read_commit(storage, layout, it)
    except CorruptRecordError as exc:
        log.warning("%s; skipping it", exc)
        return None


def _not_found(storage: Storage, layout: StageLayout, what: str) -> NoReturn:
    points = list_commits(storage, layout)
    if points:
        raise CheckpointNotFoundError(f"{what} in {layout.checkpoints_dir}; committed checkpoints: {', '.join(map(str, points))}")
    raise CheckpointNotFoundError(f"{what}: {_missing_context(storage, layout)}")


def resolve_record(storage: Storage, layout: StageLayout, ref: CheckpointRef, model_name: str) -> CommitRecord:
    """The record of the checkpoint ``ref`` names: a committed one, or, in a stage without
    any commit record, one that Noether wrote as single files."""
    try:
        return select_record(storage, layout, ref)
    except CheckpointNotFoundError:
        if list_commits(storage, layout):
            raise
        legacy = legacy_record(storage, layout, ref, model_name)
        if legacy is None:
            raise
        return legacy


def legacy_record(storage: Storage, layout: StageLayout, ref: CheckpointRef, model_name: str) -> CommitRecord | None:
    """A record for single-file checkpoints of ``model_name`` as Noether writes them, or
    None when the folder has none. Raises like :func:`select_checkpoint` when files exist
    but none matches."""
    groups: dict[str, list] = {}
    for entry in storage.list(layout.checkpoints_dir):
        if entry.is_dir:
            continue
        try:
            art = parse_artifact(entry.name, model_name=model_name)
        except InvalidNameError:
            continue
        groups.setdefault(art.checkpoint, []).append((art, entry))
    if not groups:
        return None
    canonical = {}
    for name in groups:
        try:
            canonical[str(parse_checkpoint(name))] = name
        except InvalidNameError:
            continue
    points = sorted((TrainingIteration.parse(c), n) for c, n in canonical.items() if c[:1] == "E")
    chosen: str | None = None
    if ref.is_alias:
        chosen = canonical.get(ref.alias_name)
        if chosen is None and ref.kind is CheckpointRef.Kind.LATEST and points:
            chosen = points[-1][1]
    elif ref.kind is CheckpointRef.Kind.ITERATION:
        chosen = canonical.get(str(ref.iteration))
    else:
        matches = [n for it, n in points if ref.partial.matches(it)]
        if len(matches) > 1:
            raise AmbiguousCheckpointError(f"resume_checkpoint {ref} matches {len(matches)} checkpoints: {', '.join(matches)}")
        chosen = matches[0] if matches else None
    if chosen is None:
        raise CheckpointNotFoundError(f"no checkpoint {ref} of model {model_name!r} in {layout.checkpoints_dir}; "
                                      f"checkpoints there: {', '.join(sorted(canonical))}")
    arts = tuple(ArtifactRecord(entry.name, art.kind.value, art.model_info, "consolidated", ())
                 for art, entry in sorted(groups[chosen], key=lambda p: p[1].name))
    try:
        iteration = TrainingIteration.parse(canonical_name(chosen))
    except InvalidNameError:
        iteration = _iteration_from_file(storage, layout, arts)
    return CommitRecord(iteration, layout.run_id, layout.stage_name, model_name, 1, arts)


def canonical_name(name: str) -> str:
    """The canonical spelling of a checkpoint name (best_model.x -> best.x)."""
    return str(parse_checkpoint(name))


def _iteration_from_file(storage: Storage, layout: StageLayout, arts: tuple[ArtifactRecord, ...]) -> TrainingIteration:
    from ..io.consolidated import iteration_of, read_file

    for kind in (ArtifactKind.TRAINER.value, ArtifactKind.MODEL.value):
        for art in arts:
            if art.kind == kind:
                it = iteration_of(read_file(storage, layout.artifact_path(art.name)))
                if it is not None:
                    return it
    raise CheckpointNotFoundError(f"the files {[a.name for a in arts]} record no training_iteration")
