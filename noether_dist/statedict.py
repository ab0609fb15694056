"""Getting state out of, and back into, models and optimizers (plain or FSDP2-sharded).

Models and optimizers go through ``torch.distributed.checkpoint.state_dict`` so that
FSDP2/DTensor parameters stay sharded (each rank handles its own shard) and optimizer
state is keyed by parameter name, which is what makes resharding possible. Small
Python objects (trainer state) travel as uint8 tensors holding a ``torch.save`` blob, so
that loading them never unpickles arbitrary objects (``weights_only=True``).
"""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .errors import ConfigError

__all__ = ["staging_options", "model_state", "optimizer_state", "apply_model_state", "apply_optimizer_state",
           "pack_object", "unpack_object", "empty_like_packed"]

_OPTS = StateDictOptions(full_state_dict=False, cpu_offload=False)


def model_state(model: nn.Module | dict[str, Any]) -> dict[str, Any]:
    """The (sharded) state dict of a model; a dict passes through unchanged."""
    if isinstance(model, nn.Module):
        return get_model_state_dict(model, options=_OPTS)
    if isinstance(model, dict):
        return model
    raise ConfigError(f"expected an nn.Module or a state dict, got {type(model).__name__}")


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter FQN (initialised if the optimizer never stepped)."""
    return get_optimizer_state_dict(model, optimizer, options=_OPTS)


def apply_model_state(model: nn.Module | dict[str, Any], state: dict[str, Any]) -> None:
    """Put a loaded state dict back into a model (a dict target was loaded in place)."""
    if isinstance(model, nn.Module):
        set_model_state_dict(model, state, options=StateDictOptions(strict=True))


def apply_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Put a loaded optimizer state back into an optimizer."""
    set_optimizer_state_dict(model, optimizer, state, options=_OPTS)


def pack_object(obj: Any) -> torch.Tensor:
    """``torch.save`` an object of tensors, numbers, strings, lists and dicts into a uint8 tensor."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def unpack_object(tensor: torch.Tensor) -> Any:
    """Inverse of :func:`pack_object`, loading with ``weights_only=True``."""
    return torch.load(io.BytesIO(tensor.numpy().tobytes()), weights_only=True)


def empty_like_packed(numel: int) -> torch.Tensor:
    """A placeholder to load a packed object of ``numel`` bytes into."""
    return torch.empty(numel, dtype=torch.uint8)


def staging_options(shared: bool = False) -> Any:
    """DCP staging options: pinned memory and non-blocking copies where CUDA is available,
    synchronous staging (the caller waits only for the copy), shared memory on request."""
    from torch.distributed.checkpoint.staging import StagingOptions

    cuda = torch.cuda.is_available()
    return StagingOptions(use_pinned_memory=cuda, use_shared_memory=shared, use_async_staging=False,
                          use_non_blocking_copy=cuda)
