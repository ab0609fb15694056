"""Resuming a Noether run through noether_dist, driven by Noether's own resume keys.

``HydraRunner`` turns ``resume_run_id`` / ``resume_stage_name`` / ``resume_checkpoint`` into a
``ResumeInitializerConfig`` on ``trainer.initializer``; the adapter's trainer puts this
initializer in its place. The order of calls is Noether's:

1. ``start_checkpoint()`` - inside ``BaseTrainer.__init__``, before the model exists: rank 0
   selects the checkpoint (alias or partial spec, committed points only), every rank checks
   that it can read the checkpoint's files, and the ranks agree (falling back together to an
   older committed point only when none was asked for by name). The choice is pinned here;
   Noether builds its update counter and data position from it.
2. ``init_trainer(trainer)`` - remembers the trainer.
3. ``init_weights(model)`` - loads the PINNED checkpoint (model, all optimizers, every EMA,
   trainer state; keys and shapes checked on every rank first), no fallback any more.
4. ``init_optimizer(model)`` - nothing left to do (loaded in 3).
5. ``init_callbacks(callbacks, model)`` - callback states and grad scaler go back through
   ``trainer.load_state_dict`` as Noether expects; EMA tensors go into the EmaCallbacks.
   Each rank's RNG states are restored when the training data loader starts iterating, the
   data position is checked against the pinned point (see data.py).
"""

from __future__ import annotations

import logging
from typing import Any

from noether.core.initializers import InitializerBase
from noether.core.utils.common import select_with_path
from noether.core.utils.training import TrainingIteration as NoetherIteration

from ...dist.comm import Comm
from ...format.records import CommitRecord
from ...config import ResumeConfig
from ...io import consolidated
from ...io.formats import artifact_io
from ...errors import CheckpointNotFoundError, ConfigError, StateMismatchError
from ...format.layout import StageLayout
from ...format.names import (CheckpointRef, TrainingIteration, normalize_model_info, parse_checkpoint_tag,
                      parse_resume_checkpoint)
from ...format.trainer_keys import CALLBACKS_KEY, GRAD_SCALER_KEY
from ...resume import ResumeResult, resume
from ...stage.index import StageIndex
from ...io.storage import open_storage
from .block import checkpointer_config
from .models import ema_targets, torch_optimizers

__all__ = ["NoetherDistResumeInitializer", "checkpoint_ref_of_tag"]

log = logging.getLogger(__name__)


def checkpoint_ref_of_tag(tag: str | dict | None) -> tuple[CheckpointRef, bool]:
    """(what to select, asked for by name) for Noether's ``checkpoint_tag``: a string
    (latest, last, best_model.<metric>, ...) or a dict of epoch/update/sample."""
    if tag is None or tag == "latest":
        return CheckpointRef.latest(), False
    if isinstance(tag, dict):
        return parse_checkpoint_tag(tag), True
    return parse_resume_checkpoint(str(tag)), True


class NoetherDistResumeInitializer(InitializerBase):
    """Noether's ResumeInitializer, reading noether_dist checkpoints (see the module doc)."""

    def __init__(self, noether_config: Any, *, path_provider: Any, block: dict[str, Any] | None,
                 output_dir: str) -> None:
        super().__init__(path_provider=path_provider)
        self.run_id = noether_config.run_id
        self.stage_name = noether_config.stage_name
        self.model_name = noether_config.model_name
        self.ref, self.explicit = checkpoint_ref_of_tag(noether_config.checkpoint_tag)
        # The same store options and timeout as the run's own saves.
        self.config = checkpointer_config(block, output_dir=output_dir, run_id=self.run_id,
                                          stage_name=self.stage_name, model_name=self.model_name)
        self.layout = StageLayout(self.config.output_dir, self.run_id, self.stage_name)
        self.record: CommitRecord | None = None
        self.result: ResumeResult | None = None
        self.trainer: Any = None
        self.ema: dict[str, tuple[Any, str | None, float, dict[str, Any]]] = {}

    # -- 1. select and agree ------------------------------------------------------------
    def start_checkpoint(self) -> NoetherIteration:
        """Select and agree on the checkpoint (collective); Noether starts counting from it."""
        comm = Comm(self.config.timeout_s)
        storage = open_storage(self.config.output_dir, self.config.storage)
        index = StageIndex(storage, self.layout)  # used on the coordinator only
        record = comm.broadcast_from_coordinator(lambda: index.resolve_or_uncommitted(self.ref, self.model_name))
        skipped: list[str] = []
        while True:
            verdicts = comm.all_gather_results(lambda: self._unreadable(storage, record))
            bad = {r: v for r, v in enumerate(verdicts) if v}
            if not bad:
                break
            detail = "; ".join(f"rank {r}: {v}" for r, v in sorted(bad.items()))
            if self.explicit:
                raise CheckpointNotFoundError(f"checkpoint {record.iteration} cannot be read by every rank: {detail}")
            log.warning("checkpoint %s cannot be read by every rank (%s); all ranks fall back", record.iteration, detail)
            skipped.append(str(record.iteration))
            record = comm.broadcast_from_coordinator(lambda: self._older(index, record.iteration, skipped, detail))
        self.record = record
        it = record.iteration
        log.info("resuming %s/%s from %s (pinned)", self.run_id, self.stage_name or "-", it)
        return NoetherIteration(epoch=it.epoch, update=it.update, sample=it.sample)

    def _unreadable(self, storage: Any, record: CommitRecord) -> str | None:
        for art in record.artifacts:
            reason = artifact_io(art.format).check(storage, self.layout.artifact_path(art.name))
            if reason:
                return reason
        return None

    def _older(self, index: StageIndex, current: TrainingIteration, skipped: list[str], detail: str) -> CommitRecord:
        rec = index.newest(before=current)
        if rec is not None:
            return rec
        raise CheckpointNotFoundError(f"no committed checkpoint in {self.layout.checkpoints_dir} can be read by every "
                                      f"rank; tried {', '.join(skipped)}; last problem: {detail}")

    # -- 2.-5. load the pinned checkpoint -----------------------------------------------
    def init_trainer(self, trainer: Any) -> None:
        """Remember the trainer (its state is applied in :meth:`init_callbacks`)."""
        self.trainer = trainer

    def init_weights(self, model: Any) -> None:
        """Load model, optimizers, EMA and trainer state of the pinned checkpoint (collective)."""
        if self.record is None:
            raise ConfigError("start_checkpoint() must run before init_weights()")
        callbacks = self.trainer.callbacks if self.trainer is not None else []
        have = {normalize_model_info(a.model_info) for a in self.record.artifacts if a.kind == "model" and a.model_info}
        targets = ema_targets(callbacks, model)
        for info in sorted(set(targets) - have):
            log.warning("checkpoint %s has no EMA %s; that EMA starts from the model weights, as Noether does",
                        self.record.iteration, info)
        self.ema = {info: t for info, t in targets.items() if info in have}
        optims = torch_optimizers(model)
        # U<update> names exactly one committed point of a stage: the pinned one, asked for by
        # name, so any rank that cannot load it raises on every rank (no fallback any more).
        # Files Noether wrote itself have no commit record; there the name it was selected by
        # (e.g. latest, a file of its own) pins it.
        uncommitted = all(not a.files for a in self.record.artifacts)
        pin = str(self.ref) if uncommitted and self.ref.kind is not CheckpointRef.Kind.ITERATION \
            else f"U{self.record.iteration.update}"
        config = ResumeConfig(output_dir=self.config.output_dir, resume_run_id=self.run_id,
                              resume_stage_name=self.stage_name, resume_checkpoint=pin, storage=self.config.storage)
        optimizer = optims[0] if len(optims) == 1 else (optims or None)
        ema = None if uncommitted else {info: t[3] for info, t in self.ema.items()} or None
        self.result = resume(config, model=model, optimizer=optimizer,  # type: ignore[arg-type]
                             ema=ema, model_name=self.model_name, timeout_s=self.config.timeout_s)
        if uncommitted:
            self._load_noether_ema_files()
        if self.result.iteration != self.record.iteration:
            raise CheckpointNotFoundError(f"resume loaded {self.result.iteration}, not the pinned {self.record.iteration}")

    def _load_noether_ema_files(self) -> None:
        """EMA files Noether wrote (one torch.save file each): every rank reads them itself,
        as Noether does; keys and shapes must match the EMA exactly."""
        storage = open_storage(self.config.output_dir, self.config.storage)
        for info, (_, _, _, tensors) in self.ema.items():
            art = self.record.artifact("model", info)  # type: ignore[union-attr]
            path = self.layout.artifact_path(art.name)  # type: ignore[union-attr]
            stored = consolidated.state_dict_of(consolidated.read_file(storage, path), path)
            wrong = sorted(set(stored) ^ set(tensors)) + sorted(
                k for k in set(stored) & set(tensors) if tuple(stored[k].shape) != tuple(tensors[k].shape))
            if wrong:
                raise StateMismatchError(f"EMA file {path} does not match the EMA of the model: {wrong[:10]}")
            for key, value in stored.items():
                tensors[key].copy_(value)

    def init_optimizer(self, model: Any) -> None:
        """Nothing to do: the optimizers were loaded with the weights."""

    def init_callbacks(self, callbacks: list[Any], model: Any) -> None:
        """Callback states and grad scaler through ``trainer.load_state_dict``; EMA tensors."""
        if self.result is None:
            raise ConfigError("init_weights() must run before init_callbacks()")
        state = self.result.trainer_state
        noether_state: dict[str, Any] = {"callback_state_dicts": state.get(CALLBACKS_KEY) or {}}
        if state.get(GRAD_SCALER_KEY) is not None:
            noether_state["grad_scaler"] = state[GRAD_SCALER_KEY]
        self.trainer.load_state_dict(noether_state)
        for cb, path, factor, tensors in self.ema.values():
            names = {n for n, _ in select_with_path(obj=model, path=path).named_parameters()}
            cb.parameters[(path, factor)] = {n: t for n, t in tensors.items() if n in names}
            cb.buffers[path] = {n: t for n, t in tensors.items() if n not in names}
            cb._was_resumed = True  # EmaCallback.before_training must not re-initialise it

    @property
    def rank_state(self) -> dict[str, Any] | None:
        """This rank's saved RNG states and data position (None: no such rank was saved)."""
        return self.result.rank_state if self.result is not None else None
