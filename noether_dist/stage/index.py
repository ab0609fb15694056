"""The stage index: which checkpoints a stage holds, which are committed, what a name picks.

One :class:`StageIndex` answers every question about one stage's checkpoints folder, for
resume, verify, the catalog, retention and the CLI (modelled on Orbax's ``NameFormat``:
``find_all``, ``find_step``). It lists each folder at most once and parses each name once,
and only when a question needs it: ``latest`` and other aliases cost two reads (alias,
commit record) and no listing; a listing of ``_commits/`` only when an alias is missing or
broken, or for a partial spec (E10, U100, S200). Records and aliases are read at most once
too. An index is a snapshot: make a new one for a fresh look (nothing is cached across
indexes).

A stage without any commit record may hold checkpoints that Noether itself wrote
(consolidated files, no commit record): :meth:`StageIndex.resolve_or_uncommitted` finds those in the listing
of the folder and describes them by a synthesized record (format ``consolidated``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .commit import alias_files, commit_files, read_alias, read_commit
from .runs import list_runs, list_stages
from ..errors import AmbiguousCheckpointError, CheckpointNotFoundError, InvalidNameError
from ..format.layout import ALIASES_DIR, COMMITS_DIR, StageLayout
from ..format.names import (ArtifactFormat, ArtifactKind, ArtifactName, CheckpointRef, PartialIteration,
                            TrainingIteration, is_tag, parse_artifact, parse_checkpoint)
from ..format.records import AliasRecord, ArtifactRecord, CommitRecord, CorruptRecordError
from ..io.storage import Entry, Storage

__all__ = ["StageIndex", "Checkpoint", "Artifact", "select_checkpoint", "checkpoint_order"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Artifact:
    """One artifact in the checkpoints folder: its listing entry and its parsed name."""

    entry: Entry
    parsed: ArtifactName

    @property
    def name(self) -> str:
        """The file (or DCP folder) name."""
        return self.entry.name


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a stage as found: committed or not, with the artifacts it has."""

    name: str
    """``E.._U.._S..``, or a tag (``best.loss``) for Noether's tag files in a stage without commits."""
    iteration: TrainingIteration | None
    """The training point, None for a tag."""
    committed: bool
    """A commit record exists (it may still be corrupt: :meth:`StageIndex.record` says)."""
    artifacts: tuple[Artifact, ...]
    """Its artifacts in the folder, by name."""


def checkpoint_order(name: str) -> tuple:
    """Sort key of checkpoint names: training points oldest first, then tags by name."""
    try:
        return (0, TrainingIteration.parse(name), name)
    except ValueError:
        return (1, TrainingIteration(0, 0, 0), name)


class StageIndex:
    """One stage's checkpoints on one store: found once, parsed once, resolved as resume does.

    Listings (each at most once, on first use): :meth:`commit_files` (``_commits/``),
    :meth:`alias_files` (``_aliases/``), :meth:`entries` (the checkpoints folder). Reads
    (each at most once): :meth:`record`, :meth:`alias`. Built on those: :meth:`find_all`,
    :meth:`find`, :meth:`resolve`, :meth:`match`, :meth:`newest`, :meth:`aliases`. No
    collectives: in a distributed job only the coordinator uses it and broadcasts the answer.
    """

    def __init__(self, storage: Storage, layout: StageLayout) -> None:
        self.storage = storage
        self.layout = layout
        self._commit_files: dict[TrainingIteration, str] | None = None
        self._alias_files: dict[str, str] | None = None
        self._entries: list[Entry] | None = None
        self._found: dict[str, Checkpoint] | None = None
        self._records: dict[TrainingIteration, CommitRecord | None | CorruptRecordError] = {}
        self._aliases: dict[str, AliasRecord | None | CorruptRecordError] = {}

    # -- listings -------------------------------------------------------------------------
    def commit_files(self) -> dict[TrainingIteration, str]:
        """Committed training points, oldest first, with the path of each record as listed."""
        if self._commit_files is None:
            self._commit_files = commit_files(self.storage, self.layout)
        return self._commit_files

    def committed(self) -> list[TrainingIteration]:
        """Committed training points, oldest first (a record may still be corrupt)."""
        return list(self.commit_files())

    def alias_files(self) -> dict[str, str]:
        """Aliases by name, with the path of each file as listed."""
        if self._alias_files is None:
            self._alias_files = alias_files(self.storage, self.layout)
        return self._alias_files

    def entries(self) -> list[Entry]:
        """The listing of the checkpoints folder, as the store gives it."""
        if self._entries is None:
            self._entries = self.storage.list(self.layout.checkpoints_dir)
        return self._entries

    def find_all(self) -> list[Checkpoint]:
        """Every checkpoint of the stage, committed or not (a save that died, Noether's own
        files), in :func:`checkpoint_order`. Noether's tag files (``latest``, ``best_model.x``)
        beside committed points are copies written by convert and are left out."""
        return list(self._by_name().values())

    def find(self, name: str) -> Checkpoint | None:
        """The checkpoint of that name (``E.._U.._S..`` or a tag), committed or not, or None."""
        return self._by_name().get(name)

    def _by_name(self) -> dict[str, Checkpoint]:
        if self._found is None:
            committed = {str(it): it for it in self.commit_files()}
            by_point: dict[str, list[Artifact]] = {}
            for entry in self.entries():
                if entry.name in (COMMITS_DIR, ALIASES_DIR):
                    continue
                try:
                    parsed = parse_artifact(entry.name)
                except ValueError:
                    continue
                if committed and is_tag(parsed.checkpoint):
                    continue
                point = str(parse_checkpoint(parsed.checkpoint))
                by_point.setdefault(point, []).append(Artifact(entry, parsed))
            found = {}
            for name in sorted(set(by_point) | set(committed), key=checkpoint_order):
                it = committed.get(name)
                if it is None and checkpoint_order(name)[0] == 0:
                    it = TrainingIteration.parse(name)
                found[name] = Checkpoint(name, it, name in committed,
                                         tuple(sorted(by_point.get(name, []), key=lambda a: a.name)))
            self._found = found
        return self._found

    # -- reads ----------------------------------------------------------------------------
    def record(self, iteration: TrainingIteration) -> CommitRecord | None:
        """The commit record of a training point (one read, no listing), None if it never
        committed; CorruptRecordError if it exists but is damaged."""
        if iteration not in self._records:
            try:
                self._records[iteration] = read_commit(self.storage, self.layout, iteration)
            except CorruptRecordError as exc:
                self._records[iteration] = exc
        found = self._records[iteration]
        if isinstance(found, CorruptRecordError):
            raise found
        return found

    def alias(self, name: str, *, strict: bool = False) -> AliasRecord | None:
        """The alias (one read), None when it does not exist. A damaged alias is logged and
        read as None, or with ``strict`` raises CorruptRecordError."""
        if name not in self._aliases:
            try:
                self._aliases[name] = read_alias(self.storage, self.layout, name, strict=True)
            except CorruptRecordError as exc:
                self._aliases[name] = exc
        found = self._aliases[name]
        if isinstance(found, CorruptRecordError):
            if strict:
                raise found
            log.warning("%s; ignoring it", found)
            return None
        return found

    def aliases(self) -> dict[str, AliasRecord | None]:
        """Every alias of the stage by name (None: damaged, logged)."""
        return {name: self.alias(name) for name in self.alias_files()}

    # -- selection ------------------------------------------------------------------------
    def resolve(self, ref: CheckpointRef) -> CommitRecord:
        """The commit record ``ref`` names, as resume picks it. A training point costs one
        read; ``latest`` and other aliases two (alias, record), and a listing only when the
        alias is missing or broken (``latest`` then names the newest intact record); E10,
        U100, S200 one listing and one read. Raises CheckpointNotFoundError /
        AmbiguousCheckpointError listing what exists."""
        if ref.kind is CheckpointRef.Kind.ITERATION:
            record = self.record(ref.iteration)
            if record is None:
                raise self.not_found(f"checkpoint {ref.iteration} is not committed")
            return record
        if ref.is_alias:
            alias = self.alias(ref.alias_name)
            if alias is not None:
                record = self._intact(alias.iteration)
                if record is not None:
                    return record
                log.warning("alias %s names %s, which is not an intact commit; falling back to a listing",
                            ref.alias_name, alias.iteration)
            if ref.kind is not CheckpointRef.Kind.LATEST:
                raise self.not_found(f"alias {ref.alias_name} does not exist")
            record = self.newest()
            if record is None:
                raise self.not_found("no committed checkpoint")
            return record
        point = self.match(ref.partial)
        record = self.record(point)
        if record is None:
            raise self.not_found(f"checkpoint {point} vanished")
        return record

    def match(self, partial: PartialIteration) -> TrainingIteration:
        """The one committed training point a partial spec (E10, U100, S200) names;
        CheckpointNotFoundError for none, AmbiguousCheckpointError for several."""
        matches = [p for p in self.committed() if partial.matches(p)]
        if not matches:
            raise self.not_found(f"no committed checkpoint matches {partial}")
        if len(matches) > 1:
            raise AmbiguousCheckpointError(
                f"resume_checkpoint {partial} matches {len(matches)} committed checkpoints: "
                f"{', '.join(map(str, matches))}; use a part that names one (e.g. U{matches[-1].update})"
            )
        return matches[0]

    def newest(self, *, before: TrainingIteration | None = None) -> CommitRecord | None:
        """The newest committed checkpoint (older than ``before``, if given) whose record is
        intact; damaged records are logged and skipped. None when there is none."""
        for it in reversed(self.committed()):
            if before is None or it < before:
                record = self._intact(it)
                if record is not None:
                    return record
        return None

    def _intact(self, it: TrainingIteration) -> CommitRecord | None:
        try:
            return self.record(it)
        except CorruptRecordError as exc:
            log.warning("%s; skipping it", exc)
            return None

    def not_found(self, what: str) -> CheckpointNotFoundError:
        """The error for ``what`` does not exist, listing what does (committed checkpoints,
        else which runs and stages exist)."""
        points = self.committed()
        if points:
            return CheckpointNotFoundError(f"{what} in {self.layout.checkpoints_dir}; committed checkpoints: "
                                           f"{', '.join(map(str, points))}")
        return CheckpointNotFoundError(f"{what}: {self._missing_context()}")

    def _missing_context(self) -> str:
        layout = self.layout
        runs = list_runs(self.storage, layout.output_dir)
        if layout.run_id not in runs:
            return f"run {layout.run_id!r} does not exist under {layout.output_dir}; runs there: {runs or 'none'}"
        stages = list_stages(self.storage, layout.run_dir) or []
        shown = [s or "(no stage)" for s in stages]
        if (layout.stage_name or "") not in stages:
            return f"stage {layout.stage_name or '(no stage)'!r} does not exist in run {layout.run_id!r}; stages: {shown}"
        return f"no committed checkpoint in {layout.checkpoints_dir}"

    # -- Noether's own files --------------------------------------------------------------
    def resolve_or_uncommitted(self, ref: CheckpointRef, model_name: str) -> CommitRecord:
        """The record of the checkpoint ``ref`` names: a committed one (:meth:`resolve`), or,
        in a stage without any commit record, one that Noether wrote itself (consolidated files)."""
        try:
            return self.resolve(ref)
        except CheckpointNotFoundError:
            if self.committed():
                raise
            found = self.uncommitted_record(ref, model_name)
            if found is None:
                raise
            return found

    def uncommitted_record(self, ref: CheckpointRef, model_name: str) -> CommitRecord | None:
        """A record for the consolidated files of ``model_name`` that Noether wrote itself, or
        None when the folder has none. Raises like :meth:`resolve` when files exist but none
        matches."""
        groups: dict[str, list[tuple[ArtifactName, Entry]]] = {}
        for entry in self.entries():
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
                raise AmbiguousCheckpointError(f"resume_checkpoint {ref} matches {len(matches)} checkpoints: "
                                               f"{', '.join(matches)}")
            chosen = matches[0] if matches else None
        if chosen is None:
            raise CheckpointNotFoundError(f"no checkpoint {ref} of model {model_name!r} in "
                                          f"{self.layout.checkpoints_dir}; checkpoints there: {', '.join(sorted(canonical))}")
        arts = tuple(ArtifactRecord(entry.name, art.kind.value, art.model_info, ArtifactFormat.CONSOLIDATED, ())
                     for art, entry in sorted(groups[chosen], key=lambda p: p[1].name))
        try:
            iteration = TrainingIteration.parse(str(parse_checkpoint(chosen)))
        except InvalidNameError:
            iteration = self._iteration_from_file(arts)
        return CommitRecord(iteration, self.layout.run_id, self.layout.stage_name, model_name, 1, arts)

    def _iteration_from_file(self, arts: tuple[ArtifactRecord, ...]) -> TrainingIteration:
        from ..io.consolidated import iteration_of, read_file  # torch: only for Noether's tag files

        for kind in (ArtifactKind.TRAINER.value, ArtifactKind.MODEL.value):
            for art in arts:
                if art.kind == kind:
                    it = iteration_of(read_file(self.storage, self.layout.artifact_path(art.name)))
                    if it is not None:
                        return it
        raise CheckpointNotFoundError(f"the files {[a.name for a in arts]} record no training_iteration")


def select_checkpoint(storage: Storage, layout: StageLayout, ref: CheckpointRef,
                      model_name: str | None = None) -> TrainingIteration:
    """The committed training point ``ref`` names (:meth:`StageIndex.resolve`; no
    collective: the coordinator's part of resume)."""
    return StageIndex(storage, layout).resolve(ref).iteration
