"""Data position and random streams on a resume.

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

from ...state import restore_rng

__all__ = ["EpochCountingSampler", "RestoreRngOnIter"]


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


class RestoreRngOnIter:
    """The training data loader of a resumed run: restores this rank's saved RNG states right
    after the loader's iterator is created (which draws from the global RNG) and before the
    first batch is loaded, so that data loading, augmentation and the model (dropout) draw
    what the uninterrupted run drew after the checkpoint (with ``num_workers=0``; worker
    processes have random streams of their own that Noether does not keep)."""

    def __init__(self, loader: Any, rng: dict[str, Any]) -> None:
        self.loader = loader
        self.rng: dict[str, Any] | None = rng

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.loader)
        if self.rng is not None:
            restore_rng(self.rng)
            self.rng = None  # once: a second iteration is not a resume
        return iterator

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)
