"""Runs of the small Noether project (tests/integration/noether/project) under torchrun, for the adapter tests.

A run is Noether's own ``noether-train`` started through
``python -m noether_dist.integrations.noether.train`` by ``$ENV/bin/torchrun`` on CPU ranks.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml

from noether_dist.io.dcp_io import load_full
from noether_dist.format.layout import StageLayout
from noether_dist.stage.commit import read_alias, read_commit
from noether_dist.io.storage import open_storage
from tests.support.ports import free_port

__all__ = ["project_config", "plain_config", "start_run", "run_to_end", "kill_tree", "digest_at", "commits_of", "alias_of",
           "wait_for_commit", "REPO"]

REPO = Path(__file__).resolve().parents[3]
PROJECT = "tests.integration.noether.project.project"
STAGE = "train"
MAX_UPDATES = 24
EMA = 0.9


def project_config(out: Path, run_id: str, **root: Any) -> dict[str, Any]:
    """The project's Noether config: 32 samples, batch 4 (8 updates per epoch), 24 updates;
    CheckpointCallback and EmaCallback every 2 updates, BestCheckpointCallback every epoch.
    Dropout makes the result depend on every rank's random stream."""
    return {
        "output_path": str(out), "run_id": run_id, "stage_name": STAGE, "accelerator": "cpu", "num_workers": 0,
        "seed": 3, "store_code_in_output": False, "tracker": "disabled",
        "datasets": {"train": {"kind": f"{PROJECT}.SyntheticDataset", "num_samples": 32}},
        "model": {"kind": f"{PROJECT}.TinyNet", "name": "tinynet", "dropout": 0.2,
                  "optimizer_config": {"kind": "torch.optim.AdamW", "lr": 0.01, "weight_decay": 0.05}},
        "trainer": {
            "kind": f"{PROJECT}.TinyTrainer", "max_updates": MAX_UPDATES, "effective_batch_size": 4,
            "add_default_callbacks": False, "add_trainer_callbacks": False,
            "forward_properties": ["x"], "target_properties": ["y"],
            "checkpointer": {"timeout_s": 60},
            "callbacks": [
                {"kind": f"{PROJECT}.ValMetricCallback", "every_n_updates": 2},
                {"kind": "noether.core.callbacks.CheckpointCallback", "every_n_updates": 2, "save_weights": True,
                 "save_optim": True, "save_latest_weights": True, "save_latest_optim": True},
                {"kind": "noether.core.callbacks.EmaCallback", "every_n_updates": 2, "target_factors": [EMA],
                 "save_weights": True, "save_last_weights": True, "save_latest_weights": True},
                {"kind": "noether.core.callbacks.BestCheckpointCallback", "every_n_epochs": 1, "metric_key": "loss/val"},
            ],
        },
        **root,
    }


def plain_config(out: Path, run_id: str, **root: Any) -> dict[str, Any]:
    """The same project with the adapter off: Noether's own trainer and CheckpointWriter."""
    config = project_config(out, run_id, **root)
    config["trainer"]["kind"] = f"{PROJECT}.PlainTinyTrainer"
    del config["trainer"]["checkpointer"]
    return config


def start_run(config: dict[str, Any], workdir: Path, *, nproc: int = 2) -> subprocess.Popen:
    """Start ``torchrun --nproc-per-node=<nproc> -m noether_dist.integrations.noether.train`` on a
    master port of its own (concurrent test runs never clash)."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{config['run_id']}.yaml"
    path.write_text(yaml.safe_dump(config))
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("SLURM_PROCID", None)
    log = open(workdir / f"{config['run_id']}.log", "ab")
    return subprocess.Popen([torchrun, f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
                             f"--master-port={free_port()}", "-m", "noether_dist.integrations.noether.train", str(path)],
                            cwd=str(workdir), env=env, stdout=log, stderr=subprocess.STDOUT)


def run_to_end(config: dict[str, Any], workdir: Path, *, timeout_s: float = 240, nproc: int = 2) -> None:
    """Run to the end; AssertionError with the log's tail when it fails."""
    proc = start_run(config, workdir, nproc=nproc)
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        rc = "timeout"
    if rc != 0:
        tail = (workdir / f"{config['run_id']}.log").read_text(errors="replace")[-6000:]
        raise AssertionError(f"run {config['run_id']} ended with {rc}:\n{tail}")


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every process below it (workers run in sessions of their own,
    so the tree is collected first, then killed at once)."""
    try:
        tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(tree, timeout=30)


def layout_of(out: Path, run_id: str) -> tuple[Any, StageLayout]:
    return open_storage(str(out)), StageLayout(str(out), run_id, STAGE)


def commits_of(out: Path, run_id: str) -> dict[str, Any]:
    """{training point: commit record} of a run's stage."""
    from noether_dist.stage.commit import list_commits

    storage, layout = layout_of(out, run_id)
    return {str(it): read_commit(storage, layout, it) for it in list_commits(storage, layout)}


def alias_of(out: Path, run_id: str, name: str) -> str | None:
    storage, layout = layout_of(out, run_id)
    rec = read_alias(storage, layout, name)
    return None if rec is None else str(rec.iteration)


def _digest(obj: Any, h: Any, prefix: str = "") -> None:
    if isinstance(obj, dict):
        for key in sorted(obj, key=str):
            _digest(obj[key], h, f"{prefix}/{key}")
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _digest(item, h, f"{prefix}/{i}")
    elif isinstance(obj, torch.Tensor):
        h.update(prefix.encode())
        h.update(obj.detach().contiguous().cpu().numpy().tobytes())
    else:
        h.update(f"{prefix}={obj!r}".encode())


def digest_at(out: Path, run_id: str, alias: str = "last") -> dict[str, str]:
    """SHA-256 of each artifact (model, optimizer, EMA) of the checkpoint an alias names."""
    storage, layout = layout_of(out, run_id)
    record = read_commit(storage, layout, read_alias(storage, layout, alias).iteration)
    out_digests = {}
    for art in record.artifacts:
        if art.kind == "trainer":
            continue
        h = hashlib.sha256()
        _digest(load_full(layout.artifact_path(art.name), storage), h)
        out_digests[f"{art.kind}:{art.model_info or ''}"] = h.hexdigest()
    return out_digests


def wait_for_commit(out: Path, run_id: str, count: int, proc: subprocess.Popen, timeout_s: float = 180) -> None:
    """Wait until the run has committed ``count`` checkpoints (AssertionError if it ends first)."""
    deadline = time.monotonic() + timeout_s
    commits = Path(StageLayout(str(out), run_id, STAGE).commits_dir)
    while time.monotonic() < deadline:
        if commits.is_dir() and len([p for p in commits.iterdir() if p.name.startswith("E")]) >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run {run_id} ended (rc {proc.returncode}) before {count} commits")
        time.sleep(0.02)
    raise AssertionError(f"run {run_id} did not commit {count} checkpoints within {timeout_s}s")
