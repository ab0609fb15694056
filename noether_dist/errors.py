"""The exceptions of noether_dist: one root, a few children named for what went wrong."""

from __future__ import annotations

__all__ = [
    "NoetherDistError",
    "InvalidNameError",
    "ConfigError",
    "StorageError",
    "CheckpointNotFoundError",
    "AmbiguousCheckpointError",
    "CommitError",
    "AliasUpdateError",
    "UploadError",
    "StateMismatchError",
    "DistributedTimeoutError",
    "RemoteRankError",
]


class NoetherDistError(Exception):
    """Root of every error this package raises on purpose."""


class InvalidNameError(NoetherDistError, ValueError):
    """A run id, stage, model name, model info, metric or checkpoint name is not allowed."""


class ConfigError(NoetherDistError, ValueError):
    """A configuration key or value is not valid; the message says what would be."""


class StorageError(NoetherDistError, OSError):
    """The store failed permanently (after retries), or a bucket/folder is missing."""


class CheckpointNotFoundError(NoetherDistError, LookupError):
    """No committed checkpoint matches what was asked for; the message lists what exists."""


class AmbiguousCheckpointError(NoetherDistError, LookupError):
    """A partial checkpoint spec (E10, U100, S200) matches several committed checkpoints."""


class CommitError(NoetherDistError):
    """A save failed on at least one rank, so nothing was committed: the checkpoints and
    aliases committed before are as they were."""


class AliasUpdateError(NoetherDistError):
    """The checkpoint DID commit (its commit record is written and ``latest`` names it, unless
    a newer one committed first), but moving another alias (``last``, ``best.<metric>``)
    failed. Not a :class:`CommitError`: the checkpoint is there and resume can select it;
    only the alias may still name an older one."""


class UploadError(CommitError):
    """An upload to the durable tier failed: no durable commit was written; the point stays
    committed on the local tier."""


class StateMismatchError(NoetherDistError, KeyError):
    """The state to load into does not match the checkpoint (missing / unexpected keys)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DistributedTimeoutError(NoetherDistError, TimeoutError):
    """A collective did not complete in time: a rank is gone or stuck."""


class RemoteRankError(NoetherDistError):
    """Raised on every rank when another rank failed; carries that rank's message."""

    def __init__(self, message: str, failed_ranks: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.failed_ranks = dict(failed_ranks or {})
