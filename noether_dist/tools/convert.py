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
from dataclasses import dataclass, replace
from typing import Any

from ..io.consolidated import submodel_names, submodel_of_variant, submodel_optimizer, submodel_state
from ..io.formats import ArtifactIO, TrainerContent, WriteContext, artifact_io
from ..format.records import ArtifactRecord, CommitRecord
from ..stage.commit import read_commit, write_alias, write_commit
from ..stage.index import StageIndex
from ..errors import CheckpointNotFoundError, ConfigError
from ..format.layout import StageLayout, join_url
from ..format.names import (NOETHER_RUN_CONFIG, ArtifactFormat, ArtifactKind, CheckpointRef, TrainingIteration,
                            noether_tag, normalize_model_info, parse_checkpoint)
from ..format.trainer_keys import MODEL_CONFIGS_KEY
from ..io.storage import Storage

__all__ = ["convert_stage", "ConvertReport", "TARGETS"]

log = logging.getLogger(__name__)

TARGETS = {"consolidated": ArtifactFormat.CONSOLIDATED, "sharded": ArtifactFormat.DCP}
"""``convert --to`` names -> the format written."""


@dataclass(frozen=True)
class ConvertReport:
    """What a conversion wrote."""

    checkpoints: tuple[str, ...]
    bytes_written: int


def _submodel_files(full: Any, art: ArtifactRecord, record: CommitRecord,
                    context: WriteContext, configs: dict[str, Any]) -> list[tuple[str, Any, WriteContext]]:
    """(model name, content, context) of the files Noether writes for the submodels of a
    CompositeModel, which the adapter saves as ONE model and ONE optimizer artifact: a model
    file (with the submodel's model_config) and an optimizer file per submodel
    (``comp.encoder_cp=..._model.th``, ``..._optim.th``), and a submodel's EMA under the
    submodel's name (``comp.encoder_ema=0.9_cp=...``, with the whole model's config, as
    Noether's EmaCallback writes it). Empty for a plain Model."""
    name = record.model_name
    out: list[tuple[str, Any, WriteContext]] = []
    if art.kind == "model" and art.model_info:
        variant = submodel_of_variant(name, normalize_model_info(art.model_info), configs)
        if variant is not None:
            sub, info = variant
            out.append((sub, full, replace(context, model_info=info)))
    elif art.kind == "model":
        for sub in submodel_names(name, configs):
            out.append((sub, submodel_state(full, name, sub), replace(context, model_config=configs[sub])))
    elif art.kind == "optim":
        for sub in submodel_names(name, configs):
            osd = submodel_optimizer(full, name, sub)
            if osd is not None:  # frozen submodels have no optimizer
                out.append((sub, osd, context))
    return out


def _noether_files(fmt: ArtifactIO, dst: Storage, dst_layout: StageLayout, record: CommitRecord,
                   art: ArtifactRecord, content: Any, context: WriteContext, configs: dict[str, Any],
                   tags: list[CheckpointRef]) -> None:
    """Beside the commit, what Noether's own tools read of a consolidated checkpoint: the
    submodels' files, and every file again under each Noether tag of the aliases naming this
    point (``cp=latest``, ``cp=last``, ``cp=best_model.<metric>``; a best tag gets model files
    only, as Noether writes it)."""
    kind = ArtifactKind(art.kind)
    extra = _submodel_files(content, art, record, context, configs)
    for model_name, sub_content, sub_context in extra:
        name = fmt.artifact_name(model_name, str(record.iteration), kind, sub_context.model_info)
        fmt.write(dst, dst_layout.artifact_path(name), kind, sub_content, sub_context)
    for ref in tags:
        if ref.kind is CheckpointRef.Kind.BEST and kind is not ArtifactKind.MODEL:
            continue
        tag = noether_tag(ref)
        for model_name, file_content, file_context in [(record.model_name, content, context), *extra]:
            name = fmt.artifact_name(model_name, tag, kind, file_context.model_info)
            fmt.write(dst, dst_layout.artifact_path(name), kind, file_content, replace(file_context, checkpoint_tag=tag))


def _convert_point(src: Storage, dst: Storage, src_layout: StageLayout, dst_layout: StageLayout,
                   record: CommitRecord, to: str, tags: list[CheckpointRef], progress: Any) -> list[ArtifactRecord]:
    """Write every artifact of one point in the format ``to`` names: each is read whole
    through its own format and written through the target's (to consolidated, also the
    files Noether's own tools read: :func:`_noether_files`)."""
    target = TARGETS[to]
    out_io = artifact_io(target)
    for art in record.artifacts:
        if art.format is target:
            raise ConfigError(f"{src_layout.artifact_path(art.name)} is already {to}")
    trainer_art = record.artifact(ArtifactKind.TRAINER.value)
    trainer = TrainerContent({}) if trainer_art is None else artifact_io(trainer_art.format).read(
        src, src_layout.artifact_path(trainer_art.name), ArtifactKind.TRAINER)
    configs = trainer.state.get(MODEL_CONFIGS_KEY) or {}
    arts = []
    for art in record.artifacts:
        if progress is not None:
            progress.describe(f"{record.iteration} {art.name}")
        kind = ArtifactKind(art.kind)
        content = trainer if kind is ArtifactKind.TRAINER else artifact_io(art.format).read(
            src, src_layout.artifact_path(art.name), kind)
        context = WriteContext(record.iteration, record.run_id, art.model_info, configs.get(record.model_name))
        name = out_io.artifact_name(record.model_name, str(record.iteration), kind, art.model_info)
        dst.remove(dst_layout.artifact_path(name), recursive=True)
        files = out_io.write(dst, dst_layout.artifact_path(name), kind, content, context)
        arts.append(ArtifactRecord(name, art.kind, art.model_info, target, files))
        if target is ArtifactFormat.CONSOLIDATED:
            _noether_files(out_io, dst, dst_layout, record, art, content, context, configs, tags)
        if progress is not None:
            progress.update(art.total_bytes)
    return arts


def convert_stage(src: Storage, src_layout: StageLayout, dst: Storage, dst_layout: StageLayout, to: str,
                  checkpoints: list[str] | None = None, progress: Any = None) -> ConvertReport:
    """Convert the committed checkpoints of one stage (all, or those named) into ``to``
    (``consolidated`` or ``sharded``) under ``dst_layout``; commit each and copy aliases.
    ``progress`` (``add_total(n)``/``update(n)``/``describe(text)``, e.g.
    :class:`noether_dist.tools.progress.Bar`) counts the source bytes converted."""
    if to not in TARGETS:
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
        tags = [parse_checkpoint(a.name, "alias name") for a in aliases if a.iteration == it]
        arts = _convert_point(src, dst, src_layout, dst_layout, record, to, tags, progress)
        total += sum(f.size for a in arts for f in a.files)
        new = CommitRecord(it, dst_layout.run_id, dst_layout.stage_name, record.model_name,
                           1 if TARGETS[to] is ArtifactFormat.DCP else record.world_size, tuple(arts), record.metrics)
        write_commit(dst, dst_layout, new)
        done.append(str(it))
    for alias in aliases:
        if read_commit(dst, dst_layout, alias.iteration) is not None:
            write_alias(dst, dst_layout, alias)
    run_config = join_url(src_layout.stage_dir, NOETHER_RUN_CONFIG)
    if TARGETS[to] is ArtifactFormat.CONSOLIDATED and src.exists(run_config):  # noether-eval reads the run's config beside checkpoints/
        dst.replace(join_url(dst_layout.stage_dir, NOETHER_RUN_CONFIG), src.read(run_config))
    return ConvertReport(tuple(done), total)
