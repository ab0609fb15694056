"""Trainer state that a full resumption restores: progress, data position, callbacks, RNG.

Everything here turns into plain dicts of tensors, numbers, strings and lists, so that it
can be saved inside a checkpoint and loaded back with ``weights_only=True``.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from .errors import ConfigError
from .format.names import TrainingIteration
from .format.trainer_keys import ITERATION_KEY

__all__ = ["DataPosition", "Callback", "capture_rng", "restore_rng", "callback_states", "load_callback_states"]


@dataclass(frozen=True)
class DataPosition:
    """Where the data stream stands: the sampler's epoch and the batches consumed in it."""

    epoch: int
    batch_in_epoch: int

    def to_dict(self) -> dict[str, int]:
        """Plain-dict form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataPosition:
        """Inverse of :meth:`to_dict`."""
        return cls(int(data["epoch"]), int(data["batch_in_epoch"]))


@runtime_checkable
class Callback(Protocol):
    """A trainer callback whose state survives a resume (keyed by ``name``, not position)."""

    name: str

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def callback_states(callbacks: list[Callback]) -> dict[str, dict[str, Any]]:
    """``{name: state}`` of every callback; names must be unique."""
    out: dict[str, dict[str, Any]] = {}
    for cb in callbacks:
        if cb.name in out:
            raise ConfigError(f"two callbacks are named {cb.name!r}; callback names must be unique")
        out[cb.name] = cb.state_dict()
    return out


def load_callback_states(callbacks: list[Callback], states: dict[str, dict[str, Any]]) -> list[str]:
    """Restore callbacks by name; returns the names that had no saved state."""
    missing = []
    for cb in callbacks:
        if cb.name in states:
            cb.load_state_dict(states[cb.name])
        else:
            missing.append(cb.name)
    return missing


def capture_rng() -> dict[str, Any]:
    """RNG states of torch (CPU and every CUDA device), numpy and python's random."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng` (CUDA states only where CUDA is available)."""
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def iteration_from_state(state: dict[str, Any]) -> TrainingIteration:
    """The training point stored in a trainer state dict (``training_iteration``)."""
    return TrainingIteration.from_dict(state[ITERATION_KEY])
