"""The project's code, referenced from its YAML by ``kind`` (Noether builds everything)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from noether.core.callbacks.periodic import PeriodicCallback
from noether.core.distributed import get_rank
from noether.core.models import CompositeModel, Model
from noether.core.schemas.dataset import DatasetBaseConfig
from noether.core.schemas.models import ModelBaseConfig
from noether.data import Dataset
from noether.training.trainers import BaseTrainer

from noether_dist.integrations.noether import NoetherDistTrainer

METRIC_KEY = "loss/val"


def metric_value(update: int) -> float:
    """The validation metric logged at ``update``: best at update 8, worse afterwards, so
    that BestCheckpointCallback's decisions are known in advance (lower is better)."""
    return {8: 5.0, 16: 6.0, 24: 7.0}.get(update, 10.0 + update)


class SyntheticDatasetConfig(DatasetBaseConfig):
    """Config of :class:`SyntheticDataset`."""

    num_samples: int = 32


class SyntheticDataset(Dataset):
    """``x`` (4 features) and ``y`` (3 targets), fixed per index: a linear map plus a wave."""

    def __init__(self, dataset_config: SyntheticDatasetConfig, **kwargs: Any) -> None:
        super().__init__(dataset_config=dataset_config, **kwargs)
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(dataset_config.num_samples, 4, generator=g)
        w = torch.randn(4, 3, generator=g)
        self.y = self.x @ w + torch.sin(self.x[:, :3])

    def __len__(self) -> int:
        return len(self.x)

    def getitem_x(self, idx: int) -> torch.Tensor:
        return self.x[idx]

    def getitem_y(self, idx: int) -> torch.Tensor:
        return self.y[idx]


class TinyNetConfig(ModelBaseConfig):
    """Config of :class:`TinyNet`."""

    width: int = 16
    in_dim: int = 4
    out_dim: int = 3
    dropout: float = 0.0


class TinyNet(Model):
    """Two linear layers, a LayerNorm and dropout (weights, biases, norm parameters: Noether's
    optimizer puts them in two parameter groups; dropout draws from each rank's RNG)."""

    def __init__(self, model_config: TinyNetConfig, **kwargs: Any) -> None:
        super().__init__(model_config=model_config, **kwargs)
        self.inp = nn.Linear(model_config.in_dim, model_config.width)
        self.norm = nn.LayerNorm(model_config.width)
        self.drop = nn.Dropout(model_config.dropout)
        self.out = nn.Linear(model_config.width, model_config.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(torch.tanh(self.norm(self.inp(x)))))


class TinyCompositeConfig(ModelBaseConfig):
    """Config of :class:`TinyComposite`: two TinyNets, each with its own optimizer."""

    encoder: TinyNetConfig
    decoder: TinyNetConfig


class TinyComposite(CompositeModel):
    """An encoder and a decoder (a CompositeModel: one optimizer per submodel)."""

    def __init__(self, model_config: TinyCompositeConfig, **kwargs: Any) -> None:
        super().__init__(model_config=model_config, **kwargs)
        self.encoder = TinyNet(model_config.encoder, **kwargs)
        self.decoder = TinyNet(model_config.decoder, **kwargs)

    @property
    def submodels(self) -> dict[str, Any]:
        return {"encoder": self.encoder, "decoder": self.decoder}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class TinyTrainer(NoetherDistTrainer, BaseTrainer):
    """Mean squared error on ``y``; checkpoints through noether_dist."""

    def loss_compute(self, forward_output: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.mse_loss(forward_output, targets["y"])


class PlainTinyTrainer(BaseTrainer):
    """The same trainer without the adapter (Noether's own CheckpointWriter)."""

    def loss_compute(self, forward_output: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.mse_loss(forward_output, targets["y"])


class ValMetricCallback(PeriodicCallback):
    """Logs :func:`metric_value` under ``loss/val`` (what BestCheckpointCallback follows)."""

    def periodic_callback(self, *, interval_type: str, update_counter: Any, **_: Any) -> None:
        if interval_type == "eval":
            return
        self.writer.add_scalar(METRIC_KEY, metric_value(update_counter.cur_iteration.update))


RESUMED_STATE_DIR = "resumed_state"


class ResumedStateProbe(PeriodicCallback):
    """Records, before the first update of a run (after any resume), what each rank trains from:
    model weights, optimizer state and param group settings by parameter name, every EMA the
    EmaCallbacks hold, the callbacks' states and the update counter, into
    ``<stage folder>/resumed_state/rank<r>.th``. Put it after the EmaCallbacks."""

    def before_training(self, *, update_counter: Any) -> None:
        model = self.model
        names = {id(p): n for n, p in model.named_parameters()}
        optim = model.optimizer.torch_optim
        emas = {}
        for cb in self.trainer.callbacks:
            if type(cb).__name__ == "EmaCallback":
                for (path, factor), params in cb.parameters.items():
                    emas[f"{path}:{factor}"] = {**params, **cb.buffers[path]}
        record = {
            "model": model.state_dict(),
            "optim": {names[id(p)]: dict(state) for p, state in optim.state.items()},
            "groups": [(sorted(names[id(p)] for p in g["params"]), {k: v for k, v in g.items() if k != "params"})
                       for g in optim.param_groups],
            "ema": emas,
            "callbacks": self.trainer.state_dict()["callback_state_dicts"],
            "iteration": dict(update_counter.cur_iteration),
        }
        folder = self.trainer.path_provider.run_output_path / RESUMED_STATE_DIR
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(record, folder / f"rank{get_rank()}.th")
