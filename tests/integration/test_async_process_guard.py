"""``async_mode: process`` is refused at construction, on every rank, where DCP's spawned
checkpoint process could not work: a main script without a ``if __name__ == "__main__":``
guard (the spawned process re-runs the script). Without a process group:
tests/unit/test_async_guard.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.torch_compat

ROOT = Path(__file__).resolve().parents[2]

# A training script as a user would write it; {body} is its top-level code.
_SCRIPT = """\
import os, sys
import torch
import torch.distributed as dist
from noether_dist import AsyncMode, Checkpointer, CheckpointerConfig, TrainingIteration

def train():
    dist.init_process_group("gloo", init_method="file://" + os.environ["RDZV"],
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    ck = Checkpointer(CheckpointerConfig(output_dir=os.environ["OUT"], run_id="run1", model_name="mlp",
                                         async_mode=AsyncMode.PROCESS, timeout_s=30))
    print("constructed", flush=True)
    ck.save(TrainingIteration(0, 1, 1), model=torch.nn.Linear(3, 2)).result(timeout=60)
    ck.close()
    print("committed", flush=True)
    dist.destroy_process_group()

{body}
"""


def _run_script(tmp_path: Path, body: str, world_size: int) -> list[subprocess.CompletedProcess]:
    script = tmp_path / "train_script.py"
    script.write_text(_SCRIPT.format(body=textwrap.dedent(body)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RDZV": str(tmp_path / "rdzv"),
           "OUT": str(tmp_path / "out"), "WORLD_SIZE": str(world_size)}
    procs = [subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env={**env, "RANK": str(rank)},
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(world_size)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=90)  # a hang fails the test here
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


TEARDOWN_NOISE = {"terminate called without an active exception"}
"""What torch 2.11's gloo threads may print as the interpreter exits after the error: not ours."""


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip() and line.strip() not in TEARDOWN_NOISE]
    return lines[-1].removeprefix("[rank0]: ").removeprefix("[rank1]: ") if lines else ""


@pytest.mark.slow
def test_script_without_main_guard_fails_fast_on_every_rank(tmp_path):
    results = _run_script(tmp_path, "train()\n", world_size=2)
    for rank, res in enumerate(results):
        assert res.returncode != 0, f"rank {rank} did not fail:\n{res.stdout}\n{res.stderr}"
        assert "constructed" not in res.stdout
        line = _last_line(res.stderr)
        assert line.startswith("noether_dist.errors.ConfigError: async_mode 'process' starts DCP's checkpoint process"), \
            res.stderr[-2000:]
        assert "train_script.py" in line and 'if __name__ == "__main__":' in line
    assert not (tmp_path / "out" / "run1" / "checkpoints" / "_commits").exists()


@pytest.mark.slow
def test_script_with_main_guard_saves_in_process_mode(tmp_path):
    results = _run_script(tmp_path, 'if __name__ == "__main__":\n    train()\n', world_size=1)
    assert results[0].returncode == 0, results[0].stderr[-3000:]
    assert "committed" in results[0].stdout
    assert os.listdir(tmp_path / "out" / "run1" / "checkpoints" / "_commits") == ["E0_U1_S1.json"]


@pytest.mark.slow
def test_checkpointer_built_during_a_spawn_re_run_is_refused_there(tmp_path):
    # The parent never builds a Checkpointer; the module's unguarded code does, only in the
    # spawned child while it re-runs the main module.
    body = """\
    import multiprocessing as mp
    if __name__ == "__mp_main__":
        Checkpointer(CheckpointerConfig(output_dir=os.environ["OUT"], run_id="run1", async_mode=AsyncMode.PROCESS))
    if __name__ == "__main__":
        p = mp.get_context("spawn").Process(target=print, args=("child ran",))
        p.start()
        p.join(60)
        print("child exit code", p.exitcode, flush=True)
    """
    res = _run_script(tmp_path, body, world_size=1)[0]
    assert "child exit code 1" in res.stdout, res.stdout + res.stderr[-2000:]
    assert "child ran" not in res.stdout
    assert ("noether_dist.errors.ConfigError: a Checkpointer with async_mode 'process' was created while a spawned "
            "process re-ran the main module") in res.stderr
