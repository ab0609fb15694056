"""noether_dist: distributed checkpointing under the Noether naming convention.

Save sharded model, optimizer, EMA and trainer state with :class:`Checkpointer`; resume
on any world size with :func:`resume`, every rank agreeing on one committed checkpoint.
"""

from .config import AsyncMode, CheckpointerConfig, ResumeConfig
from .errors import (AmbiguousCheckpointError, CheckpointNotFoundError, CommitError, ConfigError,
                     DistributedTimeoutError, InvalidNameError, NoetherDistError, RemoteRankError,
                     StateMismatchError, StorageError)
from .layout import StageLayout, default_run_id
from .names import TrainingIteration
from .resume import ResumeResult, resume
from .save import Checkpointer, SaveResult
from .storage import StorageOptions

__all__ = [
    "AmbiguousCheckpointError", "AsyncMode", "CheckpointNotFoundError", "Checkpointer", "CheckpointerConfig",
    "CommitError", "ConfigError", "DistributedTimeoutError", "InvalidNameError", "NoetherDistError",
    "RemoteRankError", "ResumeConfig", "ResumeResult", "SaveResult", "StageLayout", "StateMismatchError",
    "StorageError", "StorageOptions", "TrainingIteration", "default_run_id", "resume",
]
