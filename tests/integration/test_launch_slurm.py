"""The shipped SLURM scripts (launch/slurm/*.sbatch) under a real one-node SLURM cluster.

* an array job whose tasks continue one run, each task but the last stopped mid-run by a
  signal (SIGUSR1 to the batch shell as `--signal=B:USR1@<s>` sends it, SIGTERM to the step);
* preemption: `scancel --signal=USR1` to the job, and SIGUSR1 to ONE rank only; the job
  saves, commits, requeues itself and finishes;
* `srun` without torchrun: 4 tasks form the process group from SLURM variables.

Every run must end with the same final state digest as a run that was never interrupted
(same config and world size). Needs root and the SLURM packages (.ci/install_system.sh);
skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from noether_dist.dist.launch_env import first_host
from tests.support.reference_runs import uninterrupted_run
from tests.support.slurm_cluster import LocalSlurmCluster

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "launch" / "configs" / "cpu_small.yaml"
TRAIN = REPO / "launch" / "slurm" / "train.sbatch"
ARRAY = REPO / "launch" / "slurm" / "array.sbatch"
TOTAL_UPDATES = 24  # cpu_small.yaml: 3 epochs x 256 / 32
SLOW = "trainer.step_delay_s=0.15"  # time for a signal to land mid-run (24 updates: ~4 s)
_COMMIT = re.compile(r"E(\d+)_U(\d+)_S(\d+)\.json$")



_REFERENCE: dict[str, dict] = {}


def uninterrupted_digest(tmp_dir: Path) -> dict:
    """The final digest of a run that is never interrupted: cpu_small.yaml on 2 ranks.
    Computed once per test process (also used by the two-host tests)."""
    if "digest" not in _REFERENCE:
        _REFERENCE["digest"] = uninterrupted_run(CONFIG, ["run_id=ref", f"output_dir={tmp_dir}"])["digest"]
    return _REFERENCE["digest"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    return uninterrupted_digest(tmp_path_factory.mktemp("reference"))


# ------------------------------------------------------------------------------ helpers

def job_env(out_dir: Path, **extra: str) -> dict[str, str]:
    """What the scripts read from the environment (sbatch exports it into the job)."""
    return {"PYTHON": sys.executable, "ND_ROOT": str(REPO), "CONFIG": str(CONFIG), "OUTPUT_DIR": str(out_dir),
            "OMP_NUM_THREADS": "1", **extra}


def commit_updates(stage_dir: Path) -> list[int]:
    """Updates of the committed checkpoints of a stage, ascending."""
    try:
        names = os.listdir(stage_dir / "checkpoints" / "_commits")
    except FileNotFoundError:
        return []
    return sorted(int(m.group(2)) for m in map(_COMMIT.search, names) if m)


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return f"<{path} does not exist>"


def wait_for(predicate, timeout: float, what: str, logs: list[Path] = (), cluster: LocalSlurmCluster | None = None):
    """Poll ``predicate`` until it returns something truthy; fail with the job logs."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = "\n".join(f"--- {p} ---\n{read_text(p)[-4000:]}" for p in logs)
            if cluster is not None:
                detail += "\n" + cluster.run(["squeue", "-a", "-l"], check=False).stdout + cluster.log_tail(15)
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{detail}")
        time.sleep(0.1)


def wait_state(cluster: LocalSlurmCluster, job: str | int, timeout: float, logs: list[Path]) -> str:
    try:
        return cluster.wait_job(job, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - add the job logs
        detail = "\n".join(f"--- {p} ---\n{read_text(p)[-4000:]}" for p in logs)
        raise AssertionError(f"{exc}\n{detail}") from None


def scancel(cluster: LocalSlurmCluster, job: str | int, *flags: str) -> None:
    """``scancel <flags> <job>``. Signalling a job whose trainer stops at once may report
    "Job is in transitional state, retrying" and then "already completing or completed" with
    a non-zero status although the signal was delivered (Slurm 22.05): tolerated; the
    callers check that the signal took effect."""
    res = cluster.run(["scancel", "-v", *flags, str(job)], check=False)
    if res.returncode != 0 and "already completing or completed" not in res.stderr:
        raise AssertionError(f"scancel {' '.join(flags)} {job} failed ({res.returncode}): {res.stderr}")


def summary_of(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "summary.json").read_text())


def worker_pids(job_id: int, rank: int) -> list[int]:
    """Trainer processes of a job with torchrun's RANK=<rank> in their environment."""
    found = []
    want = {f"SLURM_JOB_ID={job_id}".encode(), f"RANK={rank}".encode()}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            environ = set(Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if b"noether_dist.trainer" in cmdline and b"torch.distributed.run" not in cmdline and want <= environ:
            found.append(int(entry))
    return found


# -------------------------------------------------------------------------------- tests

def test_first_host_agrees_with_scontrol(cluster):
    for nodelist in ("node[01-04,07],gpu2", "gpu2,node[01-04]", "rack1-node[3,1-2]", "n[009-011]", "localhost"):
        res = cluster.run(["scontrol", "show", "hostnames", nodelist])
        assert first_host(nodelist) == res.stdout.split()[0], nodelist


def test_srun_four_tasks_form_the_process_group(cluster, tmp_path):
    """`srun -n 4 python -m noether_dist.trainer` (LAUNCHER=srun): no torchrun, the ranks come
    from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, the master from the node list."""
    out = tmp_path / "job.out"
    job = cluster.sbatch(["-N1", "-n4", "--ntasks-per-node=4", "-o", str(out)], TRAIN,
                         env=job_env(tmp_path / "runs", LAUNCHER="srun"), script_args=["trainer.epochs=1"])
    assert wait_state(cluster, job, 120, [out]) == "COMPLETED", read_text(out)
    stage = tmp_path / "runs" / f"slurm-{job}" / "train"
    summary = summary_of(stage)
    assert summary["finished"] and summary["world_size"] == 4 and summary["checkpoint"] == "E1_U8_S256", summary
    record = json.loads((stage / "checkpoints" / "_commits" / "E1_U8_S256.json").read_text())
    shards = sorted(f["name"] for f in record["artifacts"][0]["files"] if f["name"].endswith(".distcp"))
    assert shards == [f"__{r}_0.distcp" for r in range(4)], shards


def test_array_chain_continues_one_run(cluster, tmp_path, reference):
    """`sbatch --array=0-2%1 array.sbatch` (torchrun, 2 ranks): one run id for all tasks.
    Task 0 is stopped by SIGUSR1 to its batch shell (what `--signal=B:USR1@<s>` does before
    the time limit), task 1 by SIGTERM to every process of its job step (what a preemption
    or `scancel --signal=TERM` does); each saves mid-run and the next task resumes it; task 2
    finishes with the digest of a run that was never interrupted."""
    runs = tmp_path / "runs"
    array = cluster.sbatch(["--array=0-2%1", "-N1", "-n1", "-o", str(tmp_path / "task_%a.out")], ARRAY,
                           env=job_env(runs, LAUNCHER="torchrun", NPROC_PER_NODE="2"), script_args=[SLOW])
    stage = runs / f"slurm-{array}" / "train"
    logs = [tmp_path / f"task_{i}.out" for i in range(3)]

    def saved_on_signal(log: Path) -> tuple[str, int] | None:
        m = re.search(r"preemption signal: saving (E\d+_U(\d+)_S\d+) and stopping", read_text(log))
        return (m.group(1), int(m.group(2))) if m else None

    # task 0: past its first checkpoint, then the time-limit warning to the batch shell
    wait_for(lambda: cluster.job_state(f"{array}_0") == "RUNNING" and commit_updates(stage), 120,
             "task 0 to commit its first checkpoint", logs, cluster)
    scancel(cluster, f"{array}_0", "--batch", "--signal=USR1")
    assert wait_state(cluster, f"{array}_0", 180, logs) == "COMPLETED"
    stop0, stop0_update = saved_on_signal(logs[0]) or pytest.fail("task 0 did not save on the signal:\n" + read_text(logs[0]))
    # task 1 may already have committed after it: membership, not "newest"
    assert 4 <= stop0_update < TOTAL_UPDATES and stop0_update in commit_updates(stage)

    # task 1: resumes, gets past one more checkpoint, then SIGTERM to every process of the step
    wait_for(lambda: cluster.job_state(f"{array}_1") == "RUNNING" and commit_updates(stage)[-1] > stop0_update,
             120, "task 1 to commit a checkpoint after task 0's", logs, cluster)
    scancel(cluster, f"{array}_1", "--signal=TERM")
    # torchrun's agent shuts its workers down on SIGTERM (they save first) and exits 1
    assert wait_state(cluster, f"{array}_1", 180, logs) in ("COMPLETED", "FAILED")
    stop1, stop1_update = saved_on_signal(logs[1]) or pytest.fail("task 1 did not save on SIGTERM:\n" + read_text(logs[1]))
    assert stop0_update < stop1_update < TOTAL_UPDATES and stop1_update in commit_updates(stage)

    # task 2 runs to the end
    assert wait_state(cluster, f"{array}_2", 240, logs) == "COMPLETED"
    assert os.listdir(runs) == [f"slurm-{array}"], "every task must continue the same run"
    assert "resumed from" not in read_text(logs[0])
    assert f"resumed from slurm-{array}/train at {stop0}" in read_text(logs[1]), read_text(logs[1])
    assert f"resumed from slurm-{array}/train at {stop1}" in read_text(logs[2]), read_text(logs[2])
    summary = summary_of(stage)
    assert summary["finished"] and summary["world_size"] == 2, summary
    assert summary["digest"] == reference


def _run_preempted_job(cluster, tmp_path, launcher: str, send) -> tuple[int, Path, list[Path]]:
    """Submit train.sbatch (2 ranks), wait for its first checkpoint, call ``send(job)``, then
    wait for the requeued job to finish."""
    out = tmp_path / "job.out"
    if launcher == "srun":
        args, env = ["-N1", "-n2", "--ntasks-per-node=2"], job_env(tmp_path / "runs", LAUNCHER="srun")
    else:
        args, env = ["-N1", "-n1"], job_env(tmp_path / "runs", LAUNCHER="torchrun", NPROC_PER_NODE="2")
    job = cluster.sbatch([*args, "-o", str(out)], TRAIN, env=env, script_args=[SLOW])
    stage = tmp_path / "runs" / f"slurm-{job}" / "train"
    wait_for(lambda: commit_updates(stage), 120, "the first checkpoint", [out], cluster)
    send(job)
    wait_for(lambda: cluster.job_info(job).get("Restarts") == "1", 60, "the job to requeue itself", [out], cluster)
    assert wait_state(cluster, job, 150, [out]) == "COMPLETED", read_text(out)
    return job, stage, [out]


def _check_resumed_and_finished(job: int, stage: Path, out: Path, reference: dict) -> None:
    text = read_text(out)
    starts = re.findall(r"job \d+ \(restart (\d+)\)", text)
    assert starts == ["0", "1"], text
    stop = re.search(r"preemption signal: saving (E\d+_U(\d+)_S\d+) and stopping", text)
    assert stop and 4 <= int(stop.group(2)) < TOTAL_UPDATES, text
    assert (stage / "checkpoints" / "_commits" / f"{stop.group(1)}.json").exists()
    assert f"resumed from slurm-{job}/train at {stop.group(1)}" in text, text
    summary = summary_of(stage)
    assert summary["finished"] and summary["world_size"] == 2, summary
    assert summary["digest"] == reference


def test_preempt_scancel_usr1_saves_requeues_and_finishes(cluster, tmp_path, reference):
    """`scancel --signal=USR1 <job>` reaches every rank (LAUNCHER=srun); the ranks save,
    commit, rank 0 requeues the job; the requeued job (same SLURM_JOB_ID, hence the same run
    id) resumes that checkpoint and finishes."""
    job, stage, (out,) = _run_preempted_job(
        cluster, tmp_path, "srun", lambda job: scancel(cluster, job, "--signal=USR1"))
    _check_resumed_and_finished(job, stage, out, reference)
    # the requeued run's master port moved: the first run's processes may still hold the old one
    masters = re.findall(r"rank 0 of 2 via slurm \(gloo, master (\S+)\)", read_text(out))
    assert len(masters) == 2 and masters[0] != masters[1], masters


def test_preempt_signal_to_one_rank_only(cluster, tmp_path, reference):
    """SIGUSR1 to rank 1 only (LAUNCHER=torchrun): rank 0 learns of it at the step boundary,
    both save the same step, commit, requeue and finish."""
    def signal_rank_1(job: int) -> None:
        pids = wait_for(lambda: worker_pids(job, 1), 30, "the pid of rank 1")
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGUSR1)

    job, stage, (out,) = _run_preempted_job(cluster, tmp_path, "torchrun", signal_rank_1)
    _check_resumed_and_finished(job, stage, out, reference)
    text = read_text(out)
    assert re.search(r"\[rank 1\][^\n]*got SIGUSR1", text), text
    assert re.search(r"\[rank 0\][^\n]*another rank was signalled", text), text
