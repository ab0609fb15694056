"""Data position on a mid-epoch resume.

Noether 2026.4.0's InterleavedSampler skips the already seen part of the resumed epoch but
never counts that epoch as complete, so ``set_epoch`` is called with the resumed epoch's
number twice: the epoch after the resumed one replays its shuffle (DistributedSampler), and
training diverges from the uninterrupted run at the next epoch boundary. The adapter wraps
the main sampler of a mid-epoch resume so that each ``set_epoch`` after the first advances by
one epoch, which is what the sampler's loop means (one call per epoch it starts).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = ["EpochCountingSampler"]


class EpochCountingSampler:
    """Forwards to a sampler; the first ``set_epoch(e)`` sets epoch e, every later call the next epoch."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Set ``epoch`` the first time, then the epoch after the previous one."""
        self.epoch = int(epoch) if self.epoch is None else self.epoch + 1
        self.inner.set_epoch(self.epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:  # dataset, data_source, ... of the inner sampler
        return getattr(self.inner, name)
