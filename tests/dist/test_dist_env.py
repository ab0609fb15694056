"""Where a process sits in the job (torchrun, srun, a plain process), SLURM host lists, the
process group formed from srun's variables, and preemption signals that reach some ranks.

No SLURM needed: the srun environment is written by hand, as srun sets it (Slurm 22.05).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from noether_dist.dist.launch_env import DistEnv, first_host
from tests.support.ranks import run_ranks

# What `srun -n 2` sets in task 1 of job 1234 on one node (measured), and what the batch
# script of a `sbatch -n 4` job sees (no step variables).
SRUN_TASK_1 = {
    "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_STEP_NODELIST": "node[01-02]",
    "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NODEID": "0", "SLURM_NTASKS": "2", "SLURM_NPROCS": "2",
    "SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "1",
}
BATCH_SCRIPT = {
    "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0", "SLURM_NTASKS": "4", "SLURM_NPROCS": "4", "SLURM_NNODES": "2",
}


# --------------------------------------------------------------------------- first_host

@pytest.mark.parametrize("nodelist, first", [
    ("node[01-04,07],gpu2", "node01"),
    ("gpu2,node[01-04,07]", "gpu2"),
    ("node07", "node07"),
    ("localhost", "localhost"),
    ("node[9-11]", "node9"),
    ("node[001-004]", "node001"),
    ("rack1-node[3,1-2]", "rack1-node3"),
    ("node[07,01-04]", "node07"),
    ("node[001-004]-ib", "node001-ib"),
    ("a[1-2]b[3-4],c5", "a1b3"),
    ("gpu-[10-12].cluster.local", "gpu-10.cluster.local"),
    ("  node[2-3]  ", "node2"),
    ("10.0.0.5,10.0.0.6", "10.0.0.5"),
])
def test_first_host_expands_slurm_hostlists(nodelist, first):
    assert first_host(nodelist) == first


@pytest.mark.parametrize("nodelist", ["", "node[01-04", "node01-04]", "node[]", "node[a-b]", ",node1", "node[[1]]"])
def test_first_host_rejects_malformed_lists(nodelist):
    with pytest.raises(ValueError, match="node list"):
        first_host(nodelist)


# ----------------------------------------------------------------------------- DistEnv

def test_torchrun_variables_win():
    env = DistEnv.from_env({**SRUN_TASK_1, "RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                            "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29411"})
    assert env == DistEnv(3, 8, 1, "10.1.2.3", 29411, "torchrun")


def test_srun_task_reads_slurm_variables():
    env = DistEnv.from_env(SRUN_TASK_1)
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (1, 2, 1, "slurm")
    assert env.master_addr == "node01"
    assert 15000 <= env.master_port < 30000
    assert env.master_port == DistEnv.from_env({**SRUN_TASK_1, "SLURM_PROCID": "0"}).master_port, \
        "every task of the step must derive the same port"
    assert env.master_port != DistEnv.from_env({**SRUN_TASK_1, "SLURM_JOB_ID": "1235"}).master_port


def test_srun_master_from_env_overrides():
    env = DistEnv.from_env({**SRUN_TASK_1, "MASTER_PORT": "31000", "MASTER_ADDR": "head"})
    assert (env.master_addr, env.master_port) == ("head", 31000)


def test_srun_step_task_count_wins_over_allocation():
    # `srun -n 2` inside an allocation of 4 tasks: the step has 2.
    env = DistEnv.from_env({**SRUN_TASK_1, "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "2"})
    assert env.world_size == 2


def test_batch_script_is_a_single_process():
    # The batch script has SLURM_PROCID=0 and SLURM_NTASKS=4 but is not a task of a step:
    # a trainer started there directly must not wait for 3 peers that never come.
    assert DistEnv.from_env(BATCH_SCRIPT) == DistEnv(0, 1, 0, "127.0.0.1", 0, "single")


def test_single_task_step_and_plain_process():
    assert DistEnv.from_env({**SRUN_TASK_1, "SLURM_PROCID": "0", "SLURM_NTASKS": "1",
                             "SLURM_STEP_NUM_TASKS": "1"}).launcher == "single"
    assert DistEnv.from_env({}).launcher == "single"


# -------------------------------------------------------------- process group from srun env

_INIT_SCRIPT = textwrap.dedent("""
    import torch, torch.distributed as dist
    from noether_dist.dist.comm import init_distributed, Comm
    env = init_distributed(timeout_s=60)
    assert env.launcher == "slurm", env
    t = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(t)
    ranks = Comm(timeout_s=60).all_gather(env.rank)
    print(f"OK rank={env.rank} world={dist.get_world_size()} sum={t.item()} ranks={ranks} backend={dist.get_backend()}", flush=True)
""")


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
    procs = []
    for rank in range(3):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
        env.update(SRUN_TASK_1, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="3",
                   SLURM_STEP_NUM_TASKS="3", SLURM_STEP_NODELIST="localhost,otherhost", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", _INIT_SCRIPT], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=90)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("process group from srun variables did not form within 90 s")
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank}:\n{out}"
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
