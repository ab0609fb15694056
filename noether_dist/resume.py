"""Coordinated resume: select once, agree on every rank, then load (resharding).

Protocol, in order (every step is a collective over the control group):

1. **select** - the coordinator (rank 0) resolves ``resume_checkpoint`` with O(1) reads
   (alias, then commit record); a listing of ``_commits/`` only when the alias is missing
   or broken, or for a partial spec (E10, U100, S200). Only committed points are ever
   candidates. The choice is broadcast.
2. **stage** - per artifact: the coordinator reads its DCP ``.metadata`` (the one read of
   it) and broadcasts it with the names of the small replicated entries (optimizer
   ``step``, hyperparameters, the trainer's common state); every rank checks that its
   state matches the checkpoint's keys, then one DCP load (resharding: saved on N ranks,
   loaded on M) fills fresh staging memory, nothing of the model yet: each rank reads the
   files its own shards lie in (from its own view of the store: per-node local disks are
   allowed), in parallel, and checks every file it reads whole against the commit record
   (size and CRC32, on the bytes loaded); each replicated entry is read by the one rank
   whose own file holds it and shared with one all_gather. No rank lists the store. A
   file that is missing, short or corrupt is a reason, not an error.
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
import zlib
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .io import consolidated, dcp_io
from .dist.comm import Comm
from .format.records import ArtifactRecord, CommitRecord
from .config import ResumeConfig
from .errors import CheckpointNotFoundError, ConfigError, NoetherDistError
from .format.layout import StageLayout
from .format.names import ArtifactKind, TrainingIteration, normalize_model_info
from .format.trainer_keys import TRAINER_COMMON_KEY, state_of_common_entry, trainer_rank_key
from .stage.index import StageIndex, select_checkpoint
from .io.statedict import (apply_model_state, apply_optimizer_state, empty_like_packed, model_state,
                        optimizer_state, unpack_object)
from .io.storage import Storage, open_storage

__all__ = ["resume", "ResumeResult", "select_checkpoint", "load_checkpoint"]

log = logging.getLogger(__name__)
DEFAULT_VERIFY_MAX_BYTES = 256 * 2**20
# Every file a rank reads whole is checked (size and CRC32) on the bytes it loads. A file
# of which a rank needs only a part is read whole when it is at most this size (so that it
# can be checked), else only the parts it needs. On object stores those extra bytes cost
# more: 1 MiB there.
DEFAULT_VERIFY_MAX_BYTES_REMOTE = 2**20
REPLICATED_MAX_BYTES = 2**20
"""Plain (not DTensor) entries up to this size are read by one rank and shared."""


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
    process_group: Any = None,
) -> ResumeResult:
    """Resume model, optimizer, EMA models and trainer state from a previous run (collective).

    ``config`` is a :class:`ResumeConfig` or a root config mapping with the user's keys
    (``output_dir``, ``resume_run_id``, ``resume_stage_name``, ``stage_name``,
    ``resume_checkpoint``). Every rank loads the same checkpoint or every rank raises the
    same error. Files the load reads are checked against the commit record before anything
    is applied: every file a rank reads whole, by size and CRC32 of the bytes loaded (no
    second read); files of at most ``verify_max_bytes`` are always read whole (default
    256 MiB on local disks, 1 MiB on object stores), bigger ones only in the parts a rank
    needs when that is less than half (those parts are checked for length only).
    ``verify_max_bytes=0`` turns the CRC32 check off. ``process_group``: resume on a
    subgroup (its ranks alone take part, its first rank coordinates; DCP loads on the same
    ranks and reshards as on the default group); ``rank_state`` is then that of the rank
    with the same rank within the group.
    """
    if not isinstance(config, ResumeConfig):
        parsed = ResumeConfig.from_root_config(config)
        if parsed is None:
            raise ConfigError("resume needs resume_run_id in the config")
        config = parsed
    comm = Comm(timeout_s, process_group=process_group)
    storage = storage or open_storage(config.output_dir, config.storage)
    if verify_max_bytes is None:
        verify_max_bytes = DEFAULT_VERIFY_MAX_BYTES if storage.is_local else DEFAULT_VERIFY_MAX_BYTES_REMOTE
    layout = StageLayout(config.output_dir, config.resume_run_id, config.resume_stage_name)
    targets = comm.run_everywhere(lambda: _targets(model, optimizer, ema))
    cache: dict[str, Any] = {}
    record, skipped, staged, trainer = _select_load_and_agree(comm, storage, layout, config, targets, model_name,
                                                              cache, verify_max_bytes)
    trainer_state, rank_state = _apply(comm, targets, staged, trainer)
    log.info("resumed %s/%s at %s", config.resume_run_id, config.resume_stage_name or "-", record.iteration)
    return ResumeResult(record.iteration, record, layout, config.continue_stage_name, trainer_state, rank_state, skipped)


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


@dataclass
class _Need:
    art: ArtifactRecord
    role: str  # "model", "ema:<info>" or "optim"
    state: dict[str, Any]
    module: Any
    owner: Any = None  # the model an optimizer belongs to


def _needed(record: CommitRecord, targets: _Targets, model_name: str) -> list[_Need]:
    """Every artifact this resume reads, with the state (or module) to load it into."""
    if record.model_name != model_name:
        raise ConfigError(f"checkpoint {record.iteration} holds model {record.model_name!r}, not {model_name!r}")
    model_art = record.artifact(ArtifactKind.MODEL.value)
    if model_art is None:
        raise CheckpointNotFoundError(f"checkpoint {record.iteration} has no model file")
    out = [_Need(model_art, "model", targets.model_sd, targets.model)]
    for info, (module, sd) in targets.ema.items():
        art = record.artifact(ArtifactKind.MODEL.value, info)
        if art is None:
            have = [a.model_info for a in record.artifacts if a.kind == "model" and a.model_info]
            raise CheckpointNotFoundError(f"checkpoint {record.iteration} has no model file with model_info {info!r}; it has: {have or 'none'}")
        out.append(_Need(art, f"ema:{info}", sd, module))
    if targets.optim_sd is not None:
        art = record.artifact(ArtifactKind.OPTIM.value)
        if art is None:
            raise CheckpointNotFoundError(
                f"checkpoint {record.iteration} has no optimizer file, but full resumption needs one; "
                "load weights only with PreviousRunInitializer instead"
            )
        out.append(_Need(art, "optim", targets.optim_sd, targets.optimizer, targets.model))
    if any(n.art.format == "consolidated" and not isinstance(n.module, (nn.Module, torch.optim.Optimizer))
           for n in out):
        raise ConfigError("loading a single-file (consolidated) checkpoint needs nn.Module / optimizer targets")
    return out


@dataclass
class _Staged:
    """One artifact loaded into staging memory (nothing applied yet)."""

    need: _Need
    staging: dcp_io.Staging | None = None
    """DCP artifacts: the loaded values."""
    obj: Any = None
    """Single-file artifacts: the file's content."""


def _replicated_small(key: str, value: Any) -> bool:
    """Entries one rank reads for everyone: every value that is not a DTensor shard and is
    small (optimizer ``step``, hyperparameters). DCP's dedup stores each once, in whichever
    rank's file, so every rank reading them costs ws x ws requests."""
    if dcp_io.is_sharded(value):
        return False
    return not isinstance(value, torch.Tensor) or value.numel() * value.element_size() <= REPLICATED_MAX_BYTES


def _stage_dcp(comm: Comm, storage: Storage, path: str, art: ArtifactRecord, role: str, state_of: Any,
               shared: Any, verify_max_bytes: int, prefetched: dict[str, Any] | None = None
               ) -> tuple[dcp_io.Staging | None, str | None]:
    """Load one DCP artifact into staging memory (collective); (staging, None) or (None or
    partial staging, why this rank cannot use it).

    1. the coordinator reads ``.metadata`` (the only read of it) and names the replicated
       entries that one rank reads for everyone (``shared``); both are broadcast;
    2. every rank checks its keys against the metadata and allocates its staging;
    3. one DCP load, planned on the metadata cut down to this rank's chunks
       (:func:`dcp_io.metadata_for`): each rank reads its own entries and the shared ones
       that lie in its own files (:func:`dcp_io.reader_of`), checking each file it reads
       whole against the commit record;
    4. the shared entries are exchanged (one all_gather of small values).
    """
    def coordinator_part() -> tuple[Any, str | None, list[str]]:
        early = (prefetched or {}).get(path)
        if isinstance(early, BaseException):
            raise early
        metadata, reason = early if early is not None else _metadata_or_reason(storage, path)
        if reason or comm.world_size == 1:
            return metadata, reason, []
        flat = dcp_io.staging(state_of(metadata)).flat
        return metadata, None, sorted(k for k, v in flat.items() if shared(k, v))

    with dcp_io.paused_gc():  # the metadata is unpickled here on every rank
        metadata, reason, shared_keys = comm.broadcast_from_coordinator(coordinator_part)
    if reason:
        return None, reason  # the same on every rank: every rank stops here

    def prepare() -> dcp_io.Staging:
        state = state_of(metadata)
        if role != "trainer":  # (a trainer artifact holds every rank's own state: each rank loads a part)
            dcp_io.check_keys(state, metadata, f"{role} checkpoint {art.name}")
        return dcp_io.staging(state)

    staged = comm.run_everywhere(prepare)
    shared_set = set(shared_keys)
    mine = [k for k in shared_keys if dcp_io.reader_of(k, metadata, comm.world_size) == comm.rank]
    own = {k: v for k, v in staged.flat.items() if k not in shared_set}
    own.update({k: dcp_io.placeholder(k, metadata) for k in mine})
    report = comm.run_everywhere(lambda: dcp_io.load_checked(
        own, path, storage, metadata=dcp_io.metadata_for(own, metadata), files=art.files,
        verify=verify_max_bytes > 0, whole_max_bytes=verify_max_bytes, process_group=comm.control_group))
    if shared_keys:
        for part in comm.all_gather({k: own.pop(k) for k in mine}):
            for key, value in part.items():
                if key in staged.flat and not dcp_io.is_sharded(staged.flat[key]):
                    own[key] = value
    for key, value in own.items():  # DCP replaced non-tensors in the dict it was given
        old = staged.flat[key]
        if isinstance(old, torch.Tensor) and isinstance(value, torch.Tensor) and old is not value:
            old.copy_(value)
        else:
            staged.flat[key] = value
    return staged, "; ".join(report.problems) or None


def _stage_all(comm: Comm, storage: Storage, layout: StageLayout, record: CommitRecord, needed: list[_Need],
               cache: dict[str, Any], verify_max_bytes: int) -> tuple[list[_Staged], _Staged | None, str | None]:
    """Load every artifact this resume needs into staging (collective); (staged artifacts,
    staged trainer artifact, why this rank cannot use this checkpoint or None)."""
    reasons: list[str] = []
    staged: list[_Staged] = []
    trainer = record.artifact(ArtifactKind.TRAINER.value)
    prefetched = _prefetch_metadata(storage, layout, [n.art for n in needed] + ([trainer] if trainer else [])) \
        if comm.is_coordinator else {}
    for need in needed:
        path = layout.artifact_path(need.art.name)
        if need.art.format == "consolidated":
            reason = comm.run_everywhere(lambda: _check_file(storage, path, need, cache, verify_max_bytes))
            staged.append(_Staged(need, obj=cache.get(path)))
        else:
            staging, reason = _stage_dcp(comm, storage, path, need.art, need.role, lambda _md, n=need: n.state,
                                         _replicated_small, verify_max_bytes, prefetched)
            staged.append(_Staged(need, staging=staging))
        if reason:
            reasons.append(reason)
    trainer_staged = None
    if trainer is not None:
        path = layout.artifact_path(trainer.name)
        need = _Need(trainer, "trainer", {}, None)
        if trainer.format == "consolidated":
            def read_trainer() -> tuple[Any, str | None]:
                if not storage.exists(path):
                    return None, f"{path} is missing"
                reason = _check_crcs(storage, path, trainer, [""], verify_max_bytes)
                return (None if reason else consolidated.read_file(storage, path)), reason

            obj, reason = comm.run_everywhere(read_trainer)
            trainer_staged = _Staged(need, obj=obj)
        else:
            staging, reason = _stage_dcp(comm, storage, path, trainer, "trainer",
                                         lambda md: _trainer_placeholders(md, comm.rank),
                                         lambda key, _v: key == TRAINER_COMMON_KEY, verify_max_bytes, prefetched)
            trainer_staged = _Staged(need, staging=staging)
        if reason:
            reasons.append(reason)
    return staged, trainer_staged, "; ".join(reasons) or None


def _prefetch_metadata(storage: Storage, layout: StageLayout, arts: list[ArtifactRecord]) -> dict[str, Any]:
    """The coordinator's reads of every DCP artifact's ``.metadata``, all at once (one
    round trip instead of one per artifact): path -> (metadata, reason) or the exception,
    which :func:`_stage_dcp` raises inside its collective (so every rank raises it)."""
    paths = [layout.artifact_path(a.name) for a in arts if a.format == "dcp"]

    def read(path: str) -> Any:
        try:
            return _metadata_or_reason(storage, path)
        except Exception as exc:  # noqa: BLE001 - raised on every rank by _stage_dcp
            return exc

    if len(paths) < 2:
        return {}
    with ThreadPoolExecutor(max_workers=len(paths), thread_name_prefix="noether-metadata") as pool:
        return dict(zip(paths, pool.map(read, paths)))


def _trainer_placeholders(metadata: Any, rank: int) -> dict[str, Any]:
    """What this rank loads from a trainer artifact: the common state and its own, if saved."""
    sd: dict[str, Any] = {}
    for key in (TRAINER_COMMON_KEY, trainer_rank_key(rank)):
        meta = metadata.state_dict_metadata.get(key)
        if meta is not None:
            sd[key] = empty_like_packed(meta.size[0])
    return sd


def _metadata_or_reason(storage: Storage, path: str) -> tuple[Any, str | None]:
    """(DCP metadata, None), or (None, why it cannot be read)."""
    try:
        return dcp_io.read_metadata(path, storage), None
    except FileNotFoundError:
        return None, f"{path} has no DCP metadata"
    except NoetherDistError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreadable metadata is a reason to fall back
        return None, f"{path}/.metadata is unreadable: {type(exc).__name__}: {exc}"


def _check_crcs(storage: Storage, path: str, art: ArtifactRecord, names: list[str], limit: int) -> str | None:
    """Single files: compare CRC32s with the commit record for files of at most ``limit``
    bytes (reading them costs one extra read; bigger files are checked by size only)."""
    for rec in art.files:
        if rec.name in names and rec.size <= limit:
            where = f"{path}/{rec.name}" if rec.name else path
            data = storage.read(where)
            if zlib.crc32(data) & 0xFFFFFFFF != rec.crc32:
                return f"{where} is corrupt: CRC32 {zlib.crc32(data) & 0xFFFFFFFF:08x}, the commit record says {rec.crc32:08x}"
    return None


def _check_file(storage: Storage, path: str, need: _Need, cache: dict[str, Any], verify_max_bytes: int) -> str | None:
    reason = _check_crcs(storage, path, need.art, [""], verify_max_bytes)
    if reason:
        return reason
    try:
        obj = consolidated.read_file(storage, path)
    except FileNotFoundError:
        return f"{path} is missing"
    except NoetherDistError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged file is a reason to fall back
        return f"{path} is unreadable: {type(exc).__name__}: {exc}"
    if need.role == "optim":
        # matched by name and every shape checked here, before anything is loaded
        cache[path] = consolidated.check_optimizer_file(need.owner, need.module, obj, f"optimizer file {path}",
                                                        target=need.state)
    else:
        cache[path] = obj
        consolidated.check_model_keys(need.module, consolidated.state_dict_of(obj, path),
                                      f"{need.role} checkpoint {need.art.name}")
    return None


def _select_load_and_agree(comm: Comm, storage: Storage, layout: StageLayout, config: ResumeConfig,
                           targets: _Targets, model_name: str, cache: dict[str, Any], verify_max_bytes: int
                           ) -> tuple[CommitRecord, tuple[str, ...], list[_Staged], _Staged | None]:
    index = StageIndex(storage, layout)  # used on the coordinator only
    record = comm.broadcast_from_coordinator(lambda: index.resolve_or_legacy(config.checkpoint_ref, model_name))
    skipped: list[str] = []
    while True:
        needed = comm.run_everywhere(lambda: _needed(record, targets, model_name))
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
            if rec is not None:
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
            need = st.need
            if st.staging is None:  # a single file
                if need.role == "optim":
                    consolidated.apply_optimizer_file(targets.model, targets.optimizer, st.obj)
                else:
                    consolidated.load_model_file(need.module, consolidated.state_dict_of(st.obj, need.art.name))
            elif need.role == "optim":
                apply_optimizer_state(targets.model, targets.optimizer, st.staging.nested())
            elif isinstance(need.module, nn.Module):
                apply_model_state(need.module, st.staging.nested())
            else:
                st.staging.copy_into(need.state)
        if trainer is None:
            return {}, None
        if trainer.staging is None:
            common, ranks = consolidated.trainer_state_of(trainer.obj)
            return dict(common), ranks.get(comm.rank)
        flat = trainer.staging.flat
        common = unpack_object(flat[TRAINER_COMMON_KEY]) if TRAINER_COMMON_KEY in flat else {}
        own = unpack_object(flat[trainer_rank_key(comm.rank)]) if trainer_rank_key(comm.rank) in flat else None
        return state_of_common_entry(common), own

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
