"""Checkpoint files written by Noether's own code, for tests that load them with noether_dist.

Nothing here imitates Noether: a real ``BaseTrainer`` runs its own update step
(``trainer.update``) and its own callback dispatch (``_run_periodic_callbacks``,
``call_after_training``) with Noether's ``CheckpointCallback``, ``EmaCallback`` and
``BestCheckpointCallback``, which write through Noether's ``CheckpointWriter`` and
``OptimizerWrapper`` (named param groups, ``param_idx_to_name``). Only the data loader is
replaced by a loop over deterministic batches: the files do not depend on it.

Runs in one process (Noether writes on rank 0). Only importable in the Noether env.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from noether.core.models import Model
from noether.core.providers import MetricPropertyProvider, PathProvider
from noether.core.schemas.callbacks import (BestCheckpointCallbackConfig, CheckpointCallbackConfig,
                                            EmaCallbackConfig)
from noether.core.schemas.dataset import DatasetBaseConfig
from noether.core.schemas.models import ModelBaseConfig
from noether.core.schemas.optimizers import AdamOptimizerConfig, ParamGroupModifierConfig
from noether.core.schemas.trainers import BaseTrainerConfig
from noether.core.trackers.noop import NoopTracker
from noether.data import Dataset
from noether.data.container import DataContainer
from noether.training.trainers import BaseTrainer

__all__ = ["FilesNet", "FilesNetConfig", "NoetherRun", "write_noether_run", "METRIC", "EMA_FACTOR", "model_config",
           "make_trainer", "sharded_net", "by_name"]

METRIC = "loss/val"
"""The metric BestCheckpointCallback follows; Noether names the tag best_model.loss.val."""
EMA_FACTOR = 0.99
BATCH = 2
UPDATES = 6
EVERY = 2


class FilesNetConfig(ModelBaseConfig):
    """Config of :class:`FilesNet` (Noether's pydantic model config)."""

    kind: str = "tests.noether.noether_files_helpers.FilesNet"
    name: str = "net"
    width: int = 10


class FilesNet(Model):
    """Weights, biases and a LayerNorm: Noether's optimizer puts weights in group ``default``
    and biases and norm parameters in ``weight_decay=0``, so its parameter order is not
    ``model.parameters()`` order. Several parameters share a shape (blocks), so a wrong
    mapping cannot hide behind a shape check."""

    def __init__(self, model_config: FilesNetConfig, **kwargs: Any) -> None:
        super().__init__(model_config, **kwargs)
        w = model_config.width
        self.input_projection = nn.Linear(4, w)
        self.norm = nn.LayerNorm(w)
        self.blocks = nn.Sequential(nn.Linear(w, w), nn.GELU(), nn.Linear(w, w))
        self.head = nn.Linear(w, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.norm(self.input_projection(x))))


def model_config(lr_scale_head: bool = False, initializers: list | None = None) -> FilesNetConfig:
    """AdamW with weight decay (biases and norms excluded by Noether's defaults); with
    ``lr_scale_head`` a third and fourth group scale the head's learning rate."""
    modifiers = [ParamGroupModifierConfig(kind="noether.core.optimizer.param_group_modifiers.LrScaleByNameModifier",
                                          name=n, scale=0.1) for n in ("head.weight", "head.bias")]
    opt = AdamOptimizerConfig(kind="torch.optim.AdamW", lr=1e-2, weight_decay=0.05,
                              param_group_modifiers_config=modifiers if lr_scale_head else None)
    return FilesNetConfig(optimizer_config=opt, initializers=initializers)


class _Data(Dataset):
    """Eight samples; the trainer only asks for its length."""

    def __len__(self) -> int:
        return 8


class _Trainer(BaseTrainer):
    def loss_compute(self, forward_output, targets):  # noqa: D401 - Noether's hook
        return nn.functional.mse_loss(forward_output, targets["y"])


class NoetherRun:
    """What Noether wrote, read back from memory at the end of training (for comparing)."""

    def __init__(self, root: Path, run_id: str, stage_name: str, model: FilesNet, callbacks: list) -> None:
        self.root, self.run_id, self.stage_name = root, run_id, stage_name
        self.model = model
        self.callbacks = callbacks
        self.checkpoints = root / run_id / stage_name / "checkpoints"

    @property
    def ema(self) -> dict[str, torch.Tensor]:
        """The EMA weights Noether's EmaCallback holds at the end of training."""
        cb = next(c for c in self.callbacks if type(c).__name__ == "EmaCallback")
        return {**{k: v.clone() for k, v in cb.parameters[(None, EMA_FACTOR)].items()},
                **{k: v.clone() for k, v in cb.buffers[None].items()}}

    def optim_by_name(self, file: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Optimizer state by parameter name: of a file (through its param_idx_to_name), or
        of Noether's live optimizer at the end of training."""
        if file is not None:
            sd = self.file(file)
            return {sd["param_idx_to_name"][i]: dict(v) for i, v in sd["state"].items()}
        return by_name(self.model, self.model.optimizer.torch_optim)

    def file(self, name: str) -> dict[str, Any]:
        """One file of the run, loaded as Noether would."""
        return torch.load(self.checkpoints / name, map_location="cpu", weights_only=False)


def make_trainer(root: Path, run_id: str, stage_name: str, model_names: list[str] | None) -> _Trainer:
    path_provider = PathProvider(output_root_path=root, run_id=run_id, stage_name=stage_name)
    metrics = MetricPropertyProvider()
    callbacks = [
        CheckpointCallbackConfig(kind="noether.core.callbacks.CheckpointCallback", every_n_updates=EVERY,
                                 save_weights=True, save_optim=True, save_latest_weights=True, save_latest_optim=True),
        EmaCallbackConfig(kind="noether.core.callbacks.EmaCallback", every_n_updates=EVERY,
                          target_factors=[EMA_FACTOR], save_weights=True, save_last_weights=True,
                          save_latest_weights=True),
        BestCheckpointCallbackConfig(kind="noether.core.callbacks.BestCheckpointCallback", every_n_updates=EVERY,
                                     metric_key=METRIC, model_names=model_names),
    ]
    config = BaseTrainerConfig(kind="tests.noether.noether_files_helpers._Trainer", effective_batch_size=BATCH,
                               max_updates=UPDATES, callbacks=callbacks, forward_properties=["x"],
                               target_properties=["y"], add_default_callbacks=False, add_trainer_callbacks=False)
    data = DataContainer(datasets={"train": _Data(DatasetBaseConfig())}, num_workers=0, pin_memory=False)
    return _Trainer(config, data_container=data, device="cpu", tracker=NoopTracker(metrics, path_provider),
                    path_provider=path_provider, metric_property_provider=metrics)


def write_noether_run(root: Path | str, run_id: str = "noe", stage_name: str = "train", *,
                      lr_scale_head: bool = False, seed: int = 0) -> NoetherRun:
    """Train FilesNet for 6 updates with Noether's trainer step and callbacks; checkpoints every
    2 updates (weights, optimizer, ``latest``), EMA 0.99 every 2 updates (and ``latest``,
    ``last``), best model by ``loss/val`` (improving at updates 2 and 4, worse at 6), and
    ``last`` at the end. Returns where the files are and the trained model."""
    root = Path(root)
    torch.manual_seed(seed)
    logging.getLogger("noether").setLevel(logging.WARNING)
    trainer = make_trainer(root, run_id, stage_name, None)
    model = FilesNet(model_config(lr_scale_head), update_counter=trainer.update_counter,
                     path_provider=trainer.path_provider)
    model = trainer._prepare_model(model)
    trainer.callbacks = trainer.get_user_callbacks(model)
    val_losses = {2: 0.5, 4: 0.25, 6: 0.75}
    with trainer.log_writer:
        model.eval()
        trainer.call_before_training(trainer.callbacks)
        model.train()
        for step in range(UPDATES):
            g = torch.Generator().manual_seed(100 + step)
            batch = {"x": torch.randn(BATCH, 4, generator=g), "y": torch.randn(BATCH, 3, generator=g)}
            model.optimizer_schedule_step()
            trainer.update(batch, dist_model=model, model=model, accumulation_steps_total=1, accumulation_step=0)
            trainer.update_counter.add_samples(BATCH)
            trainer.update_counter.next_update()
            if trainer.update_counter.cur_iteration.update % trainer.updates_per_epoch == 0:
                trainer.update_counter.next_epoch()
            if trainer.update_counter.cur_iteration.update in val_losses:
                trainer.log_writer.add_scalar(METRIC, val_losses[trainer.update_counter.cur_iteration.update])
            with torch.no_grad():
                for cb in trainer.callbacks:
                    cb.track_after_update_step(update_counter=trainer.update_counter, times={})
            model.eval()
            trainer._run_periodic_callbacks(trainer.callbacks, model=model, dist_model=model, data_iter=iter(()),
                                            batch_size=BATCH)
            model.train()
        model.eval()
        trainer.call_after_training(trainer.callbacks)
    return NoetherRun(root, run_id, stage_name, model, trainer.callbacks)


def by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """An optimizer's state by parameter name (plain, unsharded models)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: {k: v.clone() for k, v in st.items()} for p, st in optimizer.state.items()}


def sharded_net(seed: int = 7, lr_scale_head: bool = False, optimizer: bool = True) -> FilesNet:
    """A FilesNet with other weights, FSDP2-sharded over the default group, then given
    Noether's optimizer (built over the sharded parameters, as Noether would); without
    ``optimizer`` a frozen one (an EMA target)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = FilesNet(model_config(lr_scale_head)) if optimizer else FilesNet(FilesNetConfig(), is_frozen=True)
    for layer in (model.input_projection, model.blocks[0], model.blocks[2], model.head):
        fully_shard(layer)
    fully_shard(model)
    model.initialize()
    return model
