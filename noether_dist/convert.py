"""Convert committed checkpoints between the sharded (DCP) and consolidated (single-file)
formats. Runs in one process; each artifact is held in memory once while it is converted.

The converted checkpoint is written under another output dir with the same run, stage and
Noether names, committed with its own record (format ``consolidated`` or ``dcp``), and the
aliases are copied.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from . import consolidated, dcp_io
from .commit import ArtifactRecord, CommitRecord, list_commits, read_alias, read_commit, write_alias, write_commit
from .errors import CheckpointNotFoundError, ConfigError
from .layout import StageLayout
from .names import TrainingIteration
from .save import TRAINER_COMMON_KEY, trainer_rank_key
from .statedict import pack_object, unpack_object
from .storage import Storage

__all__ = ["convert_stage", "ConvertReport"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertReport:
    """What a conversion wrote."""

    checkpoints: tuple[str, ...]
    bytes_written: int


def _ema_factor(model_info: str | None) -> float | None:
    if model_info and model_info.startswith("ema_factor="):
        try:
            return float(model_info.split("=", 1)[1])
        except ValueError:
            return None
    return None


def _to_file(src: Storage, dst: Storage, src_path: str, dst_path: str, art: ArtifactRecord,
             record: CommitRecord) -> dcp_io.FileRecord:
    full = dcp_io.load_full(src_path, src)
    if art.kind == "model":
        obj = consolidated.model_file(full, record.iteration, record.run_id, str(record.iteration),
                                      _ema_factor(art.model_info))
    elif art.kind == "optim":
        obj = full
    else:
        common = unpack_object(full.pop(TRAINER_COMMON_KEY)) if TRAINER_COMMON_KEY in full else {}
        ranks = {int(k.rsplit(".", 1)[1]): unpack_object(v) for k, v in full.items()
                 if k.startswith("noether.rank.")}
        obj = consolidated.trainer_file(common.get("state") or {}, ranks, record.iteration)
    with dcp_io.open_checksummed(dst, dst_path) as stream:
        torch.save(obj, stream)
    return dcp_io.FileRecord("", stream.size, stream.crc & 0xFFFFFFFF)


def _to_dcp(src: Storage, dst: Storage, src_path: str, dst_path: str, art: ArtifactRecord,
            record: CommitRecord) -> list[dcp_io.FileRecord]:
    obj = consolidated.read_file(src, src_path)
    if art.kind == "model":
        state = consolidated.state_dict_of(obj, src_path)
    elif art.kind == "optim":
        if obj.get("state") and not all(isinstance(k, str) for k in obj["state"]):
            raise ConfigError(f"{src_path} keys optimizer state by parameter index (Noether's own format); "
                              "converting it needs the model: load it with resume() and save again")
        state = obj
    else:
        common, ranks = consolidated.trainer_state_of(obj)
        state = {TRAINER_COMMON_KEY: pack_object({"training_iteration": record.iteration.to_dict(), "state": common})}
        state.update({trainer_rank_key(r): pack_object(v) for r, v in ranks.items()})
    return dcp_io.save_state(state, dst_path, dst, process_group=None)


def convert_stage(src: Storage, src_layout: StageLayout, dst: Storage, dst_layout: StageLayout, to: str,
                  checkpoints: list[str] | None = None, progress: Any = None) -> ConvertReport:
    """Convert the committed checkpoints of one stage (all, or those named) into ``to``
    (``consolidated`` or ``sharded``) under ``dst_layout``; commit each and copy aliases.
    ``progress`` (``add_total(n)``/``update(n)``/``describe(text)``, e.g.
    :class:`noether_dist.progress.Bar`) counts the source bytes converted."""
    if to not in ("consolidated", "sharded"):
        raise ConfigError(f"convert target {to!r} is not valid; use consolidated or sharded")
    points = list_commits(src, src_layout)
    if checkpoints:
        wanted = [TrainingIteration.parse(c) for c in checkpoints]
        missing = [str(w) for w in wanted if w not in points]
        if missing:
            raise CheckpointNotFoundError(f"not committed in {src_layout.checkpoints_dir}: {missing}; "
                                          f"committed: {[str(p) for p in points]}")
        points = wanted
    if not points:
        raise CheckpointNotFoundError(f"no committed checkpoint in {src_layout.checkpoints_dir}")
    dst.check_root(dst_layout.output_dir)
    total = 0
    done = []
    records = {it: read_commit(src, src_layout, it) for it in points}
    if progress is not None:
        progress.add_total(sum(a.total_bytes for r in records.values() for a in r.artifacts))
    for it in points:
        record = records[it]
        if read_commit(dst, dst_layout, it) is not None:
            log.info("%s already converted in %s", it, dst_layout.checkpoints_dir)
            if progress is not None:
                progress.update(sum(a.total_bytes for a in record.artifacts))
            continue
        arts = []
        for art in record.artifacts:
            if progress is not None:
                progress.describe(f"{it} {art.name}")
            src_path, dst_path = src_layout.artifact_path(art.name), dst_layout.artifact_path(art.name)
            dst.remove(dst_path, recursive=True)
            if to == "consolidated":
                if art.format == "consolidated":
                    raise ConfigError(f"{src_path} is already consolidated")
                files = (_to_file(src, dst, src_path, dst_path, art, record),)
            else:
                if art.format != "consolidated":
                    raise ConfigError(f"{src_path} is already sharded")
                files = tuple(_to_dcp(src, dst, src_path, dst_path, art, record))
            total += sum(f.size for f in files)
            if progress is not None:
                progress.update(art.total_bytes)
            arts.append(ArtifactRecord(art.name, art.kind, art.model_info,
                                       "consolidated" if to == "consolidated" else "dcp", files))
        new = CommitRecord(it, dst_layout.run_id, dst_layout.stage_name, record.model_name,
                           1 if to == "sharded" else record.world_size, tuple(arts), record.metrics)
        write_commit(dst, dst_layout, new)
        done.append(str(it))
    for entry in src.list(src_layout.aliases_dir):
        name = StageLayout.alias_of_file(entry.name)
        alias = read_alias(src, src_layout, name) if name else None
        if alias is not None and read_commit(dst, dst_layout, alias.iteration) is not None:
            write_alias(dst, dst_layout, alias)
    return ConvertReport(tuple(done), total)
