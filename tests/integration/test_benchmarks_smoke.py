"""Smoke test of benchmarks/: every benchmark at a tiny size, and gpu_check's CPU dry run.

No timing is asserted (figures at a tiny size mean nothing); what is checked is that every
benchmark runs to the end and that the JSON holds every figure as a finite number.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks.gpu_check import FIGURE_KEYS as GPU_FIGURE_KEYS
from benchmarks.run import FIGURE_KEYS

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
S3_KEYS = {k for k in FIGURE_KEYS if k.startswith(("s3_", "resume_", "tiers_"))}


def _run(args: list[str], timeout_s: float) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=timeout_s)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} failed (rc {proc.returncode}):\n{output[-6000:]}"
    return output


def _moto_available() -> bool:
    from benchmarks.s3 import moto_available

    return moto_available()[0]


def test_every_benchmark_runs_at_tiny_size(tmp_path):
    out = tmp_path / "bench.json"
    args = ["benchmarks/run.py", "--tiny", "--out", str(out), "--dir", str(tmp_path / "work")]
    expected = set(FIGURE_KEYS)
    if not _moto_available():  # the S3 parts need a moto server; everything else still runs
        args += ["--only", "rss,sync,async,dedup,scaling"]
        expected -= S3_KEYS
    printed = _run(args, timeout_s=240)
    data = json.loads(out.read_text())
    assert expected <= set(data["figures"]), sorted(expected - set(data["figures"]))
    for key in expected:
        fig = data["figures"][key]
        assert math.isfinite(fig["value"]), (key, fig)
        assert fig["goal"] and fig["numerator"] and fig["denominator"], (key, fig)
        assert key in printed  # the table names every figure
    assert [row["world_size"] for row in data["scaling"]] == [1, 2, 4]
    assert all(math.isfinite(row["save_s"]) and math.isfinite(row["load_s"]) for row in data["scaling"])
    assert data["scaling"][-1]["oversubscribed"] == (4 > (os.cpu_count() or 1))


def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    _run(["benchmarks/gpu_check.py", "--dry-run", "--out", str(out), "--dir", str(tmp_path / "work")], timeout_s=90)
    data = json.loads(out.read_text())
    assert data["mode"] == "dry-run"
    assert len(data["saves"]) == 5
    for key in GPU_FIGURE_KEYS:
        assert math.isfinite(data["figures"][key]["value"]), (key, data["figures"][key])
