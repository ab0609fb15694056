"""Integrity checks: every file of a commit record against the store, byte for byte.

A commit record lists every file each rank wrote, with its size and the CRC32 computed
while writing (:mod:`noether_dist.io.dcp_io`). :func:`verify_stage` checks each of those
files, several at a time: where the store keeps a full-object CRC32 (S3 objects written by
noether_dist: the store checked it on upload) it compares that with the record, one HEAD
per file and no bytes read (the fast path); elsewhere, or with ``read_all``, it reads the
file in full (streamed in chunks: a file is never held in memory) and computes the CRC32.
It also reports what is around the committed checkpoints that resume would trip over or
silently skip:

``missing``         a file the record lists is not in the store
``size``            a file has another size than the record says
``crc``             a file has the recorded size but another CRC32 (bit rot, torn write)
``corrupt_record``  a commit record exists but cannot be parsed (or names unsafe files)
``bad_alias``       an alias is unparsable, names another alias, or points to a training
                    point that is not committed (or whose record is corrupt)
``uncommitted``     artifacts without a commit record: a save that died (or is still
                    running); resume never selects them, retention removes them

Nothing here writes. Every read goes through :class:`~noether_dist.io.storage.Storage`
(retries with backoff; a permanent store error raises :class:`StorageError`).
"""

from __future__ import annotations

import enum
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from .index import StageIndex
from ..errors import CheckpointNotFoundError, ConfigError, InvalidNameError
from ..format.layout import StageLayout, join_url
from ..format.names import CheckpointRef, TrainingIteration, parse_artifact, parse_checkpoint, parse_resume_checkpoint
from ..format.records import CommitRecord, CorruptRecordError
from ..io.checksum import crc32
from ..io.storage import Storage

__all__ = ["DamageKind", "Damage", "CheckpointCheck", "StageReport", "VerifyReport", "file_crc32",
           "verify_record", "verify_stage", "parse_checkpoint_arg", "CHUNK_BYTES", "DEFAULT_JOBS", "ByteProgress"]

CHUNK_BYTES = 8 * 2**20
"""Bytes read per request while checksumming a file."""
DEFAULT_JOBS = 16
"""Files checked at the same time."""


class ByteProgress(Protocol):
    """Where verify reports progress, in bytes (e.g. :class:`noether_dist.tools.progress.Bar`);
    called from several threads."""

    def add_total(self, nbytes: int) -> None:
        """More work became known."""

    def update(self, nbytes: int) -> None:
        """``nbytes`` more are done."""


class DamageKind(str, enum.Enum):
    """What is wrong; the value is the spelling in reports and JSON."""

    MISSING = "missing"
    SIZE = "size"
    CRC = "crc"
    CORRUPT_RECORD = "corrupt_record"
    BAD_ALIAS = "bad_alias"
    UNCOMMITTED = "uncommitted"


@dataclass(frozen=True)
class Damage:
    """One problem: where, what kind, and the details (expected vs. found)."""

    path: str
    kind: DamageKind
    details: str
    checkpoint: str | None = None
    """The training point (or alias name) the damage belongs to, if any."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"path": self.path, "kind": self.kind.value, "details": self.details, "checkpoint": self.checkpoint}

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.path}: {self.details}"


@dataclass(frozen=True)
class CheckpointCheck:
    """The outcome for one training point."""

    checkpoint: str
    committed: bool
    """True when a parsable commit record exists."""
    files: int = 0
    """Files compared with the record."""
    bytes: int = 0
    """Bytes those files hold."""
    damages: tuple[Damage, ...] = ()
    bytes_read: int = 0
    """Bytes read to compute CRC32s (the rest was checked by the store's checksum)."""
    store_checked: int = 0
    """Files checked by comparing the store's CRC32 with the record, without reading them."""
    elsewhere: int = 0
    """``node_local``: files of other ranks that are not on this node's disk (not damage)."""

    @property
    def ok(self) -> bool:
        """True when nothing is wrong with this point."""
        return not self.damages

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"checkpoint": self.checkpoint, "committed": self.committed, "ok": self.ok, "files": self.files,
                "bytes": self.bytes, "bytes_read": self.bytes_read, "store_checked": self.store_checked,
                "elsewhere": self.elsewhere,
                "damages": [d.to_dict() for d in self.damages]}


@dataclass(frozen=True)
class StageReport:
    """The outcome for one stage: each checkpoint checked, plus alias problems."""

    layout: StageLayout
    checkpoints: tuple[CheckpointCheck, ...] = ()
    alias_damages: tuple[Damage, ...] = ()

    @property
    def damages(self) -> tuple[Damage, ...]:
        """Every damage of the stage, checkpoints first."""
        return tuple(d for c in self.checkpoints for d in c.damages) + self.alias_damages

    @property
    def ok(self) -> bool:
        """True when nothing is wrong in this stage."""
        return not self.damages

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"run_id": self.layout.run_id, "stage_name": self.layout.stage_name,
                "path": self.layout.checkpoints_dir, "ok": self.ok,
                "files": sum(c.files for c in self.checkpoints), "bytes": sum(c.bytes for c in self.checkpoints),
                "checkpoints": [c.to_dict() for c in self.checkpoints],
                "damages": [d.to_dict() for d in self.damages]}


@dataclass(frozen=True)
class VerifyReport:
    """The outcome over several stages (what ``noether-ckpt verify`` prints)."""

    stages: tuple[StageReport, ...] = field(default_factory=tuple)

    @property
    def damages(self) -> tuple[Damage, ...]:
        """Every damage found."""
        return tuple(d for s in self.stages for d in s.damages)

    @property
    def ok(self) -> bool:
        """True when nothing is wrong anywhere."""
        return not self.damages

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``damages`` is the flat list (with run and stage) for scripts."""
        flat = [{**d.to_dict(), "run_id": s.layout.run_id, "stage_name": s.layout.stage_name}
                for s in self.stages for d in s.damages]
        return {"ok": self.ok, "files": sum(c.files for s in self.stages for c in s.checkpoints),
                "bytes": sum(c.bytes for s in self.stages for c in s.checkpoints),
                "stages": [s.to_dict() for s in self.stages], "damages": flat}


def file_crc32(storage: Storage, path: str, *, chunk_bytes: int = CHUNK_BYTES,
               progress: ByteProgress | None = None) -> tuple[int, int]:
    """(size, CRC32) of the file at ``path``, streamed in pieces of ``chunk_bytes`` (never
    whole; one GET on S3). FileNotFoundError if it does not exist; a connection lost midway
    is picked up where it stopped (:meth:`Storage.open_read`)."""
    size, crc = 0, 0
    try:
        with storage.open_read(path) as stream:
            while chunk := stream.read(chunk_bytes):
                crc = crc32(chunk, crc)
                size += len(chunk)
                if progress is not None:
                    progress.update(len(chunk))
    except BaseException:
        if progress is not None:
            progress.update(-size)  # the caller accounts for a file it could not read
        raise
    return size, crc & 0xFFFFFFFF


def _safe_file_name(name: str) -> bool:
    """A file name inside an artifact: empty (the artifact is the file) or one plain component."""
    return name == "" or ("/" not in name and "\\" not in name and name not in (".", "..") and ".." not in name)


def _safe_artifact_name(name: str) -> bool:
    try:
        parse_artifact(name)
    except (InvalidNameError, ValueError):
        return False
    return "/" not in name and "\\" not in name and ".." not in name


@dataclass(frozen=True)
class _FileCheck:
    """One file to compare: where, what the record says, which checkpoint."""

    path: str
    size: int
    crc32: int
    checkpoint: str


@dataclass(frozen=True)
class _FileResult:
    damage: Damage | None
    size: int
    bytes_read: int
    by_store: bool


def _check_file(storage: Storage, job: _FileCheck, *, read_all: bool, chunk_bytes: int,
                progress: ByteProgress | None) -> _FileResult:
    cp = job.checkpoint
    try:
        if not read_all and storage.is_s3:
            size, crc = storage.stored_checksum(job.path)
            if crc is not None or size != job.size:
                if progress is not None:
                    progress.update(job.size)
                return _FileResult(_compare(job, size, crc, " (the store's checksum)"), size, 0, True)
        size, crc = file_crc32(storage, job.path, chunk_bytes=chunk_bytes, progress=progress)
        if progress is not None and size != job.size:
            progress.update(job.size - size)
        return _FileResult(_compare(job, size, crc, ""), size, size, False)
    except (FileNotFoundError, IsADirectoryError):
        if progress is not None:
            progress.update(job.size)
        return _FileResult(Damage(job.path, DamageKind.MISSING, f"listed in the commit record ({job.size} bytes) "
                                  "but not in the store", cp), 0, 0, False)


def _compare(job: _FileCheck, size: int, crc: int | None, source: str) -> Damage | None:
    if size != job.size:
        return Damage(job.path, DamageKind.SIZE, f"{size} bytes, the commit record says {job.size}", job.checkpoint)
    if crc is not None and crc != job.crc32:
        return Damage(job.path, DamageKind.CRC, f"CRC32 {crc:08x}{source}, the commit record says {job.crc32:08x}",
                      job.checkpoint)
    return None


def _record_jobs(layout: StageLayout, record: CommitRecord) -> tuple[list[_FileCheck], list[Damage]]:
    """The files ``record`` lists, and damages for names that are not safe to open."""
    cp = record.checkpoint
    jobs: list[_FileCheck] = []
    damages: list[Damage] = []
    for art in record.artifacts:
        if not _safe_artifact_name(art.name):
            damages.append(Damage(layout.commit_path(record.iteration), DamageKind.CORRUPT_RECORD,
                                  f"the record names an artifact {art.name!r} that is not a Noether file name", cp))
            continue
        base = layout.artifact_path(art.name)
        for rec in art.files:
            if not _safe_file_name(rec.name):
                damages.append(Damage(layout.commit_path(record.iteration), DamageKind.CORRUPT_RECORD,
                                      f"the record names a file {rec.name!r} outside {art.name}", cp))
                continue
            jobs.append(_FileCheck(join_url(base, rec.name) if rec.name else base, rec.size, rec.crc32, cp))
    return jobs, damages


def _other_node(damage: Damage | None) -> bool:
    """On one node's disk of a node-local (local tier) checkpoint: a missing shard of a rank
    other than 0 may live on another node (rank 0's files are mirrored to every node)."""
    if damage is None or damage.kind is not DamageKind.MISSING:
        return False
    match = re.match(r"__(\d+)_", damage.path.rsplit("/", 1)[-1])
    return match is not None and int(match.group(1)) != 0


def _verify_records(storage: Storage, layout: StageLayout, records: list[CommitRecord], *, jobs: int,
                    read_all: bool, chunk_bytes: int, progress: ByteProgress | None,
                    node_local: bool = False) -> list[CheckpointCheck]:
    """Check every file of ``records``, ``jobs`` at a time; one CheckpointCheck per record
    (no early exit: every damaged file is named)."""
    planned = [_record_jobs(layout, record) for record in records]
    flat = [job for file_jobs, _ in planned for job in file_jobs]
    if progress is not None:
        progress.add_total(sum(job.size for job in flat))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def run(job: _FileCheck) -> _FileResult | None:
        with lock:
            if errors:
                return None  # a store error ends the whole verify: do not start more
        try:
            return _check_file(storage, job, read_all=read_all, chunk_bytes=chunk_bytes, progress=progress)
        except BaseException as exc:
            with lock:
                errors.append(exc)
            raise

    if len(flat) <= 1 or jobs <= 1:
        results = [run(job) for job in flat]
    else:
        with ThreadPoolExecutor(max_workers=min(jobs, len(flat)), thread_name_prefix="noether-verify") as pool:
            futures = [pool.submit(run, job) for job in flat]
            for future in futures:
                future.exception()  # wait for all; the first error is raised below
        if errors:
            raise errors[0]
        results = [f.result() for f in futures]
    by_job = dict(zip(map(id, flat), results))
    checks = []
    for record, (file_jobs, damages) in zip(records, planned):
        outcome = [by_job[id(job)] for job in file_jobs]
        elsewhere = [r for r in outcome if node_local and r is not None and _other_node(r.damage)]
        outcome = [r for r in outcome if not any(r is e for e in elsewhere)]
        found = list(damages) + [r.damage for r in outcome if r is not None and r.damage is not None]
        checks.append(CheckpointCheck(record.checkpoint, True, len(file_jobs) - len(elsewhere),
                                      sum(r.size for r in outcome if r is not None), tuple(found),
                                      bytes_read=sum(r.bytes_read for r in outcome if r is not None),
                                      store_checked=sum(1 for r in outcome if r is not None and r.by_store),
                                      elsewhere=len(elsewhere)))
    return checks


def verify_record(storage: Storage, layout: StageLayout, record: CommitRecord, *,
                  progress: ByteProgress | None = None, jobs: int = DEFAULT_JOBS, read_all: bool = False,
                  chunk_bytes: int = CHUNK_BYTES) -> CheckpointCheck:
    """Compare every file ``record`` lists with the store: size, and CRC32 from the store's
    checksum or, where it has none (or with ``read_all``), from reading the file."""
    return _verify_records(storage, layout, [record], jobs=jobs, read_all=read_all, chunk_bytes=chunk_bytes,
                           progress=progress)[0]


def _check_alias(index: StageIndex, name: str, path: str,
                 records: dict[TrainingIteration, CommitRecord | None]) -> Damage | None:
    """A damage if the alias is bad: unparsable, naming another alias, or pointing to a
    point that is not committed or whose record is corrupt."""
    try:
        alias = index.alias(name, strict=True)
    except CorruptRecordError as exc:
        return Damage(path, DamageKind.BAD_ALIAS, f"unparsable: {exc}", name)
    if alias is None:  # removed since the listing
        return None
    if alias.name != name:
        return Damage(path, DamageKind.BAD_ALIAS, f"the file of alias {name!r} names alias {alias.name!r}", name)
    if alias.iteration not in index.commit_files():
        return Damage(path, DamageKind.BAD_ALIAS, f"points to {alias.iteration}, which is not committed", name)
    if alias.iteration in records and records[alias.iteration] is None:
        return Damage(path, DamageKind.BAD_ALIAS, f"points to {alias.iteration}, whose commit record is corrupt", name)
    return None


def parse_checkpoint_arg(text: object, what: str = "checkpoint") -> CheckpointRef:
    """A checkpoint as a tool argument: latest, last, best.<metric>, E.._U.._S.., or one of
    E<n>, U<n>, S<n>. InvalidNameError otherwise (so ``../x`` never becomes a path)."""
    try:
        return parse_checkpoint(text, what=what)
    except InvalidNameError:
        try:
            return parse_resume_checkpoint(text)
        except ConfigError:
            raise InvalidNameError(f"{what} {text!r} is not valid: use latest, last, best.<metric>, "
                                   "E<epoch>_U<update>_S<sample>, or one of E<n>, U<n>, S<n>") from None


def _select(index: StageIndex, ref: CheckpointRef) -> str | None:
    """The point ``ref`` names, as resume picks it (:meth:`StageIndex.resolve`). Where resume
    would refuse because of a damage, the point whose damage says why: a training point
    that exists but did not commit, or whose record is corrupt; for a bad alias other than
    latest None (the alias damage says why); for latest when every record is corrupt, the
    newest of them."""
    if ref.kind is CheckpointRef.Kind.ITERATION and index.find(str(ref.iteration)) is not None:
        return str(ref.iteration)
    if ref.kind is CheckpointRef.Kind.PARTIAL:
        return str(index.match(ref.partial))
    try:
        return str(index.resolve(ref).iteration)
    except CheckpointNotFoundError:
        if not ref.is_alias:
            raise
        if ref.kind is not CheckpointRef.Kind.LATEST:
            if ref.alias_name in index.alias_files():
                return None
            raise
        committed = index.committed()
        if not committed:
            raise
        return str(committed[-1])


def verify_stage(storage: Storage, layout: StageLayout, *, checkpoint: str | None = None,
                 progress: ByteProgress | None = None, jobs: int = DEFAULT_JOBS, read_all: bool = False,
                 chunk_bytes: int = CHUNK_BYTES, node_local: bool = False) -> StageReport:
    """Verify one stage: every committed checkpoint (or only ``checkpoint``: a training
    point, an alias such as latest or best.loss, or one of E10/U100/S200), leftovers
    without a commit record, and every alias (with ``checkpoint``: the alias it names).
    Files are checked ``jobs`` at a time; ``read_all`` reads every byte even where the
    store keeps a CRC32. ``node_local`` (one node's disk of the local tier): shards of
    ranks other than 0 that are not on this disk are counted as ``elsewhere``, not damage.

    Raises CheckpointNotFoundError / AmbiguousCheckpointError when ``checkpoint`` names
    nothing (or several); store errors raise StorageError.
    """
    index = StageIndex(storage, layout)
    ref = parse_checkpoint_arg(checkpoint) if checkpoint is not None else None
    records: dict[TrainingIteration, CommitRecord | None] = {}
    record_damages: dict[TrainingIteration, Damage] = {}
    for it, path in index.commit_files().items():
        try:
            record = index.record(it)
        except CorruptRecordError as exc:
            records[it] = None
            record_damages[it] = Damage(path, DamageKind.CORRUPT_RECORD, str(exc), str(it))
            continue
        if record is not None:  # else removed since the listing (retention): not committed any more
            records[it] = record
    if ref is None:
        names = [cp.name for cp in index.find_all()]
        to_check = index.alias_files()
    else:
        chosen = _select(index, ref)
        names = [chosen] if chosen is not None else []
        path = index.alias_files().get(ref.alias_name) if ref.is_alias else None
        to_check = {ref.alias_name: path} if path is not None else {}
    alias_damages = [d for d in (_check_alias(index, name, path, records) for name, path in to_check.items())
                     if d is not None]
    by_name = {str(it): it for it in index.commit_files()}
    to_read = [records[by_name[n]] for n in names if n in by_name and by_name[n] not in record_damages
               and records.get(by_name[n]) is not None]
    checked = {c.checkpoint: c for c in _verify_records(storage, layout, to_read, jobs=jobs, read_all=read_all,
                                                        chunk_bytes=chunk_bytes, progress=progress,
                                                        node_local=node_local)}
    checks = []
    for name in names:
        it = by_name.get(name)
        if it is not None and it in record_damages:
            checks.append(CheckpointCheck(name, False, damages=(record_damages[it],)))
        elif it is not None and records.get(it) is not None:
            checks.append(checked[records[it].checkpoint])
        else:
            why = (_UNCOMMITTED if index.commit_files() else
                   "no commit record: written by Noether itself (resume reads such files only in a stage without "
                   "any commit record) or by a save that did not finish; sizes and CRC32s cannot be checked")
            found = index.find(name)
            damages = tuple(Damage(layout.artifact_path(a.name), DamageKind.UNCOMMITTED, why, name)
                            for a in (found.artifacts if found is not None else ()))
            checks.append(CheckpointCheck(name, False, damages=damages))
    return StageReport(layout, tuple(checks), tuple(alias_damages))


_UNCOMMITTED = ("no commit record: a save that did not finish (or is still running); resume never selects it; the "
                "next save of this point removes it, so do retention and noether-ckpt prune once a newer one committed")


def report_json(report: VerifyReport) -> str:
    """The report as indented JSON."""
    return json.dumps(report.to_dict(), indent=1)
