"""Launcher environments written by hand, as the launchers set them (no SLURM needed)."""

from __future__ import annotations

__all__ = ["BATCH_SCRIPT", "SRUN_TASK_1"]

SRUN_TASK_1 = {
    "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_STEP_NODELIST": "node[01-02]",
    "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NODEID": "0", "SLURM_NTASKS": "2", "SLURM_NPROCS": "2",
    "SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "1",
}
"""What `srun -n 2` sets in task 1 of job 1234 on one node (measured, Slurm 22.05)."""

BATCH_SCRIPT = {
    "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0", "SLURM_NTASKS": "4", "SLURM_NPROCS": "4", "SLURM_NNODES": "2",
}
"""What the batch script of a `sbatch -n 4` job sees (no step variables)."""
