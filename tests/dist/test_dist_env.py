"""Real ranks from launcher environments: the process group formed from srun's variables,
and a preemption signal that reaches one rank only.

No SLURM needed: the srun environment is written by hand, as srun sets it (Slurm 22.05).
The one-process checks of the same modules (host lists, DistEnv, restoring signal
handlers) are in tests/unit/test_launch_env.py and tests/unit/test_preemption.py.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from tests.support import forked_main
from tests.support.launcher_env import SRUN_TASK_1
from tests.support.ranks import run_ranks

REPO = str(Path(__file__).resolve().parents[2])


# -------------------------------------------------------------- process group from srun env

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_init_distributed_from_srun_variables(tmp_path):
    """Three processes with only srun's variables (as `srun -n 3` sets them) form one gloo
    group; the master is the first host of the node list, the port comes from MASTER_PORT
    (here: a free one, as the job-id port could be taken on a shared test machine)."""
    port = _free_port()
    runs = []
    for rank in range(3):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
        env.update(SRUN_TASK_1, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="3",
                   SLURM_STEP_NUM_TASKS="3", SLURM_STEP_NODELIST="localhost,otherhost", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1")
        runs.append(("tests.support.srun_task", [], env))
    # three processes at once, forked from the ranks' forkserver (torch imported there once)
    done = forked_main.run_all(runs, cwd=REPO, timeout_s=90)
    for rank, proc in enumerate(done):
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"rank {rank} (exit {proc.returncode}; -9: still running after 90 s):\n{out}"
        assert f"OK rank={rank} world=3 sum=6.0 ranks=[0, 1, 2] backend=gloo" in out, out


# ------------------------------------------------------------------------ preemption

def _signal_one_rank(rank: int, world_size: int, target: int) -> dict:
    import time

    from noether_dist.dist.comm import Comm
    from noether_dist.dist.preemption import PreemptionWatcher

    comm = Comm(timeout_s=60)
    watcher = PreemptionWatcher(comm)
    try:
        steps = []
        for step in range(50):
            if step == 3 and rank == target:
                os.kill(os.getpid(), signal.SIGUSR1)
                time.sleep(0.05)  # the handler runs between bytecodes: let it
            if watcher.agreed():
                steps.append(step)
                break
        return {"stopped_at": steps, "signalled": watcher.signalled, "received": watcher.received}
    finally:
        watcher.restore()


@pytest.mark.slow
def test_signal_to_one_rank_stops_every_rank_at_the_same_step():
    out = run_ranks(_signal_one_rank, 3, 1, timeout_s=60)
    assert [o["stopped_at"] for o in out] == [[3], [3], [3]]
    assert [o["signalled"] for o in out] == [False, True, False]
    assert out[1]["received"] == "SIGUSR1"
