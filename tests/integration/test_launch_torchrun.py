"""launch/torchrun/single_node.sh: a SIGTERM to torchrun itself gives the workers the
script's shutdown timeout to save (torch's agent SIGKILLs them after it), not torch's 30 s."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from noether_dist.format.layout import StageLayout

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "torchrun" / "single_node.sh"


def _has_shutdown_timeout() -> bool:
    import importlib.util

    spec = importlib.util.find_spec("torch")
    run_py = Path(spec.submodule_search_locations[0]) / "distributed" / "run.py"
    return "--shutdown-timeout" in run_py.read_text()


@pytest.mark.skipif(not _has_shutdown_timeout(), reason="this torchrun has no shutdown timeout to set (torch 2.11 keeps 30 s)")
@pytest.mark.parametrize("shutdown_timeout_s, saved", [("2", False), (None, True)])
def test_sigterm_to_torchrun_leaves_the_workers_time_to_save(tmp_path, shutdown_timeout_s, saved):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_JOB_ID")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", NPROC_PER_NODE="1", OUTPUT_DIR=str(tmp_path / "runs"),
               RUN_ID="sigterm", PYTHON=sys.executable)
    env.pop("SHUTDOWN_TIMEOUT_S", None)
    if shutdown_timeout_s is not None:
        env["SHUTDOWN_TIMEOUT_S"] = shutdown_timeout_s
    # One update, then 8 s until the next step boundary, where the worker saves: more than 2 s.
    proc = subprocess.Popen(["bash", str(SCRIPT), "trainer.step_delay_s=8", "trainer.log_every=1",
                             "trainer.checkpoint_every=1000", "trainer.eval_every=1000",
                             "trainer.requeue_on_preempt=false"],
                            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    lines: list[str] = []
    training = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if " loss " in line:
                training.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert training.wait(180), "".join(lines[-40:])
        agent = int(subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True,
                                   check=True).stdout.split()[0])
        os.kill(agent, signal.SIGTERM)  # what scancel --signal=TERM or a node drain does to it
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    reader.join(10)
    commits = list(Path(StageLayout(str(tmp_path / "runs"), "sigterm", "train").commits_dir).glob("*.json"))
    text = "".join(lines)
    assert bool(commits) == saved, text[-4000:]
    assert ("preemption signal: saving" in text) == saved, text[-4000:]
