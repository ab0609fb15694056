"""The trainer mixin: a Noether trainer that checkpoints through noether_dist.

Use it by putting :class:`NoetherDistTrainer` before a Noether trainer class::

    class MyTrainer(NoetherDistTrainer, MyNoetherTrainer):
        pass

and pointing ``trainer.kind`` at it; the trainer config then takes a ``checkpointer:`` block.

When a gathered training point is committed (see ``gather.py``), and why it is exact:

- after a round of periodic callbacks (``_run_periodic_callbacks``), on every rank: all
  callbacks of the point ran, the model and EMA are unchanged until the next forward pass;
- except when another round follows at the same point (the after-update round of an epoch's
  last update is followed by the after-epoch round) or training stops there (finished, early
  exit): then the point stays open and the next round, ``call_after_training`` (which gathers
  Noether's ``last`` saves into the same point) or, as a safety net, the next ``update``
  (before its forward pass) commits it;
- never when a callback raised: that may happen on some ranks only, and a collective then
  could hang; the gathered point is dropped there and the newest commit stays the one to resume.

Every decision above depends only on the update counter and on what all ranks computed alike,
so all ranks flush at the same moments; what rank 0 alone gathered (EMA) travels in the flush.
"""

from __future__ import annotations

import logging
from typing import Any, get_type_hints

import pydantic
import torch
from noether.core.distributed import is_distributed
from noether.core.schemas import BaseTrainerConfig
from noether.core.schemas.initializers import ResumeInitializerConfig
from torch.nn.parallel import DistributedDataParallel

from ...dist.comm import Comm
from ...errors import StateMismatchError
from ...format.trainer_keys import DATA_POSITION_KEY, RNG_KEY
from .block import checkpointer_config
from .data import EpochCountingSampler, RestoreRngOnIter
from .gather import GatheringCheckpointWriter, to_iteration
from .initializer import install_previous_run_bridges
from .resume import NoetherDistResumeInitializer

__all__ = ["NoetherDistTrainer", "config_class_with_checkpointer"]

log = logging.getLogger(__name__)


def _noether_config_class(cls: type) -> type:
    """The config class a Noether trainer class is built from (its ``_config_class``, else
    the first BaseTrainerConfig in an ``__init__`` type hint along the MRO)."""
    for klass in cls.__mro__:
        if klass is NoetherDistTrainer or klass is object:
            continue
        own = klass.__dict__.get("_config_class")
        if own is not None and not getattr(own, "_noether_dist_block", False):
            return own
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            hints = get_type_hints(init)
        except Exception:  # noqa: BLE001 - unresolvable hints: look further up
            continue
        for hint in hints.values():
            if isinstance(hint, type) and issubclass(hint, BaseTrainerConfig):
                return hint
    return BaseTrainerConfig


def config_class_with_checkpointer(base: type) -> type:
    """``base`` (a trainer config class) plus a ``checkpointer`` field (the adapter's block)."""
    model = pydantic.create_model(f"{base.__name__}WithCheckpointer", __base__=base,
                                  checkpointer=(dict[str, Any] | None, None))
    model._noether_dist_block = True  # type: ignore[attr-defined]
    return model


class NoetherDistTrainer:
    """Mixin over a Noether trainer: checkpoints go through noether_dist (one committed save
    per training point, sharded, any store), resume follows Noether's ``resume_*`` keys, Noether's
    PreviousRunInitializer entries read noether_dist checkpoints, and multi-process CPU runs
    keep their replicas in sync. Overrides no method Noether forbids (``train``, ``wrap_model``)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Noether finds a trainer's config class through `_config_class`: give the subclass one
        # that accepts the `checkpointer:` block on top of its Noether config.
        cls._config_class = config_class_with_checkpointer(_noether_config_class(cls))

    def __init__(self, config: Any, **kwargs: Any) -> None:
        path_provider = kwargs["path_provider"]
        block = getattr(config, "checkpointer", None)
        output_dir = str(path_provider.output_root)
        # Validate the block now: a bad key fails at start-up, not at the first save.
        nd_config = checkpointer_config(block, output_dir=output_dir, run_id=path_provider.run_id,
                                        stage_name=path_provider.stage_name, model_name="model")
        self._nd_output_dir, self._nd_timeout_s = nd_config.output_dir, nd_config.timeout_s
        original = config.initializer
        if isinstance(original, ResumeInitializerConfig):
            # Noether's Factory hands an already built object through unchanged, so
            # BaseTrainer.__init__ calls our start_checkpoint() where it would call Noether's.
            config.initializer = NoetherDistResumeInitializer(original, path_provider=path_provider, block=block,
                                                              output_dir=output_dir)
        try:
            super().__init__(config, **kwargs)
        finally:
            config.initializer = original
        # BaseTrainer built its own CheckpointWriter; callbacks receive the writer when train()
        # builds them, so replacing it here reaches every one of them.
        self.checkpoint_writer = GatheringCheckpointWriter(trainer=self, block=block, output_dir=output_dir)
        self._nd_open_point = False
        self.log_writer.__class__ = _waiting_for_every_rank(type(self.log_writer), self._nd_timeout_s)

    # -- model ----------------------------------------------------------------------------
    def _prepare_model(self, model: Any) -> Any:
        self.checkpoint_writer.model = model
        install_previous_run_bridges(model, output_dir=self._nd_output_dir, timeout_s=self._nd_timeout_s)
        return super()._prepare_model(model)  # type: ignore[misc]

    def wrap_ddp(self, model: Any) -> Any:
        """Noether leaves CPU models unwrapped, so the ranks of a multi-process CPU run train
        diverging replicas that no checkpoint can hold once; wrap them in DDP (gloo) too."""
        trainable = any(p.requires_grad for p in model.parameters())
        if is_distributed() and model.device == torch.device("cpu") and trainable:
            return DistributedDataParallel(model, find_unused_parameters=self.config.find_unused_params,
                                           static_graph=self.config.static_graph)
        return super().wrap_ddp(model)  # type: ignore[misc]

    def get_data_loader(self, iterator_callbacks: list[Any], batch_size: int, evaluation: bool = False) -> Any:
        loader = self._nd_data_loader(iterator_callbacks, batch_size, evaluation)
        rng = self._nd_resumed_rng()
        return loader if evaluation or rng is None else RestoreRngOnIter(loader, rng)

    def _nd_data_loader(self, iterator_callbacks: list[Any], batch_size: int, evaluation: bool) -> Any:
        start = self.start_checkpoint.update or 0
        if evaluation or start % self.updates_per_epoch == 0:
            return super().get_data_loader(iterator_callbacks, batch_size, evaluation)  # type: ignore[misc]
        # Mid-epoch resume: correct the epoch numbering of the main sampler (see data.py).
        container = self.data_container
        make = container.get_main_sampler

        def counting(*args: Any, **kwargs: Any) -> Any:
            sampler = make(*args, **kwargs)
            return EpochCountingSampler(sampler) if callable(getattr(sampler, "set_epoch", None)) else sampler

        container.get_main_sampler = counting
        try:
            return super().get_data_loader(iterator_callbacks, batch_size, evaluation)  # type: ignore[misc]
        finally:
            del container.get_main_sampler

    def _nd_resumed_rng(self) -> dict[str, Any] | None:
        """This rank's saved RNG states when resuming (the data position is checked here)."""
        initializer = self.initializer
        if not isinstance(initializer, NoetherDistResumeInitializer):
            return None
        own = initializer.rank_state
        if own is None:
            log.warning("the checkpoint holds no state of this rank (other world size): RNG states not restored")
            return None
        saved, start = own.get(DATA_POSITION_KEY), to_iteration(self.start_checkpoint).to_dict()
        if saved != start:
            raise StateMismatchError(f"data position {saved} saved with the checkpoint differs from Noether's start {start}")
        return own[RNG_KEY]

    # -- when gathered points are committed (see the module doc) -----------------------
    def _run_periodic_callbacks(self, periodic_callbacks: list[Any], model: Any, dist_model: Any, data_iter: Any,
                                batch_size: int, end_of_epoch: bool = False) -> bool:
        try:
            early_exit = super()._run_periodic_callbacks(  # type: ignore[misc]
                periodic_callbacks=periodic_callbacks, model=model, dist_model=dist_model, data_iter=data_iter,
                batch_size=batch_size, end_of_epoch=end_of_epoch)
        except BaseException:
            if self.checkpoint_writer.has_pending:
                log.error("a callback raised at %s: the checkpoint gathered there is not committed",
                          self.update_counter.cur_iteration)
            self.checkpoint_writer.discard()
            self._nd_open_point = False
            raise
        counter = self.update_counter
        epoch_round_follows = not end_of_epoch and counter.is_full_epoch
        if early_exit or counter.is_finished or epoch_round_follows:
            self._nd_open_point = True
        else:
            self._nd_open_point = False
            self.checkpoint_writer.flush()
        return early_exit

    def update(self, *args: Any, **kwargs: Any) -> Any:
        if self._nd_open_point:  # safety net: nothing has changed since the point's callbacks
            self._nd_open_point = False
            self.checkpoint_writer.flush()
        return super().update(*args, **kwargs)  # type: ignore[misc]

    def call_after_training(self, callbacks: list[Any]) -> None:
        super().call_after_training(callbacks)  # type: ignore[misc]
        self._nd_open_point = False
        self.checkpoint_writer.flush()
        self.checkpoint_writer.close()


def _waiting_for_every_rank(log_writer_class: type, timeout_s: float) -> type:
    """``log_writer_class`` (Noether's LogWriter) whose ``with`` block, left without an error,
    ends only once every rank has left it (a barrier with ``timeout_s``).

    Noether 2026.4.0 writes the tracker's log entries file on rank 0 as ``train()`` leaves
    that block, and every rank reads the file right after (``summarize_logvalues``): another
    rank could read it half-written and fail with UnpicklingError (7 of 37 adapter tests in
    one CI run here). After the wait, rank 0 has written it whole."""

    class LogWriterWaitingForEveryRank(log_writer_class):  # type: ignore[misc, valid-type]
        def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
            super().__exit__(exc_type, exc, tb)
            if exc_type is None:
                Comm(timeout_s).barrier()

    return LogWriterWaitingForEveryRank
