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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import dcp_io
from .catalog import list_runs, list_stages
from .comm import Comm
from .commit import CommitRecord, CorruptRecordError, list_commits, read_alias, read_commit
from .config import ResumeConfig
from .errors import AmbiguousCheckpointError, CheckpointNotFoundError, ConfigError, NoetherDistError
from .layout import StageLayout
from .names import ArtifactKind, CheckpointRef, TrainingIteration, normalize_model_info
from .save import TRAINER_COMMON_KEY, trainer_rank_key
from .statedict import (apply_model_state, apply_optimizer_state, empty_like_packed, model_state,
                        optimizer_state, unpack_object)
from .storage import Storage, open_storage

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
) -> ResumeResult:
    """Resume model, optimizer, EMA models and trainer state from a previous run (collective).

    ``config`` is a :class:`ResumeConfig` or a root config mapping with the user's keys
    (``output_dir``, ``resume_run_id``, ``resume_stage_name``, ``stage_name``,
    ``resume_checkpoint``). Every rank loads the same checkpoint or every rank raises the
    same error.
    """
    if not isinstance(config, ResumeConfig):
        parsed = ResumeConfig.from_root_config(config)
        if parsed is None:
            raise ConfigError("resume needs resume_run_id in the config")
        config = parsed
    comm = Comm(timeout_s)
    storage = storage or open_storage(config.output_dir, config.storage)
    layout = StageLayout(config.output_dir, config.resume_run_id, config.resume_stage_name)
    targets = comm.each(lambda: _targets(model, optimizer, ema))
    record, skipped = _select_and_agree(comm, storage, layout, config, targets, model_name)
    trainer_state, rank_state = load_checkpoint(record, layout, storage, comm, targets)
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
    if ref.kind is CheckpointRef.Kind.ITERATION:
        assert ref.iteration is not None
        if read_commit(storage, layout, ref.iteration) is None:
            return _not_found(storage, layout, f"checkpoint {ref.iteration} is not committed")
        return ref.iteration
    if ref.is_alias:
        alias = read_alias(storage, layout, ref.alias_name)
        if alias is not None:
            try:
                if read_commit(storage, layout, alias.iteration) is not None:
                    return alias.iteration
            except CorruptRecordError as exc:
                log.warning("%s", exc)
            log.warning("alias %s names %s, which is not committed; falling back to a listing", ref.alias_name, alias.iteration)
        if ref.kind is not CheckpointRef.Kind.LATEST:
            return _not_found(storage, layout, f"alias {ref.alias_name} does not exist")
        points = list_commits(storage, layout)
        if not points:
            return _not_found(storage, layout, "no committed checkpoint")
        return points[-1]
    partial = ref.partial
    assert partial is not None
    points = list_commits(storage, layout)
    matches = [p for p in points if partial.matches(p)]
    if not matches:
        return _not_found(storage, layout, f"no committed checkpoint matches {partial}")
    if len(matches) > 1:
        raise AmbiguousCheckpointError(
            f"resume_checkpoint {partial} matches {len(matches)} committed checkpoints: "
            f"{', '.join(map(str, matches))}; use a part that names one (e.g. U{matches[-1].update})"
        )
    return matches[0]


def _not_found(storage: Storage, layout: StageLayout, what: str) -> TrainingIteration:
    points = list_commits(storage, layout)
    if points:
        raise CheckpointNotFoundError(f"{what} in {layout.checkpoints_dir}; committed checkpoints: {', '.join(map(str, points))}")
    raise CheckpointNotFoundError(f"{what}: {_missing_context(storage, layout)}")


def _needed(record: CommitRecord, targets: _Targets, model_name: str) -> list[tuple[str, Any, dict[str, Any]]]:
    """(artifact name, kind, state to load into) for every artifact this resume reads."""
    if record.model_name != model_name:
        raise ConfigError(f"checkpoint {record.iteration} holds model {record.model_name!r}, not {model_name!r}")
    out = []
    model_art = record.artifact(ArtifactKind.MODEL.value)
    if model_art is None:
        raise CheckpointNotFoundError(f"checkpoint {record.iteration} has no model file")
    out.append((model_art.name, "model", targets.model_sd))
    for info, (_, sd) in targets.ema.items():
        art = record.artifact(ArtifactKind.MODEL.value, info)
        if art is None:
            have = [a.model_info for a in record.artifacts if a.kind == "model" and a.model_info]
            raise CheckpointNotFoundError(f"checkpoint {record.iteration} has no model file with model_info {info!r}; it has: {have or 'none'}")
        out.append((art.name, f"ema:{info}", sd))
    if targets.optim_sd is not None:
        art = record.artifact(ArtifactKind.OPTIM.value)
        if art is None:
            raise CheckpointNotFoundError(
                f"checkpoint {record.iteration} has no optimizer file, but full resumption needs one; "
                "load weights only with PreviousRunInitializer instead"
            )
        out.append((art.name, "optim", targets.optim_sd))
    return out


def _check_readable(storage: Storage, layout: StageLayout, record: CommitRecord,
                    needed: list[tuple[str, Any, dict[str, Any]]]) -> str | None:
    """None if this rank can read all it needs, else why not. Key mismatches raise."""
    sizes = {(a.name, f.name): f.size for a in record.artifacts for f in a.files}
    for name, what, sd in needed:
        path = layout.artifact_path(name)
        try:
            metadata = dcp_io.read_metadata(path, storage)
        except FileNotFoundError:
            return f"{path} has no DCP metadata"
        except NoetherDistError:
            raise
        except Exception as exc:  # noqa: BLE001 - unreadable metadata is a reason to fall back
            return f"{path}/.metadata is unreadable: {type(exc).__name__}: {exc}"
        dcp_io.check_keys(sd, metadata, f"{what} checkpoint {name}")
        present = {e.name: e.size for e in storage.list(path)}
        for fname in sorted(dcp_io.files_needed(sd, metadata)):
            if fname not in present:
                return f"{path}/{fname} is missing"
            want = sizes.get((name, fname))
            if want is not None and present[fname] != want:
                return f"{path}/{fname} has {present[fname]} bytes, the commit record says {want}"
    trainer = record.artifact(ArtifactKind.TRAINER.value)
    if trainer is not None and not storage.exists(layout.artifact_path(trainer.name) + "/" + dcp_io.METADATA_FILE):
        return f"{layout.artifact_path(trainer.name)} has no DCP metadata"
    return None


def _select_and_agree(comm: Comm, storage: Storage, layout: StageLayout, config: ResumeConfig,
                      targets: _Targets, model_name: str) -> tuple[CommitRecord, tuple[str, ...]]:
    ref = config.checkpoint_ref

    def first() -> CommitRecord:
        it = select_checkpoint(storage, layout, ref, model_name)
        record = read_commit(storage, layout, it)
        if record is None:
            raise CheckpointNotFoundError(f"checkpoint {it} vanished while resuming")
        return record

    record = comm.on_coordinator(first)
    skipped: list[str] = []
    while True:
        needed = comm.each(lambda: _needed(record, targets, model_name))
        verdicts = comm.on_all(lambda: _check_readable(storage, layout, record, needed))
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
                    targets: _Targets) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load the agreed checkpoint into the targets (collective); return (trainer state,
    this rank's state)."""
    group = comm.group

    def load_one(name: str, sd: dict[str, Any]) -> None:
        dcp_io.load_state(sd, layout.artifact_path(name), storage, process_group=group)

    needed = _needed(record, targets, record.model_name)
    comm.each(lambda: [load_one(name, sd) for name, _, sd in needed])
    apply_model_state(targets.model, targets.model_sd)
    for _, (ema_model, sd) in targets.ema.items():
        apply_model_state(ema_model, sd)
    if targets.optimizer is not None and targets.optim_sd is not None:
        apply_optimizer_state(targets.model, targets.optimizer, targets.optim_sd)
    trainer = record.artifact(ArtifactKind.TRAINER.value)
    if trainer is None:
        return {}, None

    def load_trainer() -> tuple[dict[str, Any], dict[str, Any] | None]:
        path = layout.artifact_path(trainer.name)
        metadata = dcp_io.read_metadata(path, storage)
        sd: dict[str, Any] = {}
        for key in (TRAINER_COMMON_KEY, trainer_rank_key(comm.rank)):
            meta = metadata.state_dict_metadata.get(key)
            if meta is not None:
                sd[key] = empty_like_packed(meta.size[0])
        dcp_io.load_state(sd, path, storage, process_group=group)
        common = unpack_object(sd[TRAINER_COMMON_KEY]) if TRAINER_COMMON_KEY in sd else {}
        own = unpack_object(sd[trainer_rank_key(comm.rank)]) if trainer_rank_key(comm.rank) in sd else None
        return dict(common.get("state") or {}), own

    return comm.each(load_trainer)
