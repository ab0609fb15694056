"""Where a process sits in the job (torchrun, srun, a plain process) and SLURM host lists:
pure functions of the environment, no process group (the process group formed from srun's
variables: tests/dist/test_dist_env.py)."""

from __future__ import annotations

import pytest

from noether_dist.dist.launch_env import DistEnv, first_host
from tests.support.launcher_env import BATCH_SCRIPT, SRUN_TASK_1


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
    requeued = DistEnv.from_env({**SRUN_TASK_1, "SLURM_RESTART_COUNT": "1"}).master_port
    assert requeued != env.master_port and 15000 <= requeued < 30000, \
        "a requeued job must not reuse the port its previous run may still hold"


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
