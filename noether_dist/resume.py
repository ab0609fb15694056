"""Coordinated resume: select once, agree on every rank, then load (resharding).

Protocol, in order (every step is a collective over the control group):

1. **select** - the coordinator (rank 0) resolves ``resume_checkpoint`` with O(1) reads
   (alias, then commit record); a listing of ``_commits/`` only when the alias is missing
   or broken, or for a partial spec (E10, U100, S200). Only committed points are ever
   candidates. The choice is broadcast.
2. **check** - every rank reads the DCP metadata of each artifact it needs from its own
   view of the store (per-node local disks are allowed), checks that its state matches
   the checkpoint's keys, and that the data files its load plan reads are present with
   the committed sizes.
3. **agree** - the ranks exchange their verdicts. All ok: load. A rank that cannot read
   the candidate makes every rank fall back together to the next older committed point
   (only when no checkpoint was asked for by name), or every rank raises the same error.
   A state that does not match the checkpoint raises on every rank (no fallback: an older
   checkpoint would not match either).
4. **load** - DCP loads each artifact (a checkpoint saved on N ranks loads on M ranks).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import consolidated, dcp_io
from .comm import Comm, current_rank as comm_rank
from .commit import ArtifactRecord, CommitRecord, CorruptRecordError, list_commits, read_commit
from .config import ResumeConfig
from .errors import CheckpointNotFoundError, ConfigError, NoetherDistError
from .layout import StageLayout
from .names import ArtifactKind, TrainingIteration, normalize_model_info
from .select import resolve_record, select_checkpoint
from .save import TRAINER_COMMON_KEY, trainer_rank_key
from .statedict import (apply_model_state, apply_optimizer_state, empty_like_packed, model_state,
                        optimizer_state, unpack_object)
from .storage import Storage, open_storage

__all__ = ["resume", "ResumeResult", "select_checkpoint", "load_checkpoint"]

log = logging.getLogger(__name__)
DEFAULT_VERIFY_MAX_BYTES = 256 * 2**20
# On object stores a CRC check is a second download: by default only small files (DCP
# metadata, trainer state) are verified there; sizes are always checked.
DEFAULT_VERIFY_MAX_BYTES_REMOTE = 2**20


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
) -> ResumeResult:
    """Resume model, optimizer, EMA models and trainer state from a previous run (collective).

    ``config`` is a :class:`ResumeConfig` or a root config mapping with the user's keys
    (``output_dir``, ``resume_run_id``, ``resume_stage_name``, ``stage_name``,
    ``resume_checkpoint``). Every rank loads the same checkpoint or every rank raises the
    same error. Files the load reads are checked against the commit record: sizes always,
    CRC32 for files of at most ``verify_max_bytes`` (an extra read; 0 turns it off;
    default 256 MiB on local disks, 1 MiB on object stores).
    """
    if not isinstance(config, ResumeConfig):
        parsed = ResumeConfig.from_root_config(config)
        if parsed is None:
            raise ConfigError("resume needs resume_run_id in the config")
        config = parsed
    comm = Comm(timeout_s)
    storage = storage or open_storage(config.output_dir, config.storage)
    if verify_max_bytes is None:
        verify_max_bytes = DEFAULT_VERIFY_MAX_BYTES if storage.is_local else DEFAULT_VERIFY_MAX_BYTES_REMOTE
    layout = StageLayout(config.output_dir, config.resume_run_id, config.resume_stage_name)
    targets = comm.each(lambda: _targets(model, optimizer, ema))
    cache: dict[str, Any] = {}
    record, skipped = _select_and_agree(comm, storage, layout, config, targets, model_name, cache, verify_max_bytes)
    trainer_state, rank_state = load_checkpoint(record, layout, storage, comm, targets, cache)
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


def _check_readable(storage: Storage, layout: StageLayout, record: CommitRecord, needed: list[_Need],
                    cache: dict[str, Any], verify_max_bytes: int = 0) -> str | None:
    """None if this rank can read all it needs, else why not. Key mismatches raise."""
    for need in needed:
        path = layout.artifact_path(need.art.name)
        if need.art.format == "consolidated":
            reason = _check_file(storage, path, need, cache, verify_max_bytes)
        else:
            metadata, reason = _metadata_or_reason(storage, path)
            if not reason:
                reason = _check_dcp(storage, path, need, metadata, verify_max_bytes)
        if reason:
            return reason
    trainer = record.artifact(ArtifactKind.TRAINER.value)
    if trainer is None:
        return None
    path = layout.artifact_path(trainer.name)
    if trainer.format == "consolidated":
        if not storage.exists(path):
            return f"{path} is missing"
        return _check_crcs(storage, path, trainer, [""], verify_max_bytes)
    metadata, reason = _metadata_or_reason(storage, path)
    if reason:
        return reason
    trainer_need = _Need(trainer, "trainer", _trainer_placeholders(metadata, comm_rank()), None)
    return _check_dcp(storage, path, trainer_need, metadata, verify_max_bytes, exact_keys=False)


def _trainer_placeholders(metadata: Any, rank: int) -> dict[str, Any]:
    """What this rank loads from a trainer artifact: the common state and its own, if saved."""
    sd: dict[str, Any] = {}
    for key in (TRAINER_COMMON_KEY, trainer_rank_key(rank)):
        meta = metadata.state_dict_metadata.get(key)
        if meta is not None:
            sd[key] = empty_like_packed(meta.size[0])
    return sd


def _metadata_or_reason(storage: Storage, path: str) -> tuple[Any, str | None]:
    """(DCP metadata, None), or (None, why this rank cannot read it)."""
    try:
        return dcp_io.read_metadata(path, storage), None
    except FileNotFoundError:
        return None, f"{path} has no DCP metadata"
    except NoetherDistError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreadable metadata is a reason to fall back
        return None, f"{path}/.metadata is unreadable: {type(exc).__name__}: {exc}"


def _check_dcp(storage: Storage, path: str, need: _Need, metadata: Any, verify_max_bytes: int, *,
               exact_keys: bool = True) -> str | None:
    sizes = {f.name: f.size for f in need.art.files}
    if exact_keys:  # (a trainer artifact holds every rank's own state: each rank loads a part)
        dcp_io.check_keys(need.state, metadata, f"{need.role} checkpoint {need.art.name}")
    present = {e.name: e.size for e in storage.list(path)}
    needed = sorted(dcp_io.files_needed(need.state, metadata) | {dcp_io.METADATA_FILE})
    for fname in needed:
        if fname not in present:
            return f"{path}/{fname} is missing"
        if fname in sizes and present[fname] != sizes[fname]:
            return f"{path}/{fname} has {present[fname]} bytes, the commit record says {sizes[fname]}"
    return _check_crcs(storage, path, need.art, needed, verify_max_bytes)


def _check_crcs(storage: Storage, path: str, art: ArtifactRecord, names: list[str], limit: int) -> str | None:
    """Compare CRC32s with the commit record for files of at most ``limit`` bytes (reading
    them costs one extra read; bigger files are checked by size only)."""
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


def _select_and_agree(comm: Comm, storage: Storage, layout: StageLayout, config: ResumeConfig,
                      targets: _Targets, model_name: str, cache: dict[str, Any],
                      verify_max_bytes: int) -> tuple[CommitRecord, tuple[str, ...]]:
    record = comm.on_coordinator(lambda: resolve_record(storage, layout, config.checkpoint_ref, model_name))
    skipped: list[str] = []
    while True:
        needed = comm.each(lambda: _needed(record, targets, model_name))
        cache.clear()
        verdicts = comm.on_all(lambda: _check_readable(storage, layout, record, needed, cache, verify_max_bytes))
        bad = {r: v for r, v in enumerate(verdicts) if v is not None}
        if not bad:
            return record, tuple(skipped)
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
            for it in reversed(list_commits(storage, layout)):
                if it < current:
                    try:
                        rec = read_commit(storage, layout, it)
                    except CorruptRecordError as exc:
                        log.warning("%s; skipping it", exc)
                        continue
                    if rec is not None:
                        return rec
            raise CheckpointNotFoundError(
                f"no committed checkpoint in {layout.checkpoints_dir} can be read by every rank; "
                f"tried {', '.join(skipped)}; last problem: {detail}"
            )

        record = comm.on_coordinator(older)


def load_checkpoint(record: CommitRecord, layout: StageLayout, storage: Storage, comm: Comm,
                    targets: _Targets, cache: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load the agreed checkpoint into the targets (collective); return (trainer state,
    this rank's state)."""
    cache = {} if cache is None else cache
    needed = _needed(record, targets, record.model_name)

    def load_all() -> None:
        for need in needed:
            path = layout.artifact_path(need.art.name)
            if need.art.format == "consolidated":
                obj = cache.pop(path, None)
                if need.role == "optim":
                    if obj is None:
                        obj = consolidated.check_optimizer_file(targets.model, targets.optimizer,
                                                                consolidated.read_file(storage, path), path)
                    consolidated.apply_optimizer_file(targets.model, targets.optimizer, obj)
                else:
                    obj = obj if obj is not None else consolidated.read_file(storage, path)
                    consolidated.load_model_file(need.module, consolidated.state_dict_of(obj, path))
            else:
                dcp_io.load_state(need.state, path, storage, process_group=comm.group)
                if need.role == "optim":
                    apply_optimizer_state(targets.model, targets.optimizer, need.state)
                else:
                    apply_model_state(need.module, need.state)

    comm.each(load_all)
    trainer = record.artifact(ArtifactKind.TRAINER.value)
    if trainer is None:
        return {}, None
    path = layout.artifact_path(trainer.name)
    if trainer.format == "consolidated":
        def load_file() -> tuple[dict[str, Any], dict[str, Any] | None]:
            common, ranks = consolidated.trainer_state_of(consolidated.read_file(storage, path))
            return dict(common), ranks.get(comm.rank)

        return comm.each(load_file)

    def load_trainer() -> tuple[dict[str, Any], dict[str, Any] | None]:
        sd = _trainer_placeholders(dcp_io.read_metadata(path, storage), comm.rank)
        dcp_io.load_state(sd, path, storage, process_group=comm.group)
        common = unpack_object(sd[TRAINER_COMMON_KEY]) if TRAINER_COMMON_KEY in sd else {}
        own = unpack_object(sd[trainer_rank_key(comm.rank)]) if trainer_rank_key(comm.rank) in sd else None
        return dict(common.get("state") or {}), own

    return comm.each(load_trainer)
