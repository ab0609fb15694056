"""The reference trainer's toy problem: a small MLP, its FSDP2 sharding, and synthetic
regression data that every rank builds alike (no download)."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelSettings, TrainerSettings

__all__ = ["build_model", "epoch_order", "shard_model", "synthetic_data"]


def build_model(settings: ModelSettings, seed: int) -> nn.Module:
    """The MLP, initialised from ``seed`` (the same on every rank)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(settings.dim_in, settings.hidden), nn.GELU(), nn.Dropout(settings.dropout),
                         nn.Linear(settings.hidden, settings.hidden), nn.GELU(),
                         nn.Linear(settings.hidden, settings.dim_out))


def shard_model(model: nn.Module) -> nn.Module:
    """FSDP2: shard each Linear, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def synthetic_data(settings: ModelSettings, trainer: TrainerSettings) -> tuple[torch.Tensor, ...]:
    """Train and test sets from a fixed random teacher network: the same on every rank."""
    g = torch.Generator().manual_seed(trainer.seed + 12345)
    teacher = torch.randn(settings.dim_in, settings.dim_out, generator=g)
    x = torch.randn(trainer.dataset_size + trainer.test_size, settings.dim_in, generator=g)
    y = torch.tanh(x @ teacher) + 0.05 * torch.randn(x.shape[0], settings.dim_out, generator=g)
    n = trainer.dataset_size
    return x[:n], y[:n], x[n:], y[n:]


def epoch_order(seed: int, epoch: int, size: int) -> torch.Tensor:
    """The sample order of one epoch: depends only on seed and epoch (resumable mid-epoch)."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed * 1000003 + epoch))
