"""Preemption: a signal reaches some ranks; all ranks agree at the next step boundary.

SLURM sends ``--signal=B:USR1@<s>`` to the batch shell (and ``scancel --signal`` to
chosen tasks), a time limit or ``scancel`` sends SIGTERM: any of them may reach only some
ranks. Each rank's handler only sets a flag; :meth:`PreemptionWatcher.agreed` is a
collective that tells every rank whether any rank was signalled, so that all ranks save
the same step together.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from collections.abc import Iterable

from .comm import Comm

__all__ = ["PreemptionWatcher", "requeue_slurm_job"]

log = logging.getLogger(__name__)


class PreemptionWatcher:
    """Sets a flag when one of ``signals`` arrives; :meth:`agreed` shares it among ranks."""

    def __init__(self, comm: Comm, signals: Iterable[str] = ("SIGUSR1", "SIGTERM")) -> None:
        self.comm = comm
        self._flag = threading.Event()
        self.received: str | None = None
        self._logged = False
        self._previous = {}
        for name in signals:
            sig = getattr(signal, name if name.startswith("SIG") else f"SIG{name}")
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.received = signal.Signals(signum).name
        self._flag.set()

    @property
    def signalled(self) -> bool:
        """True once this rank received a preemption signal."""
        return self._flag.is_set()

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank was signalled."""
        mine = self._flag.is_set()
        any_flag = not self.comm.all_true(not mine)
        if any_flag and not self._logged:
            self._logged = True  # (a signal handler must not log: logging takes locks)
            if mine:
                log.info("got %s: every rank stops at this step boundary", self.received)
            else:
                log.info("another rank was signalled; stopping with it at this step")
        return any_flag

    def restore(self) -> None:
        """Put the previous signal handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def requeue_slurm_job(timeout_s: float = 60.0) -> bool:
    """``scontrol requeue $SLURM_JOB_ID`` (call on one rank); False when not under SLURM
    or when the command failed (logged)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=timeout_s, capture_output=True, text=True)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.error("scontrol requeue %s failed: %s", job, detail)
        return False
    log.info("requeued SLURM job %s", job)
    return True
