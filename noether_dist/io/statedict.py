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
import weakref
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


# Models whose own ``state_dict()`` was seen to equal ``get_model_state_dict``'s (same keys in
# the same order, same tensors): their key tuple. DCP's function spends most of its time
# mapping every parameter to its FQN by walking the modules (0.6 ms for 8 layers, 27 ms for
# 256 on this VM), which an async save's stall pays on every call; for such models the
# mapping is the identity, so later calls take ``state_dict()`` and only check its keys.
_PLAIN_KEYS: weakref.WeakKeyDictionary[nn.Module, tuple[str, ...]] = weakref.WeakKeyDictionary()


def model_state(model: nn.Module | dict[str, Any]) -> dict[str, Any]:
    """The (sharded) state dict of a model, as ``get_model_state_dict`` returns it (FSDP2
    parameters stay DTensors, keys are FQNs); a dict passes through unchanged."""
    if isinstance(model, nn.Module):
        keys = _PLAIN_KEYS.get(model)
        if keys is not None:
            with torch.no_grad():
                own = type(model).state_dict(model)  # the class's: get_model_state_dict may patch the instance's
            if tuple(own) == keys:
                return own
        state = get_model_state_dict(model, options=_OPTS)
        _remember_if_plain(model, state)
        return state
    if isinstance(model, dict):
        return model
    raise ConfigError(f"expected an nn.Module or a state dict, got {type(model).__name__}")


def _remember_if_plain(model: nn.Module, state: dict[str, Any]) -> None:
    """Record ``model`` in _PLAIN_KEYS when its own state_dict() is ``state``: not for FSDP1
    (whose state_dict() depends on a state-dict-type context, and may be a collective), nor
    for wrappers whose keys DCP renames (DDP's ``module.``, torch.compile's ``_orig_mod.``)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        return
    with torch.no_grad():
        own = type(model).state_dict(model)
    if list(own) != list(state):
        return
    for key, value in state.items():
        other = own[key]
        if type(other) is not type(value):
            return
        if isinstance(value, torch.Tensor):
            mine, theirs = (other.to_local(), value.to_local()) if isinstance(value, DTensor) else (other, value)
            if mine.data_ptr() != theirs.data_ptr() or mine.shape != theirs.shape or mine.dtype != theirs.dtype:
                return
    _PLAIN_KEYS[model] = tuple(state)


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
        self._flat: dict[str, _FlatSlot] = {}

    def stage(self, slot: str, state: Any) -> Any:
        """Copy ``state`` into the slot's buffers (allocating them when missing or when the
        state changed shape) and return the staged state: new containers, the slot's tensors."""
        from . import dcp_io

        buffers = self._slots.get(slot)
        if buffers is not None:
            try:
                with torch.no_grad():  # once here, not per tensor: _copy_into recurses per value
                    flat = self._flat.get(slot)
                    if flat is not None and isinstance(state, dict) and tuple(state) == flat.keys:
                        return flat.copy(state, self.pinned)
                    return _copy_into(state, buffers, self.pinned)
            except _Mismatch:
                log.info("staging buffers of %s no longer fit its state: allocating new ones", slot)
                self._slots.pop(slot)
                self._flat.pop(slot, None)
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
        with torch.no_grad():
            staged = _copy_into(state, buffers, self.pinned)
        self._slots[slot] = buffers
        flat = _FlatSlot.of(buffers)
        if flat is not None:
            self._flat[slot] = flat
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
        self._flat.clear()


class _FlatSlot:
    """The buffers of a slot whose state is one flat dict of tensors (a model's state dict),
    as a list: a later stage with the same keys in the same order copies tensor by tensor,
    checking only what the allocation depended on (shape, dtype; a DTensor's global shape and
    placements), instead of walking the structure per value."""

    def __init__(self, buffers: dict[str, torch.Tensor]) -> None:
        self.keys = tuple(buffers)
        self.buffers = list(buffers.values())
        self.locals = [b.to_local() if isinstance(b, DTensor) else b for b in self.buffers]
        self.sharded = [isinstance(b, DTensor) for b in self.buffers]

    @classmethod
    def of(cls, buffers: Any) -> _FlatSlot | None:
        """A _FlatSlot of ``buffers`` when it is a dict of tensors (no 0-dim DTensor), else None."""
        if not isinstance(buffers, dict) or not all(
                isinstance(b, torch.Tensor) and not (isinstance(b, DTensor) and b.ndim == 0) for b in buffers.values()):
            return None
        return cls(buffers)

    def copy(self, state: dict[str, Any], non_blocking: bool) -> dict[str, torch.Tensor]:
        """``state`` (same keys, same order) copied into the buffers; raises _Mismatch, before
        copying that tensor, where one no longer fits. The caller holds ``torch.no_grad()``."""
        for value, buf, local, sharded in zip(state.values(), self.buffers, self.locals, self.sharded):
            if sharded:
                if not isinstance(value, DTensor) or value.shape != buf.shape or value.placements != buf.placements:
                    raise _Mismatch
                value = value.to_local()
            elif not isinstance(value, torch.Tensor) or isinstance(value, DTensor) or value is local:
                raise _Mismatch
            if value.shape != local.shape or value.dtype != local.dtype:
                raise _Mismatch
            local.copy_(value, non_blocking=non_blocking)
        return dict(zip(self.keys, self.buffers))


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


def _copy_into(src: Any, dst: Any, non_blocking: bool) -> Any:
    """``src`` with every tensor copied into the matching tensor of ``dst`` (same
    structure); raises _Mismatch, before copying that tensor, where the two differ. The
    caller holds ``torch.no_grad()`` (entering it per value cost more than the copy of a
    small tensor)."""
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
