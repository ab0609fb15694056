"""Convert committed checkpoints between the sharded (DCP) and consolidated (single-file)
formats. Runs in one process; each artifact is held in memory once while it is converted.

The converted checkpoint is written under another output dir with the same run, stage and
Noether names, committed with its own record (format ``consolidated`` or ``dcp``), and the
aliases are copied.

To consolidated, the files are what Noether's own tools read: EMA files spelled
``ema=<factor>``, optimizer files in Noether's layout (index-keyed with
``param_idx_to_name``), ``model_config``/``config_kind`` in model files when the saved
trainer state has them, and for every alias a copy under Noether's tag
(``{model}_cp=latest_*.th``, ``cp=last``, ``cp=best_model.<metric>``), and the stage's
``hp_resolved.yaml`` if it has one (``noether-eval`` starts from it). A CompositeModel,
which the adapter saves as one model and one optimizer artifact (keys ``encoder.*``, ...),
also gets the files Noether writes for it: per submodel a model file (the submodel's own
keys, ``model_config``/``config_kind`` from the trainer state's ``model_configs``) and an
optimizer file (``comp.encoder_cp=..._model.th``, ``..._optim.th``), and a submodel's EMA
under the submodel's name (``comp.encoder_ema=<factor>_cp=...``). Those tag and submodel
files are not part of any commit record: our own reader selects through commit records and
aliases and reads the whole-model artifacts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..io import consolidated, dcp_io
from ..format.records import ArtifactRecord, CommitRecord
from ..stage.commit import read_commit, write_alias, write_commit
from ..stage.index import StageIndex
from ..errors import CheckpointNotFoundError, ConfigError
from ..format.layout import StageLayout, join_url
from ..format.names import (NOETHER_RUN_CONFIG, ArtifactKind, CheckpointRef, TrainingIteration, ema_factor_of,
                    format_artifact, noether_model_info, noether_tag, normalize_model_info, parse_checkpoint)
from ..format.trainer_keys import (MODEL_CONFIGS_KEY, TRAINER_COMMON_KEY, common_entry, rank_of_trainer_key,
                                   state_of_common_entry, trainer_rank_key)
from ..io.optim_file import names_from_file, to_noether_layout
from ..io.statedict import pack_object, unpack_object
from ..io.storage import Storage

__all__ = ["convert_stage", "ConvertReport"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertReport:
    """What a conversion wrote."""

    checkpoints: tuple[str, ...]
    bytes_written: int


def _model_configs(trainer: dict[str, Any]) -> dict[str, Any]:
    return state_of_common_entry(trainer).get(MODEL_CONFIGS_KEY) or {}


def _file_object(full: dict[str, Any], art: ArtifactRecord, record: CommitRecord, trainer: dict[str, Any]) -> Any:
    """What Noether stores in the single file of one artifact."""
    if art.kind == "model":
        return consolidated.model_file(full, record.iteration, record.run_id, str(record.iteration),
                                       ema_factor_of(art.model_info), _model_configs(trainer).get(record.model_name))
    if art.kind == "optim":
        return to_noether_layout(full, f"optimizer of {record.iteration}")
    ranks = {rank: unpack_object(v) for k, v in full.items() if (rank := rank_of_trainer_key(k)) is not None}
    return consolidated.trainer_file(state_of_common_entry(trainer), ranks, record.iteration)


def _submodel_files(full: dict[str, Any], art: ArtifactRecord, record: CommitRecord,
                    trainer: dict[str, Any]) -> list[tuple[str, str | None, Any]]:
    """(model name, model_info, file object) of the files Noether writes for the submodels of
    a CompositeModel, which the adapter saves as ONE model and ONE optimizer artifact: a model
    file (with the submodel's model_config) and an optimizer file per submodel
    (``comp.encoder_cp=..._model.th``, ``..._optim.th``), and a submodel's EMA under the
    submodel's name (``comp.encoder_ema=0.9_cp=...``, with the whole model's config, as
    Noether's EmaCallback writes it). Empty for a plain Model."""
    configs = _model_configs(trainer)
    name, it = record.model_name, record.iteration
    out: list[tuple[str, str | None, Any]] = []
    if art.kind == "model" and art.model_info:
        variant = consolidated.submodel_of_variant(name, normalize_model_info(art.model_info), configs)
        if variant is not None:
            sub, info = variant
            out.append((sub, info, consolidated.model_file(full, it, record.run_id, str(it), ema_factor_of(info),
                                                           configs.get(name))))
    elif art.kind == "model":
        for sub in consolidated.submodel_names(name, configs):
            out.append((sub, None, consolidated.model_file(consolidated.submodel_state(full, name, sub), it,
                                                           record.run_id, str(it), None, configs[sub])))
    elif art.kind == "optim":
        for sub in consolidated.submodel_names(name, configs):
            osd = consolidated.submodel_optimizer(full, name, sub)
            if osd is not None:  # frozen submodels have no optimizer
                out.append((sub, None, to_noether_layout(osd, f"optimizer of {sub} at {it}")))
    return out


def _write_file(dst: Storage, dst_path: str, obj: Any) -> dcp_io.FileRecord:
    with dcp_io.open_checksummed(dst, dst_path) as stream:
        torch.save(obj, stream)
    return dcp_io.FileRecord("", stream.size, stream.crc & 0xFFFFFFFF)


def _trainer_common(src: Storage, src_layout: StageLayout, record: CommitRecord) -> dict[str, Any]:
    art = record.artifact(ArtifactKind.TRAINER.value)
    if art is None or art.format == "consolidated":
        return {}
    full = dcp_io.load_full(src_layout.artifact_path(art.name), src)
    return unpack_object(full[TRAINER_COMMON_KEY]) if TRAINER_COMMON_KEY in full else {}


def _noether_name(model_name: str, checkpoint: str, kind: str, model_info: str | None) -> str:
    """The file name Noether gives an artifact (its ``ema=<factor>`` spelling)."""
    return format_artifact(model_name, checkpoint, kind, noether_model_info(model_info))


def _to_files(src: Storage, dst: Storage, src_layout: StageLayout, dst_layout: StageLayout, record: CommitRecord,
              tags: list[CheckpointRef], progress: Any) -> list[ArtifactRecord]:
    """Write every artifact of one point as Noether's single file, and the same file under
    each Noether tag of the aliases naming this point (``cp=latest``, ``cp=last``,
    ``cp=best_model.<metric>``; a best tag gets model files only, as Noether writes it)."""
    trainer = _trainer_common(src, src_layout, record)
    arts = []
    for art in record.artifacts:
        if progress is not None:
            progress.describe(f"{record.iteration} {art.name}")
        src_path = src_layout.artifact_path(art.name)
        if art.format == "consolidated":
            raise ConfigError(f"{src_path} is already consolidated")
        full = dcp_io.load_full(src_path, src)
        obj = _file_object(full, art, record, trainer)
        name = _noether_name(record.model_name, str(record.iteration), art.kind, art.model_info)
        dst.remove(dst_layout.artifact_path(name), recursive=True)
        arts.append(ArtifactRecord(name, art.kind, art.model_info, "consolidated",
                                   (_write_file(dst, dst_layout.artifact_path(name), obj),)))
        # Noether's own files for submodels: beside the commit, like the tag files
        extra = _submodel_files(full, art, record, trainer)
        for model_name, info, sub_obj in extra:
            _write_file(dst, dst_layout.artifact_path(_noether_name(model_name, str(record.iteration), art.kind, info)),
                        sub_obj)
        for ref in tags:
            if ref.kind is CheckpointRef.Kind.BEST and art.kind != ArtifactKind.MODEL.value:
                continue
            tag = noether_tag(ref)
            for model_name, info, file_obj in [(record.model_name, art.model_info, obj), *extra]:
                tagged = {**file_obj, "checkpoint_tag": tag} if art.kind == ArtifactKind.MODEL.value else file_obj
                _write_file(dst, dst_layout.artifact_path(_noether_name(model_name, tag, art.kind, info)), tagged)
        if progress is not None:
            progress.update(art.total_bytes)
    return arts


def _to_dcp(src: Storage, dst: Storage, src_path: str, dst_path: str, art: ArtifactRecord,
            record: CommitRecord) -> list[dcp_io.FileRecord]:
    obj = consolidated.read_file(src, src_path)
    if art.kind == "model":
        state = consolidated.state_dict_of(obj, src_path)
    elif art.kind == "optim":
        state = names_from_file(obj, src_path)
        if state is None:
            raise ConfigError(f"{src_path} keys optimizer state by parameter index without param_idx_to_name; "
                              "converting it needs the model: load it with resume() and save again")
    else:
        common, ranks = consolidated.trainer_state_of(obj)
        state = {TRAINER_COMMON_KEY: pack_object(common_entry(record.iteration.to_dict(), common))}
        state.update({trainer_rank_key(r): pack_object(v) for r, v in ranks.items()})
    return dcp_io.save_state(state, dst_path, dst, process_group=None)


def convert_stage(src: Storage, src_layout: StageLayout, dst: Storage, dst_layout: StageLayout, to: str,
                  checkpoints: list[str] | None = None, progress: Any = None) -> ConvertReport:
    """Convert the committed checkpoints of one stage (all, or those named) into ``to``
    (``consolidated`` or ``sharded``) under ``dst_layout``; commit each and copy aliases.
    ``progress`` (``add_total(n)``/``update(n)``/``describe(text)``, e.g.
    :class:`noether_dist.tools.progress.Bar`) counts the source bytes converted."""
    if to not in ("consolidated", "sharded"):
        raise ConfigError(f"convert target {to!r} is not valid; use consolidated or sharded")
    index = StageIndex(src, src_layout)
    points = index.committed()
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
    aliases = [alias for alias in index.aliases().values() if alias is not None]
    total = 0
    done = []
    records = {it: index.record(it) for it in points}
    if progress is not None:
        progress.add_total(sum(a.total_bytes for r in records.values() for a in r.artifacts))
    for it in points:
        record = records[it]
        if read_commit(dst, dst_layout, it) is not None:
            log.info("%s already converted in %s", it, dst_layout.checkpoints_dir)
            if progress is not None:
                progress.update(sum(a.total_bytes for a in record.artifacts))
            continue
        if to == "consolidated":
            tags = [parse_checkpoint(a.name, "alias name") for a in aliases if a.iteration == it]
            arts = _to_files(src, dst, src_layout, dst_layout, record, tags, progress)
        else:
            arts = []
            for art in record.artifacts:
                if progress is not None:
                    progress.describe(f"{it} {art.name}")
                src_path = src_layout.artifact_path(art.name)
                if art.format != "consolidated":
                    raise ConfigError(f"{src_path} is already sharded")
                # sharded artifacts carry our own spelling (ema_factor=) again
                name = format_artifact(record.model_name, str(it), art.kind, normalize_model_info(art.model_info))
                dst.remove(dst_layout.artifact_path(name), recursive=True)
                files = tuple(_to_dcp(src, dst, src_path, dst_layout.artifact_path(name), art, record))
                arts.append(ArtifactRecord(name, art.kind, art.model_info, "dcp", files))
                if progress is not None:
                    progress.update(art.total_bytes)
        total += sum(f.size for a in arts for f in a.files)
        new = CommitRecord(it, dst_layout.run_id, dst_layout.stage_name, record.model_name,
                           1 if to == "sharded" else record.world_size, tuple(arts), record.metrics)
        write_commit(dst, dst_layout, new)
        done.append(str(it))
    for alias in aliases:
        if read_commit(dst, dst_layout, alias.iteration) is not None:
            write_alias(dst, dst_layout, alias)
    run_config = join_url(src_layout.stage_dir, NOETHER_RUN_CONFIG)
    if to == "consolidated" and src.exists(run_config):  # noether-eval reads the run's config beside checkpoints/
        dst.replace(join_url(dst_layout.stage_dir, NOETHER_RUN_CONFIG), src.read(run_config))
    return ConvertReport(tuple(done), total)
