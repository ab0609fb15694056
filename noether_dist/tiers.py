"""Two tiers: every save to a node-local tier, some points uploaded to a durable store.

Design (what runs where, in order):

- **Local tier.** A tiered :class:`~noether_dist.save.Checkpointer` saves every point to
  ``tiers.local.dir`` exactly as a ``node_local`` Checkpointer does (:func:`local_tier_config`):
  each rank writes its own shards to its node's disk, rank 0's files, the DCP metadata and
  the records are mirrored to every node leader, and the local commit record is written
  once every rank reported size and CRC32. Retention keeps ``keep_last`` points, never a
  point whose upload is running (:meth:`DurableUploader.protected`).
- **Durable tier.** A point due for the durable tier (``tiers.durable.every_updates``, or a
  ``last`` save) is staged once: :meth:`DurableUploader.start` queues an upload of the point's
  *local* files on one background thread (at most one upload in flight: a new one first waits
  for the previous), with a gloo group of its own; the thread only agrees and commits, the
  bytes are read and sent by each rank's upload process (:class:`~noether_dist.io.upload.UploadProcess`,
  a child process started with the Checkpointer, so the upload takes neither the training
  process's CPU time nor its GIL). The upload, every rank at once:

  1. the coordinator checks the durable commit record does not exist yet and removes what an
     earlier, killed upload of the point left;
  2. every rank's upload process sends the local files the rank wrote (``__<rank>_*.distcp``;
     rank 0 also the ``.metadata``) to the durable store, paced to ``bandwidth_mb_s``, reading
     each once: its size and CRC32 are checked against the local commit record as the bytes go
     out (a file of one PUT carries the record's CRC32, which the store checks too), and a
     mismatch fails the upload before the file counts as sent (:func:`~noether_dist.io.upload.send_file`);
  3. the ranks exchange what they uploaded; the coordinator checks that every file of the
     local record arrived with its size and CRC32, then writes ``latest``, the durable commit
     record (the local record: an ordinary commit record that resume, ``verify`` and
     ``list`` read as any other) and the other aliases, then applies ``tiers.durable.retention``.

  A failure anywhere (the store, a dead rank: the others' gloo collective fails, an upload
  process that died or made no progress for ``timeout_s``: the next upload starts a new one)
  commits nothing durable; the local copy is untouched. It is raised on every rank, as an
  :class:`~noether_dist.errors.UploadError`, at the next ``save`` (after that save's own local
  save was done: the local tier goes on), ``wait`` or ``close``.
- **Resume** (:func:`noether_dist.resume.resume` with ``local_dir``): the newest point every
  rank can read from its local tier, when it is at least as new as the newest durable one,
  else the durable tier, with resume's usual agreement and fallback.

Peer replication (``tiers.local.replicate: peer``, :mod:`noether_dist.stage.peer`): the
local tier's node_local Checkpointer gets ``replicate`` (:func:`local_tier_config`), so each
rank's own files are copied to the next node's disk inside the local save, before the local
commit record (a committed local point always has its copy, or the save failed); and
:func:`noether_dist.resume.resume`'s local-tier attempt first fetches what a node lacks from
the copies (``replicate=``). A node and its peer both lost: the local tier cannot serve the
point, and resume falls to the durable tier.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .config import CheckpointerConfig
from .dist.comm import Comm
from .errors import AliasUpdateError, NoetherDistError, UploadError
from .format.layout import StageLayout
from .format.names import TrainingIteration
from .io.dcp_io import writer_rank
from .io.storage import Storage, StorageOptions, open_storage
from .io.upload import FileJob, UploadProcess, send_files
from .format.records import AliasRecord, CommitRecord, FileRecord
from .stage.commit import move_aliases, publish, read_alias, read_commit
from .stage.retention import RetentionPolicy, prune

__all__ = ["local_tier_config", "DurableUploader"]

log = logging.getLogger(__name__)


def local_tier_config(config: CheckpointerConfig) -> CheckpointerConfig:
    """The config of the local tier's saves: ``node_local`` on ``tiers.local.dir``, keeping
    ``keep_last`` points, no tiers."""
    local = config.tiers.local
    return dataclasses.replace(config, output_dir=local.dir, node_local=True, tiers=None, storage=StorageOptions(),
                               retention=RetentionPolicy(keep_last=local.keep_last), replicate=local.replicate)


class DurableUploader:
    """The durable tier of a tiered Checkpointer (see the module docstring for the protocol).

    Built on every rank (a collective: it makes a gloo group for the upload thread and has the
    coordinator check the durable store). :meth:`collect` and :meth:`start` are called by the
    Checkpointer inside its collective ``save``, in the same order on every rank.
    """

    def __init__(self, config: CheckpointerConfig, local_storage: Storage, local_layout: StageLayout,
                 comm: Comm, *, storage: Storage | None = None) -> None:
        self.tier = config.tiers.durable
        self.best_metrics = dict(config.best_metrics)
        self.local_storage, self.local_layout = local_storage, local_layout
        self.storage = storage or open_storage(config.output_dir, config.storage)
        self.layout = StageLayout(config.output_dir, config.run_id, config.stage_name)
        comm.broadcast_from_coordinator(lambda: self.storage.check_root(config.output_dir))
        self.comm = Comm(self.tier.timeout_s, coordinator_rank=comm.coordinator_rank, private=True)
        # The byte work runs in a child process, which opens the store from the config; a
        # Storage object passed in cannot go there, so its uploads run on the upload thread.
        self.process = UploadProcess(config.output_dir, config.storage, self.tier.bandwidth_mb_s) \
            if storage is None else None
        """The child process that reads and sends this rank's files (None: the upload thread does)."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="noether-ckpt-upload")
        self._pending: Future[CommitRecord | None] | None = None
        self._uploading: set[TrainingIteration] = set()
        self._lock = threading.Lock()
        self.last_upload_s: float | None = None
        """Seconds the last upload took on this rank (reading, sending, agreeing, committing)."""

    # -- called by the Checkpointer -------------------------------------------------------
    def due(self, iteration: TrainingIteration) -> bool:
        """True when ``iteration`` is due for the durable tier (``every_updates``)."""
        return iteration.update % self.tier.every_updates == 0

    @property
    def busy(self) -> bool:
        """True while an upload is queued or running on this rank."""
        return self._pending is not None and not self._pending.done()

    def protected(self) -> set[TrainingIteration]:
        """Points the local tier must keep: the one being uploaded."""
        with self._lock:
            return set(self._uploading)

    def after_local_commit(self, comm: Comm, record: CommitRecord) -> None:
        """Every rank, after each local commit (collective on ``comm``). Nothing to do yet:
        peer copies are made before the local commit (:func:`noether_dist.stage.peer.replicate`)."""

    def collect(self, comm: Comm, *, block: bool) -> NoetherDistError | None:
        """Collective on ``comm``: the outcome of the upload in flight, if it ended on every
        rank (or, with ``block``, once it ends): None when it succeeded or is still running,
        else its failure (:class:`UploadError`, or :class:`AliasUpdateError` when the durable
        commit was written but an alias was not moved), the same on every rank. The caller
        raises it."""
        if self._pending is None:
            return None
        if not block and not comm.all_true(self._pending.done()):
            return None
        pending, self._pending = self._pending, None
        try:
            comm.run_everywhere(pending.result)
        except NoetherDistError as exc:
            if isinstance(exc, (UploadError, AliasUpdateError)):  # the latter: committed, an alias not moved
                return exc
            err = UploadError(f"uploading to the durable tier {self.layout.checkpoints_dir} failed, nothing was "
                              f"committed there (the local tier keeps the point): {exc}")
            err.__cause__ = exc
            return err
        return None

    def start(self, local: Future | Any, iteration: TrainingIteration, aliases: tuple[str, ...],
              metrics: dict[str, float]) -> None:
        """Queue the upload of ``iteration`` once its local save (``local``: a SaveResult, or
        the Future of an asynchronous one) committed. Call :meth:`collect` with ``block``
        first: at most one upload is in flight."""
        with self._lock:
            self._uploading.add(iteration)

        def job() -> CommitRecord | None:
            try:
                result = local.result() if isinstance(local, Future) else local
                return self._upload(result.record, aliases, metrics)
            finally:
                with self._lock:
                    self._uploading.discard(iteration)

        self._pending = self._executor.submit(job)

    def close(self) -> None:
        """Stop the upload thread and process (after :meth:`collect` with ``block``)."""
        self._executor.shutdown(wait=True)
        if self.process is not None:
            self.process.close()

    # -- the upload (upload thread, every rank) -------------------------------------------
    def _upload(self, record: CommitRecord, aliases: tuple[str, ...], metrics: dict[str, float]) -> CommitRecord:
        comm = self.comm
        started = time.monotonic()
        fresh, previous = comm.broadcast_from_coordinator(lambda: self._prepare(record))
        if not fresh:
            log.info("%s is already committed on the durable tier: moving aliases only", record.iteration)
            comm.broadcast_from_coordinator(lambda: move_aliases(self.storage, self.layout, record.iteration, aliases, metrics,
                                                     self.best_metrics))
            return record
        reports = comm.all_gather_results(lambda: self._send(record, comm.rank, comm.world_size))
        durable = dataclasses.replace(record, created_at="")

        def commit() -> tuple[str, ...]:
            self._check_reports(record, reports)
            return publish(self.storage, self.layout, durable, aliases, self.best_metrics, previous)

        moved = comm.broadcast_from_coordinator(commit)
        self.last_upload_s = time.monotonic() - started
        log.info("uploaded %s to the durable tier in %.2fs (%d bytes; aliases %s)", record.iteration,
                 self.last_upload_s, record.total_bytes, ", ".join(moved) or "none")
        policy = self.tier.retention
        if policy is not None and not policy.keeps_everything:
            try:
                comm.broadcast_from_coordinator(lambda: prune(self.storage, self.layout, policy))
            except NoetherDistError as exc:  # committed; a failed prune only leaves files behind
                log.error("durable retention after %s failed (nothing committed was lost): %s", record.iteration, exc)
        return record

    def _prepare(self, record: CommitRecord) -> tuple[bool, AliasRecord | None]:
        """Coordinator: (False, _) when the point is committed on the durable tier already;
        else remove what an earlier upload of it left and return (True, durable ``latest``)."""
        if read_commit(self.storage, self.layout, record.iteration) is not None:
            return False, None
        present = {e.name for e in self.storage.list(self.layout.checkpoints_dir)}
        for art in record.artifacts:
            if art.name in present:
                log.warning("removing %s left by an upload that never committed", self.layout.artifact_path(art.name))
                self.storage.remove(self.layout.artifact_path(art.name), recursive=True)
        return True, read_alias(self.storage, self.layout, "latest")

    def _send(self, record: CommitRecord, rank: int, world_size: int) -> list[tuple[str, FileRecord]]:
        """This rank's part: each local file it wrote, checked against the record while it is
        uploaded (by the upload process, else here); what was sent."""
        mine = [(art.name, rec) for art in record.artifacts for rec in art.files
                if writer_rank(rec.name, record.world_size) % world_size == rank]
        jobs = [FileJob(self.local_storage.local_path(f"{self.local_layout.artifact_path(name)}/{rec.name}"),
                        f"{self.layout.artifact_path(name)}/{rec.name}", rec.size, rec.crc32) for name, rec in mine]
        if self.process is not None:
            self.process.upload(jobs, self.tier.timeout_s)
        else:
            send_files(self.storage, jobs, self.tier.bandwidth_mb_s)
        return [(name, FileRecord(rec.name, rec.size, rec.crc32)) for name, rec in mine]

    @staticmethod
    def _check_reports(record: CommitRecord, reports: list[list[tuple[str, FileRecord]]]) -> None:
        expected = {(art.name, rec) for art in record.artifacts for rec in art.files}
        got = [item for part in reports for item in part]
        if len(got) != len(set(got)) or set(got) != expected:
            missing = sorted(f"{a}/{r.name}" for a, r in expected - set(got))
            raise UploadError(f"the ranks' uploads of {record.iteration} do not match its commit record "
                              f"(missing or different: {missing or 'a file sent twice'}); nothing was committed")
