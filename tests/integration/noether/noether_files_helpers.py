"""Checkpoint files written by Noether's own code, for tests that load them with noether_dist.

Nothing here imitates Noether: the shared project (tests/integration/noether/project: TinyNet, its
callbacks CheckpointCallback, EmaCallback, BestCheckpointCallback, its validation metric)
with Noether's own trainer (adapter off) runs its own update step (``trainer.update``) and
its own callback dispatch (``_run_periodic_callbacks``, ``call_after_training``), which write
through Noether's ``CheckpointWriter`` and ``OptimizerWrapper`` (named param groups,
``param_idx_to_name``). Only the data loader is replaced by a loop over deterministic
batches: the files do not depend on it, and the run stays in this process, so that its
live state at the end can be compared too.

Runs in one process (Noether writes on rank 0). Only importable in the Noether env.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from noether.core.providers import MetricPropertyProvider, PathProvider
from noether.core.schemas import BaseTrainerConfig
from noether.core.trackers.noop import NoopTracker
from noether.data.container import DataContainer

from tests.integration.noether.adapter_helpers import EMA as EMA_FACTOR
from tests.integration.noether.adapter_helpers import plain_config
from tests.integration.noether.project.project import (METRIC_KEY as METRIC, PlainTinyTrainer, SyntheticDataset,
                                           SyntheticDatasetConfig, TinyNet, TinyNetConfig)

__all__ = ["NoetherRun", "write_noether_run", "METRIC", "EMA_FACTOR", "MODEL", "model_config", "make_trainer",
           "sharded_net", "by_name"]

MODEL = "tinynet"
"""The project's model name, the first part of every file name."""
UPDATES = 12
"""Checkpoints (weights, optimizer, ``latest``) and EMA every 2 updates; the best model by
``loss/val`` after each epoch of 8 updates (update 8); ``last`` at update 12."""


def model_config(lr_scale_input: bool = False, initializers: list | None = None) -> TinyNetConfig:
    """The project's model config: AdamW with weight decay (biases and norms excluded by
    Noether's defaults, so Noether's parameter order is not ``model.parameters()`` order and
    several parameters of one shape sit in other places); with ``lr_scale_input`` a third and
    fourth group scale the input layer's learning rate."""
    spec = plain_config(Path("."), "-")["model"]
    if lr_scale_input:
        spec["optimizer_config"]["param_group_modifiers_config"] = [
            {"kind": "noether.core.optimizer.param_group_modifiers.LrScaleByNameModifier", "name": n, "scale": 0.1}
            for n in ("inp.weight", "inp.bias")]
    return TinyNetConfig.model_validate({**spec, "initializers": initializers})


class NoetherRun:
    """What Noether wrote, read back from memory at the end of training (for comparing)."""

    def __init__(self, root: Path, run_id: str, stage_name: str, model: TinyNet, callbacks: list) -> None:
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


def make_trainer(root: Path, run_id: str, stage_name: str) -> PlainTinyTrainer:
    """The project's trainer with the adapter off, stopping after UPDATES updates."""
    path_provider = PathProvider(output_root_path=root, run_id=run_id, stage_name=stage_name)
    metrics = MetricPropertyProvider()
    config = plain_config(root, run_id)["trainer"]
    config = BaseTrainerConfig.model_validate({**config, "max_updates": UPDATES})
    data = DataContainer(datasets={"train": SyntheticDataset(SyntheticDatasetConfig())}, num_workers=0,
                         pin_memory=False)
    return PlainTinyTrainer(config, data_container=data, device="cpu", tracker=NoopTracker(metrics, path_provider),
                            path_provider=path_provider, metric_property_provider=metrics)


def write_noether_run(root: Path | str, run_id: str = "noe", stage_name: str = "train", *,
                      lr_scale_input: bool = False, seed: int = 0) -> NoetherRun:
    """Train the project's TinyNet for UPDATES updates with Noether's trainer step and the
    project's callbacks (see UPDATES); the validation metric is the project's (best at
    update 8). Returns where the files are and the trained model."""
    root = Path(root)
    torch.manual_seed(seed)
    logging.getLogger("noether").setLevel(logging.WARNING)
    trainer = make_trainer(root, run_id, stage_name)
    model = TinyNet(model_config(lr_scale_input), update_counter=trainer.update_counter,
                    path_provider=trainer.path_provider)
    model = trainer._prepare_model(model)
    trainer.callbacks = trainer.get_user_callbacks(model)
    batch_size = trainer.config.effective_batch_size
    with trainer.log_writer:
        model.eval()
        trainer.call_before_training(trainer.callbacks)
        model.train()
        for step in range(UPDATES):
            g = torch.Generator().manual_seed(100 + step)
            batch = {"x": torch.randn(batch_size, 4, generator=g), "y": torch.randn(batch_size, 3, generator=g)}
            model.optimizer_schedule_step()
            trainer.update(batch, dist_model=model, model=model, accumulation_steps_total=1, accumulation_step=0)
            trainer.update_counter.add_samples(batch_size)
            trainer.update_counter.next_update()
            if trainer.update_counter.cur_iteration.update % trainer.updates_per_epoch == 0:
                trainer.update_counter.next_epoch()
            with torch.no_grad():
                for cb in trainer.callbacks:
                    cb.track_after_update_step(update_counter=trainer.update_counter, times={})
            model.eval()
            end_of_epoch = trainer.update_counter.is_full_epoch
            trainer._run_periodic_callbacks(trainer.callbacks, model=model, dist_model=model, data_iter=iter(()),
                                            batch_size=batch_size)
            if end_of_epoch:  # BestCheckpointCallback runs every epoch
                trainer._run_periodic_callbacks(trainer.callbacks, model=model, dist_model=model,
                                                data_iter=iter(()), batch_size=batch_size, end_of_epoch=True)
            model.train()
        model.eval()
        trainer.call_after_training(trainer.callbacks)
    return NoetherRun(root, run_id, stage_name, model, trainer.callbacks)


def by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """An optimizer's state by parameter name (plain, unsharded models)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: {k: v.clone() for k, v in st.items()} for p, st in optimizer.state.items()}


def sharded_net(seed: int = 7, lr_scale_input: bool = False, optimizer: bool = True) -> TinyNet:
    """A TinyNet with other weights, FSDP2-sharded over the default group, then given
    Noether's optimizer (built over the sharded parameters, as Noether would); without
    ``optimizer`` a frozen one (an EMA target)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    if optimizer:
        model = TinyNet(model_config(lr_scale_input))
    else:
        model = TinyNet(model_config().model_copy(update={"optimizer_config": None}), is_frozen=True)
    for layer in (model.inp, model.out):
        fully_shard(layer)
    fully_shard(model)
    model.initialize()
    return model
