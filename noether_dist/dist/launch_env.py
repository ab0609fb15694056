"""Where this process sits in the job, read from the launcher's environment.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; a task of an ``srun`` step carries
SLURM_* variables instead, with the master on the first host of a SLURM host list. This
module only reads variables and parses host lists; it never talks to other ranks (forming
the process group is :func:`noether_dist.dist.comm.init_distributed`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["RESTART_PORT_STRIDE", "DistEnv", "first_host", "slurm_port"]


RESTART_PORT_STRIDE = 5003
"""How far a requeued job's port moves per restart (see :func:`slurm_port`)."""


def slurm_port(job_id: int, restart_count: int = 0) -> int:
    """The master (or rendezvous) port of a SLURM job: ``15000 + (job_id +
    RESTART_PORT_STRIDE * restart_count) % 15000``, in 15000-29999 (below the usual
    ephemeral range). A requeued job keeps its id, so each restart moves the port: a process
    of the previous run still exiting on the first node (saving on SIGTERM, under load) must
    not hold the new run's port. ``launch/slurm/*.sbatch`` compute the same for torchrun's
    rendezvous."""
    return 15000 + (job_id + RESTART_PORT_STRIDE * restart_count) % 15000


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, read from torchrun or SLURM variables."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> DistEnv:
        """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*, else the variables of an
        ``srun`` task (SLURM_PROCID, SLURM_STEP_NUM_TASKS or SLURM_NTASKS, SLURM_LOCALID)
        with the master on the first host of the step's node list, else a single process.

        Only a task of a job step counts as SLURM-launched: a batch script also carries
        SLURM_PROCID=0 and SLURM_NTASKS=<tasks of the allocation>, but no SLURM_STEP_ID, and a
        trainer started there directly (not through ``srun``) is one process. Under srun the
        master port is MASTER_PORT when set, else :func:`slurm_port` of SLURM_JOB_ID and
        SLURM_RESTART_COUNT, so every task of the step computes the same one.
        """
        env = dict(os.environ if env is None else env)
        if "RANK" in env and "WORLD_SIZE" in env:
            return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK") or 0),
                       env.get("MASTER_ADDR") or "127.0.0.1", int(env.get("MASTER_PORT") or 29500), "torchrun")
        in_step = bool(env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID"))
        ntasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
        if in_step and "SLURM_PROCID" in env and ntasks > 1:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") \
                or "127.0.0.1"
            port = slurm_port(int(env.get("SLURM_JOB_ID") or 0), int(env.get("SLURM_RESTART_COUNT") or 0))
            return cls(int(env["SLURM_PROCID"]), ntasks, int(env.get("SLURM_LOCALID") or 0),
                       env.get("MASTER_ADDR") or first_host(nodelist),
                       int(env.get("MASTER_PORT") or port), "slurm")
        return cls(0, 1, 0, "127.0.0.1", 0, "single")

    def torchrun_variables(self) -> dict[str, str]:
        """The torchrun variables (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK) that
        describe this process, for libraries that read them under srun."""
        return {"MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port), "RANK": str(self.rank),
                "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank)}


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (hostlist expression), as
    ``scontrol show hostnames`` would print it first.

    ``node[01-04,07],gpu2`` -> ``node01``; ``gpu2,node[01-04]`` -> ``gpu2``;
    ``rack1-node[3,1-2]`` -> ``rack1-node3``; ``node[001-004]-ib`` -> ``node001-ib``;
    ``a[1-2]b[3-4]`` -> ``a1b3``. Zero padding is kept. A malformed list (unbalanced
    brackets, an empty range) raises ValueError naming it.
    """
    text = nodelist.strip()
    # The first host expression: up to the first comma outside brackets.
    depth, end = 0, len(text)
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"malformed SLURM node list {nodelist!r}: nested '['")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"malformed SLURM node list {nodelist!r}: ']' without '['")
        elif ch == "," and depth == 0:
            end = i
            break
    if depth != 0 and end == len(text):
        raise ValueError(f"malformed SLURM node list {nodelist!r}: '[' without ']'")
    head = text[:end].strip()
    if not head:
        raise ValueError(f"malformed SLURM node list {nodelist!r}: no host before ','" if text else
                         "empty SLURM node list")
    # Each bracket group [a-b,c,...] stands for its first member: the start of its first range.
    out, pos = [], 0
    while True:
        lb = head.find("[", pos)
        if lb < 0:
            out.append(head[pos:])
            break
        rb = head.index("]", lb)
        first = head[lb + 1:rb].split(",", 1)[0].split("-", 1)[0].strip()
        if not first.isdigit():
            raise ValueError(f"malformed SLURM node list {nodelist!r}: range {head[lb:rb + 1]!r}")
        out.append(head[pos:lb] + first)
        pos = rb + 1
    return "".join(out)
