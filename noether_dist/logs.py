"""Rank-prefixed logging for noether_dist programs."""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["setup_logging"]


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logging(rank: int | None = None, level: int | str | None = None) -> None:
    """Log to stderr as ``[rank N] time level name: message``; idempotent.

    ``level`` defaults to NOETHER_DIST_LOG_LEVEL or INFO.
    """
    if rank is None:
        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    level = level or os.environ.get("NOETHER_DIST_LOG_LEVEL", "INFO")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_noether_dist", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._noether_dist = True  # type: ignore[attr-defined]
    handler.addFilter(_RankFilter(rank))
    handler.setFormatter(logging.Formatter("[rank %(rank)s] %(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
