"""Preemption signals in one process: the watcher puts the previous handlers back (a signal
that reaches one of several ranks: tests/dist/test_dist_env.py)."""

from __future__ import annotations

import os
import signal


def test_watcher_restores_previous_handlers():
    from noether_dist.dist.comm import Comm
    from noether_dist.dist.preemption import PreemptionWatcher

    before = signal.getsignal(signal.SIGTERM)
    watcher = PreemptionWatcher(Comm())
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert watcher.agreed() and watcher.received == "SIGTERM"
    finally:
        watcher.restore()
    assert signal.getsignal(signal.SIGTERM) == before
