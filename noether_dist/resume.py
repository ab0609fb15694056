"""Coordinated resume: select once, agree on every rank, then load (resharding).

Protocol, in order (every step is a collective over the control group):

1. **select** - the coordinator (rank 0, or ``coordinator_rank``) resolves ``resume_checkpoint`` with O(1) reads
   (alias, then commit record); a listing of ``_commits/`` only when the alias is missing
   or broken, or for a partial spec (E10, U100, S200). Only committed points are ever
   candidates. The choice is broadcast.
2. **stage** - per artifact, through its format (:func:`noether_dist.io.formats.artifact_io`).
   A DCP artifact (:mod:`noether_dist.io.dcp_format`): every rank tells the coordinator
   what it will load (keys, shapes, its shard chunks); the coordinator reads ``.metadata``
   (the one read of it), checks every rank's keys and shapes, and sends each rank only its
   part of it (the stored chunks that overlap its shards; the small replicated entries
   (optimizer ``step``, hyperparameters, the trainer's common state) only to the rank that
   reads each for everyone): no other rank holds the whole metadata, which grows with
   ranks x tensors. Then one DCP load per rank (resharding: saved on N ranks, loaded on M)
   fills fresh staging memory, nothing of the model yet: each rank reads the
   files its own shards lie in (from its own view of the store: per-node local disks are
   allowed), in parallel, and checks every file it reads whole against the commit record
   (size and CRC32, on the bytes loaded); each replicated entry is read by the one rank
   whose own file holds it and shared with one all_gather. No rank lists the store. A
   consolidated file (:mod:`noether_dist.io.consolidated_format`): every rank reads it
   whole and checks it (CRC32, keys and shapes). A file that is missing, short or corrupt
   is a reason, not an error.
3. **agree** - the ranks exchange their reasons. None: apply. A rank that cannot read
   the candidate makes every rank fall back together to the next older committed point
   (only when no checkpoint was asked for by name), or every rank raises the same error.
   A state that does not match the checkpoint raises on every rank (no fallback: an older
   checkpoint would not match either).
4. **apply** - the staged state is put into the model, optimizer and EMA models.

Requests per rank stay bounded as the world size grows: the coordinator reads the alias,
the commit record and one ``.metadata`` per artifact; every rank reads the data files
its own shards lie in (at the same world size: its own files), nothing else.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .dist.comm import Comm
from .format.records import ArtifactRecord, CommitRecord
from .config import Replicate, ResumeConfig
from .dist.topology import NodeTopology
from .stage import peer
from .errors import CheckpointNotFoundError, ConfigError
from .format.layout import StageLayout
from .format.names import ArtifactKind, TrainingIteration, normalize_model_info
from .io.formats import LoadTarget, artifact_io
from .io.format_api import VERIFY_MAX_BYTES_LOCAL, default_verify_max_bytes
from .stage.index import StageIndex, select_checkpoint
from .io.statedict import model_state, optimizer_state
from .io.storage import Storage, open_storage

__all__ = ["resume", "ResumeResult", "select_checkpoint", "load_checkpoint"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumeResult:
    """What was loaded, and where the continued run saves."""

    iteration: TrainingIteration
    record: CommitRecord
    layout: StageLayout
    """The stage that was resumed."""
    stage_name: str | None
    """The stage the continued run saves into (defaults to the resumed stage)."""
    trainer_state: dict[str, Any] = field(default_factory=dict)
    """The trainer state saved by rank 0."""
    rank_state: dict[str, Any] | None = None
    """This rank's own saved state, None when the checkpoint had no rank of this number."""
    fell_back_from: tuple[str, ...] = ()
    """Newer checkpoints skipped because some rank could not read them."""
    tier: str | None = None
    """With ``local_dir``: ``local`` or ``durable``, the tier it was loaded from."""

    @property
    def checkpoint(self) -> str:
        """The training-point name that was loaded."""
        return str(self.iteration)


@dataclass
class _Targets:
    model: Any
    model_sd: dict[str, Any]
    optimizer: Any = None
    optim_sd: dict[str, Any] | None = None
    ema: dict[str, tuple[Any, dict[str, Any]]] = field(default_factory=dict)


def resume(
    config: ResumeConfig | Mapping[str, Any],
    *,
    model: nn.Module | dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    ema: Mapping[str, nn.Module | dict[str, Any]] | None = None,
    model_name: str = "model",
    timeout_s: float | None = None,
    storage: Storage | None = None,
    verify_max_bytes: int | None = None,
    local_dir: str | None = None,
    process_group: Any = None,
    replicate: Replicate = Replicate.NONE,
    coordinator_rank: int | None = None,
) -> ResumeResult:
    """Resume model, optimizer, EMA models and trainer state from a previous run (collective).

    ``config`` is a :class:`ResumeConfig` or a root config mapping with the user's keys
    (``output_dir``, ``resume_run_id``, ``resume_stage_name``, ``stage_name``,
    ``resume_checkpoint``). Every rank loads the same checkpoint or every rank raises the
    same error. Files the load reads are checked against the commit record before anything
    is applied: every file a rank reads whole, by size and CRC32 of the bytes loaded (no
    second read); files of at most ``verify_max_bytes`` are always read whole (default
    256 MiB on local disks, 1 MiB on object stores), bigger ones only in the parts a rank
    needs when that is less than half (those parts are checked for length only). A file
    read whole is streamed: its items are loaded as their bytes arrive and its CRC32 is
    computed on those bytes, so memory holds a piece and an item, not the file. A single
    file is checked on the bytes loaded on object stores, and streamed through the CRC32
    first on local disks (up to ``verify_max_bytes``) before it is memory-mapped.
    ``verify_max_bytes=0`` turns the CRC32 check off.

    ``local_dir`` (two tiers: the local tier's node-local folder; ``output_dir`` is the
    durable tier): first the newest point every rank can read from its own local disk, when
    it is at least as new as the newest durable one (or, asked for by name, that point), with
    the usual agreement and fallback among local points; when there is none, the durable tier.

    ``process_group``: resume on a
    subgroup (its ranks alone take part, its first rank coordinates; DCP loads on the same
    ranks and reshards as on the default group); ``rank_state`` is then that of the rank
    with the same rank within the group. ``coordinator_rank`` (a global rank of the group)
    names another coordinator (the rank that selects and reads the shared metadata).

    ``replicate=Replicate.PEER`` (node-local disks saved with ``replicate: peer``: the local
    tier, else ``output_dir``): a node that lacks records or files of a candidate, or holds
    damaged ones, first fetches them from the nodes that keep copies
    (:mod:`noether_dist.stage.peer`), before the candidate is staged and agreed on.
    """
    if not isinstance(config, ResumeConfig):
        parsed = ResumeConfig.from_root_config(config)
        if parsed is None:
            raise ConfigError("resume needs resume_run_id in the config")
        config = parsed
    comm = Comm(timeout_s, process_group=process_group, coordinator_rank=coordinator_rank)
    storage = storage or open_storage(config.output_dir, config.storage)
    layout = StageLayout(config.output_dir, config.resume_run_id, config.resume_stage_name)
    targets = comm.run_everywhere(lambda: _targets(model, optimizer, ema))
    cache: dict[str, Any] = {}
    tier = None
    loaded = None
    if local_dir is not None:
        tier = "local"
        floor = None if config.explicit else comm.broadcast_from_coordinator(lambda: _newest_point(storage, layout, config))
        local_layout = StageLayout(local_dir, config.resume_run_id, config.resume_stage_name)
        local_storage = open_storage(local_dir)
        try:
            loaded = _select_load_and_agree(comm, local_storage, local_layout, config, targets, model_name,
                                            cache, VERIFY_MAX_BYTES_LOCAL if verify_max_bytes is None
                                            else verify_max_bytes, floor=floor,
                                            before_stage=_peer_restorer(comm, replicate, local_storage, local_layout))
            layout = local_layout
        except CheckpointNotFoundError as exc:
            log.warning("the local tier has no point every rank can read%s (%s); resuming from the durable tier",
                        f" at least as new as {floor}, the durable tier's newest" if floor else "", exc)
            tier = "durable"
    if loaded is None:
        if verify_max_bytes is None:
            verify_max_bytes = default_verify_max_bytes(storage)
        before_stage = _peer_restorer(comm, replicate, storage, layout) if local_dir is None else None
        loaded = _select_load_and_agree(comm, storage, layout, config, targets, model_name, cache, verify_max_bytes,
                                        before_stage=before_stage)
    record, skipped, staged, trainer = loaded
    trainer_state, rank_state = _apply(comm, targets, staged, trainer)
    log.info("resumed %s/%s at %s%s", config.resume_run_id, config.resume_stage_name or "-", record.iteration,
             f" from the {tier} tier" if tier else "")
    return ResumeResult(record.iteration, record, layout, config.continue_stage_name, trainer_state, rank_state,
                        skipped, tier)


def _peer_restorer(comm: Comm, replicate: Replicate, storage: Storage, layout: StageLayout
                   ) -> Callable[[CommitRecord], None] | None:
    """With peer copies: restore the records a node lacks now (collective), and return what
    restores a candidate's files before it is staged; None without."""
    if replicate is not Replicate.PEER:
        return None
    topology = NodeTopology.gather(comm)
    peer.restore_records(comm, topology, storage, layout)
    return lambda record: peer.restore(comm, topology, storage, layout, record)


def _newest_point(storage: Storage, layout: StageLayout, config: ResumeConfig) -> TrainingIteration | None:
    """The coordinator's look at the durable tier: the point ``latest`` resolves to, or None."""
    try:
        return StageIndex(storage, layout).resolve(config.checkpoint_ref).iteration
    except CheckpointNotFoundError:
        return None


def _targets(model, optimizer, ema) -> _Targets:
    sd = model_state(model)
    out = _Targets(model, sd)
    if optimizer is not None:
        if not isinstance(model, nn.Module):
            raise ConfigError("resuming an optimizer needs the model as an nn.Module")
        out.optimizer, out.optim_sd = optimizer, optimizer_state(model, optimizer)
    for info, ema_model in (ema or {}).items():
        norm = normalize_model_info(info)
        if norm is None:
            raise ConfigError("an EMA model needs a model_info such as 'ema_factor=0.9999'")
        out.ema[norm] = (ema_model, model_state(ema_model))
    return out


def _needed(record: CommitRecord, targets: _Targets, model_name: str) -> list[LoadTarget]:
    """Every artifact this resume reads, with the state (or module) to load it into."""
    if record.model_name != model_name:
        raise ConfigError(f"checkpoint {record.iteration} holds model {record.model_name!r}, not {model_name!r}")
    model_art = record.artifact(ArtifactKind.MODEL.value)
    if model_art is None:
        raise CheckpointNotFoundError(f"checkpoint {record.iteration} has no model file")
    out = [LoadTarget(model_art, "model", targets.model_sd, targets.model)]
    for info, (module, sd) in targets.ema.items():
        art = record.artifact(ArtifactKind.MODEL.value, info)
        if art is None:
            have = [a.model_info for a in record.artifacts if a.kind == "model" and a.model_info]
            raise CheckpointNotFoundError(f"checkpoint {record.iteration} has no model file with model_info {info!r}; it has: {have or 'none'}")
        out.append(LoadTarget(art, f"ema:{info}", sd, module))
    if targets.optim_sd is not None:
        art = record.artifact(ArtifactKind.OPTIM.value)
        if art is None:
            raise CheckpointNotFoundError(
                f"checkpoint {record.iteration} has no optimizer file, but full resumption needs one; "
                "load weights only with PreviousRunInitializer instead"
            )
        out.append(LoadTarget(art, "optim", targets.optim_sd, targets.optimizer, targets.model))
    for need in out:
        artifact_io(need.art.format).check_target(need)
    return out


@dataclass
class _Staged:
    """One artifact loaded into staging memory (nothing applied yet)."""

    need: LoadTarget
    value: Any
    """What its format's ``stage`` returned, for its ``apply``."""


def _stage_all(comm: Comm, storage: Storage, layout: StageLayout, record: CommitRecord, needed: list[LoadTarget],
               cache: dict[str, Any], verify_max_bytes: int) -> tuple[list[_Staged], _Staged | None, str | None]:
    """Load every artifact this resume needs into staging (collective); (staged artifacts,
    staged trainer artifact, why this rank cannot use this checkpoint or None). ``cache``
    gets what was staged, by path."""
    reasons: list[str] = []
    trainer = record.artifact(ArtifactKind.TRAINER.value)
    targets = needed + ([LoadTarget(trainer, "trainer", {})] if trainer is not None else [])
    prefetched = _prefetch(storage, layout, [t.art for t in targets]) if comm.is_coordinator else {}
    staged: list[_Staged] = []
    for target in targets:
        path = layout.artifact_path(target.art.name)
        value, reason = artifact_io(target.art.format).stage(comm, storage, path, target, verify_max_bytes,
                                                             prefetched.get(path))
        staged.append(_Staged(target, value))
        if value is not None:
            cache[path] = value
        if reason:
            reasons.append(reason)
    trainer_staged = staged.pop() if trainer is not None else None
    return staged, trainer_staged, "; ".join(reasons) or None


def _prefetch(storage: Storage, layout: StageLayout, arts: list[ArtifactRecord]) -> dict[str, Any]:
    """The coordinator's reads ahead of staging (every DCP artifact's ``.metadata``), all at
    once (one round trip instead of one per artifact): path -> what the format prefetched
    or the exception, which its ``stage`` raises inside its collective (so every rank raises it)."""
    jobs = [(layout.artifact_path(a.name), artifact_io(a.format)) for a in arts]

    def read(job: tuple[str, Any]) -> Any:
        path, fmt = job
        try:
            return fmt.prefetch(storage, path)
        except Exception as exc:  # noqa: BLE001 - raised on every rank by the format's stage
            return exc

    if len(jobs) < 2:
        return {}
    with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="noether-metadata") as pool:
        return {path: got for (path, _), got in zip(jobs, pool.map(read, jobs)) if got is not None}


def _select_load_and_agree(comm: Comm, storage: Storage, layout: StageLayout, config: ResumeConfig,
                           targets: _Targets, model_name: str, cache: dict[str, Any], verify_max_bytes: int,
                           floor: TrainingIteration | None = None,
                           before_stage: Callable[[CommitRecord], None] | None = None,
                           ) -> tuple[CommitRecord, tuple[str, ...], list[_Staged], _Staged | None]:
    """Select, stage and agree (collective); only points at least as new as ``floor``."""
    index = StageIndex(storage, layout)  # used on the coordinator only

    def select() -> CommitRecord:
        found = index.resolve_or_uncommitted(config.checkpoint_ref, model_name)
        if floor is not None and found.iteration < floor:
            raise CheckpointNotFoundError(f"the newest checkpoint in {layout.checkpoints_dir} is {found.iteration}, "
                                          f"older than {floor}")
        return found

    record = comm.broadcast_from_coordinator(select)
    skipped: list[str] = []
    while True:
        needed = comm.run_everywhere(lambda: _needed(record, targets, model_name))
        if before_stage is not None:
            before_stage(record)
        cache.clear()
        staged, trainer, reason = _stage_all(comm, storage, layout, record, needed, cache, verify_max_bytes)
        verdicts = comm.all_gather_results(lambda: reason)
        bad = {r: v for r, v in enumerate(verdicts) if v is not None}
        if not bad:
            return record, tuple(skipped), staged, trainer
        detail = "; ".join(f"rank {r}: {v}" for r, v in sorted(bad.items()))
        if config.explicit:
            raise CheckpointNotFoundError(
                f"checkpoint {record.iteration} (asked for as {config.resume_checkpoint!r}) cannot be read by "
                f"every rank: {detail}"
            )
        log.warning("checkpoint %s cannot be read by every rank (%s); all ranks fall back to an older one",
                    record.iteration, detail)
        skipped.append(str(record.iteration))
        current = record.iteration

        def older() -> CommitRecord:
            rec = index.newest(before=current)
            if rec is not None and (floor is None or rec.iteration >= floor):
                return rec
            raise CheckpointNotFoundError(
                f"no committed checkpoint in {layout.checkpoints_dir} can be read by every rank; "
                f"tried {', '.join(skipped)}; last problem: {detail}"
            )

        record = comm.broadcast_from_coordinator(older)


def _apply(comm: Comm, targets: _Targets, staged: list[_Staged], trainer: _Staged | None
           ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Put the staged state into the targets (collective: fails on every rank alike);
    return (trainer state, this rank's state)."""
    def apply_all() -> tuple[dict[str, Any], dict[str, Any] | None]:
        for st in staged:
            artifact_io(st.need.art.format).apply(st.value, st.need, comm.rank)
        if trainer is None:
            return {}, None
        return artifact_io(trainer.need.art.format).apply(trainer.value, trainer.need, comm.rank)

    return comm.run_everywhere(apply_all)


def load_checkpoint(record: CommitRecord, layout: StageLayout, storage: Storage, comm: Comm,
                    targets: _Targets, cache: dict[str, Any] | None = None, verify_max_bytes: int = 0
                    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load an agreed checkpoint into the targets (collective): stage every artifact, check
    it on every rank, then apply; return (trainer state, this rank's state). A rank that
    cannot read it makes every rank raise CheckpointNotFoundError before anything is applied."""
    needed = comm.run_everywhere(lambda: _needed(record, targets, record.model_name))
    staged, trainer, reason = _stage_all(comm, storage, layout, record, needed, {} if cache is None else cache,
                                         verify_max_bytes)
    bad = {r: v for r, v in enumerate(comm.all_gather_results(lambda: reason)) if v is not None}
    if bad:
        raise CheckpointNotFoundError(f"checkpoint {record.iteration} cannot be read by every rank: "
                                      + "; ".join(f"rank {r}: {v}" for r, v in sorted(bad.items())))
    return _apply(comm, targets, staged, trainer)
