"""Getting state out of, and back into, models and optimizers (plain or FSDP2-sharded).

Models and optimizers go through ``torch.distributed.checkpoint.state_dict`` so that
FSDP2/DTensor parameters stay sharded (each rank handles its own shard) and optimizer
state is keyed by parameter name, which is what makes resharding possible. Small
Python objects (trainer state) travel as uint8 tensors holding a ``torch.save`` blob, so
that loading them never unpickles arbitrary objects (``weights_only=True``).
"""

from __future__ import annotations

import copy
import io
import logging
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..errors import ConfigError

__all__ = ["SaveStaging", "model_state", "optimizer_state", "apply_model_state", "apply_optimizer_state",
           "pack_object", "unpack_object", "empty_like_packed"]

log = logging.getLogger(__name__)
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


class _Mismatch(Exception):
    """A state no longer fits the staging buffers reserved for its slot."""


class SaveStaging:
    """CPU copies of state dicts that a background writer reads while training goes on.

    Each slot (an artifact: model, an EMA, the optimizer) has its buffers, allocated the
    first time the slot is staged (or reserved by :meth:`stage` ahead of the first save)
    and reused by every later stage whose state has the same structure, shapes and dtypes;
    a state that no longer fits gets new buffers and the old ones are freed, so memory
    does not grow from save to save. On CUDA the buffers are pinned and the copies
    non-blocking (one synchronisation at the end); ``shared`` puts them in shared memory
    (for DCP's checkpoint process). The buffers of a slot must not be staged into while a
    writer still reads them: the caller waits for the previous save first.
    """

    def __init__(self, *, shared: bool = False) -> None:
        self.pinned = torch.cuda.is_available()
        self.shared = shared
        self._slots: dict[str, Any] = {}

    def stage(self, slot: str, state: Any) -> Any:
        """Copy ``state`` into the slot's buffers (allocating them when missing or when the
        state changed shape) and return the staged state: new containers, the slot's tensors."""
        from . import dcp_io

        buffers = self._slots.get(slot)
        if buffers is not None:
            try:
                return _copy_into(state, buffers, self.pinned)
            except _Mismatch:
                log.info("staging buffers of %s no longer fit its state: allocating new ones", slot)
                self._slots.pop(slot)
                del buffers
        # Pinned memory (CUDA): DCP's allocation, which knows how to pin shared memory and
        # give a DTensor a pinned local tensor. Otherwise empty_like does it in one step (a
        # DTensor gets a CPU local tensor, same placements), where DCP's would copy each
        # tensor once more only to drop that copy.
        buffers = (dcp_io.cpu_buffers_like(state, pinned=True, shared=self.shared) if self.pinned
                   else _empty_like(state))
        if self.shared:
            for tensor in _storages(buffers):
                if not tensor.is_shared():
                    tensor.share_memory_()  # in place: a DTensor keeps its (now shared) local tensor
        staged = _copy_into(state, buffers, self.pinned)
        self._slots[slot] = buffers
        return staged

    def synchronize(self) -> None:
        """Wait until the copies of the stages so far are complete (non-blocking on CUDA)."""
        if self.pinned:
            torch.cuda.synchronize()

    @property
    def nbytes(self) -> int:
        """Bytes of staging memory held (every slot's tensors)."""
        return sum(t.untyped_storage().nbytes() for t in _storages(self._slots))

    def storage_ptrs(self) -> set[int]:
        """Addresses of the staging buffers held (to tell reuse from reallocation)."""
        return {t.untyped_storage().data_ptr() for t in _storages(self._slots)}

    def close(self) -> None:
        """Free every buffer."""
        self._slots.clear()


@torch.no_grad()
def _empty_like(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return torch.empty_like(obj, device="cpu")
    if isinstance(obj, dict):
        return {key: _empty_like(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [_empty_like(value) for value in obj]
        return tuple(out) if isinstance(obj, tuple) else out
    return obj  # not a tensor: _copy_into takes the value of each save


@torch.no_grad()
def _storages(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, DTensor):
        return [obj.to_local()]
    if isinstance(obj, torch.Tensor):
        return [obj]
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return [t for item in items for t in _storages(item)]


@torch.no_grad()
def _copy_into(src: Any, dst: Any, non_blocking: bool) -> Any:
    """``src`` with every tensor copied into the matching tensor of ``dst`` (same
    structure); raises _Mismatch, before copying that tensor, where the two differ."""
    if isinstance(src, torch.Tensor):
        if isinstance(src, DTensor) and isinstance(dst, DTensor) and src.ndim == 0 and dst.ndim == 0:
            return src.detach().clone()  # DCP's allocation keeps 0-dim DTensors as they are
        if not isinstance(dst, torch.Tensor) or dst is src or isinstance(src, DTensor) != isinstance(dst, DTensor):
            raise _Mismatch
        if isinstance(src, DTensor):
            if src.shape != dst.shape or src.placements != dst.placements:
                raise _Mismatch
            src_local, dst_local = src.to_local(), dst.to_local()
        else:
            src_local, dst_local = src, dst
        if src_local.shape != dst_local.shape or src_local.dtype != dst_local.dtype or dst_local.device.type != "cpu":
            raise _Mismatch
        dst_local.copy_(src_local, non_blocking=non_blocking)
        return dst
    if isinstance(src, dict):
        if not isinstance(dst, dict) or dst.keys() != src.keys():
            raise _Mismatch
        return {key: _copy_into(value, dst[key], non_blocking) for key, value in src.items()}
    if isinstance(src, (list, tuple)):
        if not isinstance(dst, (list, tuple)) or len(dst) != len(src):
            raise _Mismatch
        out = [_copy_into(value, other, non_blocking) for value, other in zip(src, dst)]
        return tuple(out) if isinstance(src, tuple) else out
    if src is None or isinstance(src, (int, float, complex, str, bytes)):
        return src
    return copy.deepcopy(src)
