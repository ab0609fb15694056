"""The adapter's stand-in for Noether's ``CheckpointWriter``: every call of one training point
becomes ONE committed checkpoint.

Noether's callbacks call the writer several times at one training point, and not all on
every rank:

========================================================  ===========  ===============================
Noether call                                              ranks        what the adapter does
========================================================  ===========  ===============================
``save(tag=E.._U.._S.., save_weights, save_optim, ...)``  every rank   model (+ optimizer) of the point
``save_model_checkpoint(model_info="ema=F", tag=...)``    rank 0 only  EMA artifact ``ema_factor=F``
``save(tag="best_model.<metric>", save_optim=False)``     every rank   alias ``best.<metric>`` -> point
``save(tag="last")`` / EMA ``tag="last"``                 every rank   alias ``last`` -> point
``save(tag="<point>.early_exit")``                        every rank   the point, committed as usual
``save(tag="<point>.error")``                             some ranks   logged, nothing written
========================================================  ===========  ===============================

A call only records what the point needs; nothing is copied. :meth:`flush` writes and
commits the point with one :meth:`Checkpointer.save`, reading the live model, optimizers
and EMA tensors. That is exact because the trainer flushes (see ``trainer.py``) after all
callbacks of the point ran and before the next forward pass changes anything. Calls made
on rank 0 only never enter a collective: at a flush, the ranks first agree whether any of
them gathered something (one all_reduce of one integer: the whole cost of an update without
a save), then rank 0's summary of the point is broadcast and every rank saves by it, the other ranks passing empty
EMA states (the EMA tensors live on rank 0 only; DCP writes them from there).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from ...dist.comm import Comm
from ...errors import ConfigError, InvalidNameError
from ...format.names import CheckpointRef, TrainingIteration, parse_checkpoint
from ...format.trainer_keys import CALLBACKS_KEY, DATA_POSITION_KEY, GRAD_SCALER_KEY, MODEL_CONFIGS_KEY, RNG_KEY
from ...save import Checkpointer, SaveResult
from ...state import capture_rng
from ...io.statedict import optimizer_state
from .block import checkpointer_config
from .models import model_configs, variant_model_info, torch_optimizers

__all__ = ["GatheringCheckpointWriter", "PointSummary", "noether_tag"]

log = logging.getLogger(__name__)
_POINT_RE = re.compile(r"^E\d+_U\d+_S\d+$")


@dataclass(frozen=True)
class PointSummary:
    """What one training point saves (rank 0's view is the one every rank follows)."""

    iteration: TrainingIteration
    optim: bool
    extra_infos: tuple[str, ...]
    """model_info of each artifact saved on rank 0 only (EMA)."""
    aliases: tuple[str, ...]
    """last, best.<metric>: aliases Noether decided to move to this point."""


@dataclass
class _Point:
    iteration: TrainingIteration
    optim: bool = False
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    aliases: set[str] = field(default_factory=set)

    def summary(self) -> PointSummary:
        return PointSummary(self.iteration, self.optim, tuple(sorted(self.extra)), tuple(sorted(self.aliases)))


def noether_tag(tag: str) -> tuple[str, str | None]:
    """Classify a Noether checkpoint tag: ("point", None), ("latest", None), ("alias", name),
    ("error", None) or ("early_exit", None). Anything else is a ConfigError."""
    tag = str(tag)
    if tag.endswith(".error"):
        return "error", None
    if tag.endswith(".early_exit"):
        return "early_exit", None
    try:
        ref = parse_checkpoint(tag, what="Noether checkpoint tag")  # Noether's and our spellings
    except InvalidNameError as exc:
        raise ConfigError(f"Noether checkpoint tag {tag!r} has no noether_dist meaning; expected a training point "
                          "E<e>_U<u>_S<s>, latest, last, best_model.<metric>, <point>.error or <point>.early_exit "
                          f"({exc})") from None
    if ref.kind is CheckpointRef.Kind.ITERATION:
        return "point", None
    if ref.kind is CheckpointRef.Kind.LATEST:
        return "latest", None
    return "alias", ref.alias_name


def to_iteration(noether_iteration: Any) -> TrainingIteration:
    """Our TrainingIteration of Noether's (fully specified) one."""
    return TrainingIteration(int(noether_iteration.epoch), int(noether_iteration.update), int(noether_iteration.sample))


class GatheringCheckpointWriter:
    """Replaces ``trainer.checkpoint_writer``: gathers the calls of a training point and
    commits them as one checkpoint at :meth:`flush` (a collective; see the module doc)."""

    def __init__(self, *, trainer: Any, block: dict[str, Any] | None, output_dir: str) -> None:
        self.trainer = trainer
        self.path_provider = trainer.path_provider
        self.update_counter = trainer.update_counter
        self.block = block
        self.output_dir = output_dir
        self.model: Any = None
        """The trained (unwrapped) Noether model; set by the trainer before callbacks save."""
        self.checkpointer: Checkpointer | None = None
        self.results: list[SaveResult | Any] = []
        """What each flush saved (a Future in asynchronous modes)."""
        self._pending: _Point | None = None
        self._comm: Comm | None = None
        self._ignored_subsets_logged = False

    # -- Noether's CheckpointWriter interface ---------------------------------------
    def save(self, model: Any, checkpoint_tag: str, trainer: Any = None, save_weights: bool = True,
             save_optim: bool = True, save_latest_weights: bool = False, save_latest_optim: bool = False,
             model_names_to_save: list[str] | None = None, save_frozen_weights: bool = True,
             model_info: str | None = None) -> None:
        """Record a save of the model (called on every rank, except error saves)."""
        kind, alias = noether_tag(checkpoint_tag)
        if kind == "error":
            log.warning("Noether asked for an error checkpoint %r; it is not written (a save that only some ranks "
                        "may reach cannot be committed without risking a hang); the newest committed checkpoint "
                        "stays the one to resume", checkpoint_tag)
            return
        if model_info:
            raise ConfigError(f"CheckpointWriter.save(model_info={model_info!r}) is not supported by the adapter; "
                              "save variants with save_model_checkpoint")
        if self.model is not None and model is not self.model:
            raise ConfigError("the adapter saves the model being trained; a callback saved another model")
        self.model = model
        if model_names_to_save and not self._ignored_subsets_logged:
            log.info("model_names_to_save=%s: the adapter saves the whole model at every point", model_names_to_save)
            self._ignored_subsets_logged = True
        point = self._point()
        point.optim = point.optim or save_optim or save_latest_optim
        if alias:
            point.aliases.add(alias)

    def save_model_checkpoint(self, model_name: str, checkpoint_tag: str, state_dict: dict[str, Any],
                              model_config: Any = None, model_info: str | None = None, **extra: Any) -> None:
        """Record a model-variant file (EMA; Noether calls this on rank 0 only). No collective."""
        kind, alias = noether_tag(checkpoint_tag)
        if kind not in ("point", "latest", "alias"):
            log.warning("model file %s with tag %r is not written by the adapter", model_name, checkpoint_tag)
            return
        root = self.model.name if self.model is not None else model_name.split(".", 1)[0]
        path = model_name[len(root) + 1:] if model_name.startswith(root + ".") else None
        if model_name != root and path is None:
            raise ConfigError(f"model file {model_name!r} does not belong to the trained model {root!r}")
        if not model_info:
            raise ConfigError(f"save_model_checkpoint({model_name!r}) without model_info would replace the model "
                              "weights; the adapter saves those itself")
        point = self._point()
        point.extra[variant_model_info(path, model_info)] = state_dict
        if alias:
            point.aliases.add(alias)

    # -- flushing -----------------------------------------------------------------------
    @property
    def has_pending(self) -> bool:
        """True when this rank gathered calls that are not committed yet."""
        return self._pending is not None

    def flush(self) -> SaveResult | Any | None:
        """Commit the gathered point (a collective: every rank calls it at the same moment).
        Rank 0's summary decides what is saved; returns the save's result, None if nothing
        was gathered on rank 0."""
        comm = self._control()
        local = self._pending.summary() if self._pending is not None else None
        if comm.world_size > 1:
            # One tiny all_reduce when no rank gathered anything (most updates); else rank 0's summary.
            anything = not comm.all_true(local is None)
            summary = comm.broadcast(local if comm.is_coordinator else None) if anything else None
        else:
            summary = local
        pending, self._pending = self._pending, None
        if summary is None:
            if pending is not None:
                log.error("rank %d gathered %s but rank 0 did not; following rank 0", comm.rank, pending.iteration)
            return None
        if pending is not None and pending.iteration != summary.iteration:
            log.error("rank %d gathered %s, rank 0 %s; following rank 0", comm.rank, pending.iteration,
                      summary.iteration)
        result = self._write(summary, pending)
        self.results.append(result)
        if isinstance(result, SaveResult) and result.reused_existing:
            log.warning("%s was committed before; only its aliases moved (%s), the rest of this save was dropped",
                        summary.iteration, ", ".join(result.aliases) or "none")
        return result

    def discard(self) -> None:
        """Drop what this rank gathered, without any collective (the error path)."""
        self._pending = None

    def close(self) -> None:
        """Finish an asynchronous save in flight (a collective) and free staging memory."""
        if self.checkpointer is not None:
            self.checkpointer.close()

    def _write(self, summary: PointSummary, pending: _Point | None) -> SaveResult | Any:
        model = self.model
        if model is None:
            raise ConfigError("the adapter has no model to save; was the trainer's train() used?")
        if self.checkpointer is None:
            self.checkpointer = Checkpointer(checkpointer_config(
                self.block, output_dir=self.output_dir, run_id=self.path_provider.run_id,
                stage_name=self.path_provider.stage_name, model_name=model.name))
        optim = None
        if summary.optim:
            optims = torch_optimizers(model)
            if optims:
                optim = optimizer_state(model, optims)  # type: ignore[arg-type]
        extra = pending.extra if pending is not None else {}
        ema = {info: extra.get(info, {}) for info in summary.extra_infos}
        noether_state = self.trainer.state_dict()  # every rank: callbacks may gather
        trainer_state = {CALLBACKS_KEY: noether_state.get("callback_state_dicts", {}),
                         GRAD_SCALER_KEY: noether_state.get("grad_scaler"),
                         MODEL_CONFIGS_KEY: model_configs(model)}
        rank_state = {RNG_KEY: capture_rng(), DATA_POSITION_KEY: summary.iteration.to_dict()}
        return self.checkpointer.save(summary.iteration, model=model, optimizer=optim, ema=ema or None,
                                      trainer_state=trainer_state, rank_state=rank_state, aliases=summary.aliases)

    def _point(self) -> _Point:
        iteration = to_iteration(self.update_counter.cur_iteration)
        if self._pending is None:
            self._pending = _Point(iteration)
        elif self._pending.iteration != iteration:
            raise ConfigError(f"a save at {iteration} arrived while {self._pending.iteration} was not flushed; "
                              "the adapter's trainer hooks flush every point (is the trainer an adapter trainer?)")
        return self._pending

    def _control(self) -> Comm:
        if self._comm is None:
            timeout = float((self.block or {}).get("timeout_s", 600.0))
            self._comm = Comm(timeout)
        return self._comm
