"""Progress on stderr for long tool work (verify, convert, prune), in bytes with rate and
ETA, drawn by tqdm (which Noether uses too) rather than by a counter of our own."""

from __future__ import annotations

import sys
import threading
from typing import Any

__all__ = ["Bar"]


class Bar:
    """A byte progress bar; safe to update from several threads. Disabled, it draws nothing
    (and tqdm is not imported). Use as a context manager, or call :meth:`close`."""

    def __init__(self, desc: str = "", *, enabled: bool = True, total: int = 0) -> None:
        self._lock = threading.Lock()
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc or None, unit="B", unit_scale=True, unit_divisor=1024,
                             file=sys.stderr, dynamic_ncols=True, mininterval=0.5, leave=True)

    def add_total(self, nbytes: int) -> None:
        """More work became known."""
        if self._bar is not None and nbytes:
            with self._lock:
                self._bar.total = (self._bar.total or 0) + nbytes
                self._bar.refresh()

    def update(self, nbytes: int) -> None:
        """``nbytes`` more are done."""
        if self._bar is not None and nbytes:
            with self._lock:
                self._bar.update(nbytes)

    def describe(self, text: str) -> None:
        """Say what is being worked on now."""
        if self._bar is not None:
            with self._lock:
                self._bar.set_postfix_str(text[:60], refresh=False)

    def close(self) -> None:
        """Finish the bar's line."""
        if self._bar is not None:
            with self._lock:
                self._bar.close()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
