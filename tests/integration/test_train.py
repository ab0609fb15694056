"""The reference trainer end to end: README's main job, exact continuation after SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import forked_main
from tests.support.reference_runs import uninterrupted_run

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "launch" / "configs" / "cpu_tiny.yaml")
SMALL = ["trainer.epochs=2", "trainer.dataset_size=256", "trainer.checkpoint_every=4", "trainer.eval_every=4",
         "trainer.log_every=1"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _torchrun(nproc: int, out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "noether_dist.trainer", "--config", CONFIG, f"output_dir={out}", *args]


def _trainer(args: list[str]) -> subprocess.CompletedProcess:
    """``python -m noether_dist.trainer *args``, forked from the ranks' forkserver (torch is
    imported there once; these tests are about the trainer, not Python's start)."""
    return forked_main.run_all([("noether_dist.trainer", args, _env())], cwd=str(REPO), timeout_s=120)[0]


def _summary(out: Path, run_id: str) -> dict:
    return json.loads((out / run_id / "train" / "summary.json").read_text())


README_COMMAND = "python3 -m noether_dist.trainer --config launch/configs/cpu_tiny.yaml"


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory) -> Path:
    """README's main job (from the repository root, one epoch) as run id "base": the output
    dir. The tests below check that run, start a new stage from it and initialise from it
    (one trainer launch instead of three)."""
    out = tmp_path_factory.mktemp("one_epoch")
    module_flag, module, *args = README_COMMAND.split()[1:]
    assert module_flag == "-m"
    proc = forked_main.run_all([(module, [*args, f"output_dir={out}", "run_id=base", "trainer.epochs=1"], _env())],
                               cwd=str(REPO), timeout_s=120)[0]
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_readme_main_job_runs(one_epoch):
    assert README_COMMAND in (REPO / "README.md").read_text()
    summary = _summary(one_epoch, "base")
    assert summary["finished"] and summary["checkpoint"] == "E1_U16_S512"
    aliases = os.listdir(one_epoch / "base" / "train" / "checkpoints" / "_aliases")
    assert sorted(aliases) == ["best.loss.test.json", "last.json", "latest.json"]


@pytest.mark.slow
def test_sigkill_at_a_random_update_then_resume_gives_the_same_digest(tmp_path):
    full = uninterrupted_run(Path(CONFIG), [f"output_dir={tmp_path}", "run_id=full", *SMALL])
    total = 2 * 256 // 32
    kill_at = random.Random().randint(5, total - 2)  # after the first checkpoint (U4), before the end
    proc = subprocess.Popen(_torchrun(2, tmp_path, "run_id=cut", "auto_resume=true", "trainer.step_delay_s=0.05",
                                      *SMALL), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if f"_U{kill_at}_S" in line and "loss" in line:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "the trainer never reached the update to kill at"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert not (tmp_path / "cut" / "train" / "summary.json").exists(), "".join(seen[-20:])
    resumed = subprocess.run(_torchrun(2, tmp_path, "run_id=cut", "auto_resume=true", *SMALL), env=_env(),
                             capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed cut/train at" in resumed.stderr
    a, b = full, _summary(tmp_path, "cut")
    assert b["finished"] and a["checkpoint"] == b["checkpoint"]
    assert a["digest"] == b["digest"], f"killed at U{kill_at}"
    assert a["callbacks"] == b["callbacks"]


@pytest.mark.slow
def test_new_stage_starts_from_another_stage_and_resume_keys_default(one_epoch):
    # resume the stage under a new stage name: progress continues, files go to the new stage
    cont = _trainer(["--config", CONFIG, f"output_dir={one_epoch}", "run_id=base", "resume_run_id=base",
                     "resume_stage_name=train", "stage_name=finetune", "resume_checkpoint=last", "trainer.epochs=2"])
    assert cont.returncode == 0, cont.stderr[-2000:]
    summary = json.loads((one_epoch / "base" / "finetune" / "summary.json").read_text())
    assert summary["finished"] and summary["checkpoint"] == "E2_U32_S1024"
    assert "E1_U24_S768.json" in os.listdir(one_epoch / "base" / "finetune" / "checkpoints" / "_commits")


_TIMEOUTS = """
import json, sys
from noether_dist.dist.comm import Comm
from noether_dist.trainer.config import TrainConfig
from noether_dist.trainer.loop import TrainLoop
out = {}
for run_id, block in (("env", {}), ("block", {"timeout_s": 5})):
    loop = TrainLoop(TrainConfig.from_dict({"output_dir": sys.argv[1], "run_id": run_id, "checkpointer": block}))
    out[run_id] = [loop.checkpointer.config.timeout_s, loop.comm.timeout_s, loop.timeout_s]
out["resume"] = Comm().timeout_s  # what resume() waits when given no timeout
print(json.dumps(out))
"""


@pytest.mark.slow
def test_checkpointer_timeout_follows_noether_dist_timeout_s_as_resume_does(tmp_path):
    """Without ``checkpointer.timeout_s``, the trainer's checkpointer, its collectives and
    resume all wait NOETHER_DIST_TIMEOUT_S; a timeout_s in the block wins."""
    proc = subprocess.run([sys.executable, "-c", _TIMEOUTS, str(tmp_path)],
                          env={**_env(), "NOETHER_DIST_TIMEOUT_S": "37"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"env": [37.0, 37.0, 37.0], "block": [5, 5.0, 5], "resume": 37.0}, got


@pytest.mark.slow
def test_trainer_initializer_from_yaml_starts_fresh_with_previous_weights(one_epoch, tmp_path):
    import yaml

    config = yaml.safe_load(open(CONFIG))
    config["model"]["initializers"] = [{"kind": "noether.core.initializers.PreviousRunInitializer", "run_id": "base",
                                        "model_name": "mlp", "stage_name": "train", "checkpoint": "last",
                                        "model_info": "ema_factor=0.99"}]
    path = tmp_path / "init.yaml"
    path.write_text(yaml.safe_dump(config))
    run = _trainer(["--config", str(path), f"output_dir={one_epoch}", "run_id=fine", "trainer.epochs=1"])
    assert run.returncode == 0, run.stderr[-2000:]
    assert "initialised mlp from" in run.stderr and "ema_factor=0.99_cp=E1_U16_S512_model.th" in run.stderr
    summary = _summary(one_epoch, "fine")
    assert summary["finished"] and summary["checkpoint"] == "E1_U16_S512"  # progress started at zero
    assert summary["digest"]["model"] != _summary(one_epoch, "base")["digest"]["model"]
