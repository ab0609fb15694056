"""noether_dist: distributed checkpointing under the Noether naming convention.

Save sharded model, optimizer, EMA and trainer state with :class:`Checkpointer`; resume
on any world size with :func:`resume`, every rank agreeing on one committed checkpoint.
"""

import importlib
import sys
import types

from .config import AsyncMode, CheckpointerConfig, ResumeConfig
from .errors import (AliasUpdateError, AmbiguousCheckpointError, CheckpointNotFoundError, CommitError, ConfigError,
                     DistributedTimeoutError, InvalidNameError, NoetherDistError, RemoteRankError,
                     StateMismatchError, StorageError)
from .format.layout import StageLayout, default_run_id
from .format.names import TrainingIteration
from .io.storage import StorageOptions

# Loaded on first use: they import torch, which tools such as `noether-ckpt list` never need.
_LAZY = {"ResumeResult": "resume", "resume": "resume", "Checkpointer": "save", "SaveResult": "save"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    """``noether_dist.resume`` is the function, as it was when imported eagerly: loading the
    submodule of the same name must not replace it with the module."""

    @property
    def resume(self):  # noqa: D401 - the public function
        return importlib.import_module(f"{__name__}.resume").resume

    @resume.setter
    def resume(self, value) -> None:
        pass  # the import system binding the submodule


sys.modules[__name__].__class__ = _Package

__all__ = [
    "AliasUpdateError", "AmbiguousCheckpointError", "AsyncMode", "CheckpointNotFoundError", "Checkpointer", "CheckpointerConfig",
    "CommitError", "ConfigError", "DistributedTimeoutError", "InvalidNameError", "NoetherDistError",
    "RemoteRankError", "ResumeConfig", "ResumeResult", "SaveResult", "StageLayout", "StateMismatchError",
    "StorageError", "StorageOptions", "TrainingIteration", "default_run_id", "resume",
]
