"""The trainer's command line: a bad value ends in one clear line and a non-zero exit (no
traceback), once per node under torchrun; values YAML would misread are taken as meant."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import forked_main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "launch" / "configs" / "cpu_tiny.yaml"
TINY = ["trainer.epochs=1", "trainer.dataset_size=64", "trainer.test_size=32", "trainer.eval_every=2",
        "trainer.checkpoint_every=2", "trainer.log_every=2"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", NOETHER_DIST_LOG_LEVEL="INFO", **extra)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_JOB_ID", "SLURM_NTASKS"):
        env.pop(var, None)
    return env


def _train(args: list[str], *, cwd: Path, env: dict[str, str] | None = None, launcher: list[str] | None = None):
    return _train_all([(args, env)], cwd=cwd, launcher=launcher)[0]


def _train_all(runs: list[tuple[list[str], dict[str, str] | None]], *, cwd: Path, launcher: list[str] | None = None,
               timeout_s: float = 300) -> list[subprocess.CompletedProcess]:
    """Start one trainer per (args, env) at once; wait for all, each bounded. Without a
    launcher each is forked from the ranks' forkserver (torch already imported: what is
    tested is what the command prints and exits with, not how Python starts)."""
    if launcher is None:
        return forked_main.run_all([("noether_dist.trainer", args, env or _env()) for args, env in runs], cwd=str(cwd),
                                   timeout_s=timeout_s)
    procs = [subprocess.Popen([*(launcher or [sys.executable]), "-m", "noether_dist.trainer", *args], cwd=cwd,
                              env=env or _env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args, env in runs]
    deadline = time.monotonic() + timeout_s
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    return done


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line]


NO_CREDENTIALS = {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
                  "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"}

BAD = [
    # (override, words the one line must hold, extra environment)
    ("checkpointer.timeout_s=abc", ["timeout_s", "'abc'"], {}),
    ("checkpointer.async_mode=sometimes", ["async_mode", "off, thread or process"], {}),
    ("resume_run_id=nope", ["CheckpointNotFoundError", "'nope'"], {}),
    ("model.initializers=[{kind: os.path.join}]", ["os.path.join", "not an Initializer"], {}),
    ("trainer.lr=abc", ["trainer.lr", "number"], {}),
    ("run_id=../escape", ["run_id"], {}),
    ("output_dir=s3://no-credentials/x", ["StorageError", "credentials"], NO_CREDENTIALS),
]


def test_bad_values_end_in_one_clean_line_and_good_ones_are_accepted(tmp_path):
    runs = f"output_dir={tmp_path / 'runs'}"
    # YAML that reads an unquoted off as False and the run id as a date
    config = tmp_path / "unquoted.yaml"
    config.write_text(CONFIG.read_text().replace('async_mode: "off"', "async_mode: off")
                      + "run_id: 2026-11-28\n")
    assert "async_mode: off\n" in config.read_text()
    procs = _train_all([(["--config", str(CONFIG), runs, *TINY, override], _env(**extra)) for override, _, extra in BAD]
                       # --debug asks for the traceback
                       + [(["--config", str(CONFIG), "--debug", runs, "resume_run_id=nope"], None),
                          # What the user means: the mode off, and run ids that YAML reads as an int or a date.
                          (["--config", str(CONFIG), runs, *TINY, "checkpointer.async_mode=off", "run_id=12345"], None),
                          (["--config", str(config), runs, *TINY], None)], cwd=tmp_path)
    for (override, words, _), proc in zip(BAD, procs):
        errors = _errors(proc.stderr)
        assert proc.returncode not in (0, None), (override, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, (override, proc.stderr[-3000:])
        assert len(errors) == 1, (override, proc.stderr[-2000:])
        assert all(w in errors[0] for w in words), (override, errors)
    debug, as_int, as_date = procs[len(BAD):]
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    assert as_int.returncode == 0, as_int.stderr[-3000:]
    assert (tmp_path / "runs" / "12345" / "train" / "checkpoints").is_dir()
    assert as_date.returncode == 0, as_date.stderr[-3000:]
    assert (tmp_path / "runs" / "2026-11-28" / "train" / "checkpoints").is_dir()


def test_error_is_said_once_per_node_under_torchrun(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = _train(["--config", str(CONFIG), f"output_dir={tmp_path / 'runs'}", *TINY, "resume_run_id=nope"],
                  cwd=tmp_path, launcher=launcher)
    assert proc.returncode != 0
    ours = [line for line in _errors(proc.stderr) if "noether_dist.trainer" in line]
    assert len(ours) == 1 and "'nope'" in ours[0], proc.stderr[-3000:]
    # torchrun's agent reports the failed workers with a traceback of its own; no rank does.
    frames = [line for line in proc.stderr.splitlines() if line.lstrip().startswith("File ")]
    assert not [f for f in frames if str(ROOT / "noether_dist") in f], proc.stderr[-3000:]
