"""Small models and training loops for tests: FSDP2-sharded on CPU/gloo, AdamW, an EMA copy."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict)

from noether_dist.trainer.model import shard_model

EMA_INFO = "ema_factor=0.9"


def make_mlp(seed: int = 0) -> nn.Module:
    """A tiny MLP whose weights depend only on ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 30), nn.ReLU(), nn.Linear(30, 7), nn.ReLU(), nn.Linear(7, 5))


def shard(model: nn.Module) -> nn.Module:
    """FSDP2-shard every Linear and the root over the default process group."""
    return shard_model(model)


def build(sharded: bool = True, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module]:
    """Model, AdamW, and an EMA copy (sharded like the model)."""
    model = make_mlp(seed)
    ema = copy.deepcopy(model)
    if sharded:
        shard(model)
        shard(ema)
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    return model, opt, ema


def build_on(group: Any, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module]:
    """Model, AdamW and EMA copy, FSDP2-sharded over the subgroup ``group`` only."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    mesh = DeviceMesh.from_group(group, "cpu")
    model = make_mlp(seed)
    ema = copy.deepcopy(model)
    for m in (model, ema):
        for layer in m:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
    for p in ema.parameters():
        p.requires_grad_(False)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01), ema


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, factor: float = 0.9) -> None:
    """ema = factor * ema + (1 - factor) * model, shard by shard."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.mul_(factor).add_(pm.detach(), alpha=1 - factor)


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, ema: nn.Module, steps: int, rank: int,
                start: int = 0) -> None:
    """A few deterministic AdamW steps on synthetic data (different per rank and step)."""
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 * rank + step)
        x = torch.randn(8, 16, generator=g)
        y = torch.randn(8, 5, generator=g)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        ema_update(ema, model)


def full_state(model: nn.Module, opt: torch.optim.Optimizer | None, ema: nn.Module | None) -> dict[str, Any]:
    """Unsharded copies of model, optimizer and EMA state (on every rank), for comparing."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=False)
    out = {"model": {k: v.clone() for k, v in get_model_state_dict(model, options=opts).items()}}
    if ema is not None:
        out["ema"] = {k: v.clone() for k, v in get_model_state_dict(ema, options=opts).items()}
    if opt is not None:
        osd = get_optimizer_state_dict(model, opt, options=opts)
        out["optim"] = {k: {n: (t.clone() if isinstance(t, torch.Tensor) else t) for n, t in v.items()}
                        for k, v in osd["state"].items()}
    return out


def assert_states_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Exact equality (torch.equal) of two ``full_state`` results."""
    assert a.keys() == b.keys(), (a.keys(), b.keys())
    for part in a:
        assert a[part].keys() == b[part].keys(), (part, a[part].keys(), b[part].keys())
        for key in a[part]:
            x, y = a[part][key], b[part][key]
            if isinstance(x, dict):
                for n in x:
                    assert torch.equal(torch.as_tensor(x[n]), torch.as_tensor(y[n])), (part, key, n)
            else:
                assert torch.equal(x, y), (part, key)
